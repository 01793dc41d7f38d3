"""How loud a head's write starts: the rms of each attention branch's output at init, relative to the ViT's
(docs/spectrum.md 4h), for the demo's scale and ViT-Tiny's, MLP and linear bottlenecks, nn.Linear's and He's init.

    python docs/experiments/branch_rms.py

Deterministic bottlenecks (logvar -10, full decoders), eval mode (z = mu), random images; the same seed for every
model, the bottlenecks' init on a stream of their own (``demo_run.py --own-rng``), so the ViT's weights are shared.
"""
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
import demo_run  # noqa: E402  (imports timm_vib, which registers the models)

SCALES = {
    'demo (heads of 16, r 8)': (dict(img_size=16, patch_size=2, depth=4, embed_dim=48, num_heads=3, in_chans=1,
                                     num_classes=10, pos_embed_init='sincos'), 8, (1, 16, 16)),
    'ViT-Tiny (heads of 64, r 32)': (dict(img_size=64), 32, (3, 64, 64)),
}


def branch_rms(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over blocks of the rms of the attention branch's output (after the output projection)."""
    outs = []
    hooks = [b.attn.register_forward_hook(lambda m, i, o: outs.append(o.pow(2).mean().sqrt().item()))
             for b in model.blocks]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(outs) / len(outs)


def main() -> None:
    torch.set_num_threads(1)
    demo_run.patch_own_rng(0)
    rows = {}
    for he in (False, True):
        if he:
            demo_run.patch_he_init()
        for scale, (kw, r, shape) in SCALES.items():
            x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
            torch.manual_seed(0)
            ref = branch_rms(timm.create_model('vit_tiny_gap', **kw), x)
            for hidden in (64, 0):
                torch.manual_seed(0)
                m = timm.create_model('vit_tiny_vib', beta=0.0, vib_dim=r, vib_hidden=hidden, vib_logvar_init=-10.0,
                                      vib_small_init_dec=False, **kw)
                name = ('MLPs of 64' if hidden else 'linear') + (", He's init" if he else '')
                rows.setdefault(name, {})[scale] = branch_rms(m, x) / ref
    print('| relative rms at init | ' + ' | '.join(SCALES) + ' |')
    print('| --- |' + ' ---: |' * len(SCALES))
    for name, vals in rows.items():
        print(f'| {name} | ' + ' | '.join(f'{vals[s]:.3f}' for s in SCALES) + ' |')


if __name__ == '__main__':
    main()
