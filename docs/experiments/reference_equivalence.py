"""The paper's reference model (murphyka/vit_ib ``models.py``) against ``vit_tiny_vib``, with the same weights and
the same noise: logits, the KL of every layer, head and token, the loss and every parameter's gradient.

    python docs/experiments/reference_equivalence.py VIT_IB_FOLDER [--vib-hidden 64] [--scale tiny|demo] [--seed 0]

VIT_IB_FOLDER holds the reference's ``models.py`` (a checkout of https://github.com/murphyka/vit_ib; it has no
license, so it is not copied here). The reference model is built as its ``train.py`` builds it (``HeadwiseVIBED``
with ``init_logvar=-6``, clamp (-10, 10), no ``small_init_dec``, wrapped into ``ViTWithHeadIB``) on a small
timm ViT-Tiny (``--scale tiny``: 32 px, 8 px patches, depth 2, heads of 64, r 32, 5 classes: ``vit_tiny_vib`` folds
the encoder and decoder into the projections) or on the demo's model (``--scale demo``: 16 px grey images in 2x2
patches, depth 4, width 48, heads of 16, r 8: ``vit_tiny_vib`` runs them explicitly), its weights converted with
``timm_vib.convert_reference_state_dict`` into ``vit_tiny_vib``, and both run in training mode on the same images.
The reference draws its noise per head (``torch.randn_like``), ``vit_tiny_vib`` for all heads of a layer at once:
ours are recorded and handed to the reference in its order, so both sample the same z. The loss is the
reference's: cross-entropy + beta x the mean of the KL over batch, layers, heads and tokens.

Measured (2026-11-24, the reference at commit 5a50158, torch 2.14.1, timm 1.0.31, seed 0), relative differences:

| scale, bottleneck (our path) | logits | KL [B, depth, heads, tokens] | loss | largest over the gradients |
| --- | ---: | ---: | ---: | ---: |
| tiny, MLPs of 64, the published runs' (folded) | 1.3e-07 | 4.6e-08 | 81.867493 vs 81.867500 | 3.3e-07 |
| tiny, linear (folded) | 1.1e-07 | 5.0e-08 | 82.014069 vs 82.014061 | 3.9e-07 |
| demo, MLPs of 64 (explicit) | 1.0e-07 | 4.8e-08 | 22.481718 vs 22.481716 | 2.1e-07 |
| demo, linear (folded) | 8.7e-08 | 4.6e-08 | 22.408968 vs 22.408968 | 5.4e-07 |

float32 rounding: the two compute the same function and the same gradients. Handing the reference the heads' noise
in the wrong order moves its gradients by 15 %, and taking the KL's sum instead of its mean moves the loss 94x.
The weight decay falls on the same tensors too: the reference's ``get_param_groups`` (read from its train.py) and
the trainer's ``timm.optim.create_optimizer_v2`` decay the same 11 of 47 (tiny) and 19 of 87 (demo) tensors, the
position embedding included (timm's ViT would exempt it).

The schedules: at the paper's length (1000 epochs, 10 of lr warm-up, 100 of beta warm-up) the trainer's learning
rate is within 0.9 % of the peak of the reference's at every update, and its beta within 0.0002 (the linear ramp is
one update ahead: ours is beta (u + 1) / W at update u, never 0). At the demo's 15 epochs with 2 of warm-up the
learning rates part by up to 12.9 % of the peak (timm's cosine counts the warm-up in its phase, the reference's
starts after it) and beta by 0.04 (a ramp of 34 updates against the reference's 34.5).
"""
import argparse
import ast
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import timm_vib

SCALES = {  # timm kwargs, latent size r, input shape
    'tiny': (dict(num_classes=5, img_size=32, patch_size=8, depth=2), 32, (4, 3, 32, 32)),
    'demo': (dict(num_classes=10, img_size=16, patch_size=2, in_chans=1, depth=4, embed_dim=48, num_heads=3), 8,
             (4, 1, 16, 16)),
}


def reference_model(models, vib_hidden: int, size: dict, vib_dim: int) -> torch.nn.Module:
    """The reference's model as its train.py builds it, on a small timm ViT-Tiny."""
    base = timm.create_model('vit_tiny_patch16_224', pretrained=False, **size)
    hidden = vib_hidden or None
    for blk in base.blocks:
        ib = models.HeadwiseVIBED(head_dim=blk.attn.head_dim, bottleneck_dim=vib_dim, num_heads=blk.attn.num_heads,
                                  hidden_enc=hidden, hidden_dec=hidden, init_logvar=-6.0, clamp=(-10, 10),
                                  small_init_dec=False)
        blk.attn = models.AttentionWithHeadIB(blk.attn, ib=ib)
    blocks = torch.nn.ModuleList([models.BlockWithAttnIB(b) for b in base.blocks])
    return models.ViTWithHeadIB(base, blocks)


def reference_function(path: Path, name: str):
    """One top-level function of a reference file, compiled alone (importing train.py initialises CUDA)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope: dict = {}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), 'exec'), scope)
    return scope[name]


def decayed(groups, names) -> set:
    """Names of the parameters in optimizer groups with weight decay."""
    return {names[id(prm)] for g in groups if g['weight_decay'] > 0 for prm in g['params']}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('reference', type=Path, help='folder with the reference code\'s models.py')
    p.add_argument('--vib-hidden', type=int, default=64, help='64: the published runs; 0: linear layers')
    p.add_argument('--scale', choices=tuple(SCALES), default='tiny')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    if not (args.reference / 'models.py').is_file():
        raise SystemExit(f'{args.reference} has no models.py: give a checkout of murphyka/vit_ib')
    sys.path.insert(0, str(args.reference))
    import models  # the reference's

    torch.manual_seed(args.seed)
    size, vib_dim, shape = SCALES[args.scale]
    ref = reference_model(models, args.vib_hidden, size, vib_dim).train()
    with torch.no_grad():  # move every bias off its init, so a misplaced one shows
        for name, prm in ref.named_parameters():
            if name.endswith('bias'):
                prm.add_(0.1 * torch.randn_like(prm))
    ours = timm.create_model('vit_tiny_vib', beta=1.0, vib_hidden=args.vib_hidden, vib_dim=vib_dim, **size).train()
    ours.load_state_dict(timm_vib.convert_reference_state_dict(ref.state_dict()))
    x, y = torch.randn(*shape), torch.randint(0, size['num_classes'], (shape[0],))

    drawn = []
    randn = torch.randn

    def recording_randn(*a, **k):
        drawn.append(randn(*a, **k))
        return drawn[-1]

    torch.randn = recording_randn
    try:
        logits, kl = ours(x, return_kl=True)  # kl: [B, depth, heads, tokens]
    finally:
        torch.randn = randn
    loss = F.cross_entropy(logits, y) + ours.beta * timm_vib.information_loss(kl)
    loss.backward()

    # the reference's order: layer by layer, head by head, each a [B * N, r] draw
    queue = [eps[:, h].reshape(-1, eps.shape[-1]) for eps in drawn for h in range(eps.shape[1])]
    randn_like = torch.randn_like
    torch.randn_like = lambda t, **k: queue.pop(0).to(t.dtype)
    try:
        ref_logits, kl_logs = ref(x)
    finally:
        torch.randn_like = randn_like
    assert not queue, f'{len(queue)} noise draws left over: the two models sample differently'
    ref_kl = torch.stack(kl_logs, dim=1)  # [B, depth, heads, tokens]
    ref_loss = F.cross_entropy(ref_logits, y) + 1.0 * torch.concat(kl_logs, dim=1).mean()
    ref_loss.backward()

    ref_grads = timm_vib.convert_reference_state_dict(
        {n: prm.grad for n, prm in ref.named_parameters() if prm.grad is not None})
    our_grads = {n: prm.grad for n, prm in ours.named_parameters()}
    assert set(ref_grads) == set(our_grads), set(ref_grads) ^ set(our_grads)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    print(f'{args.scale} scale, vib_hidden {args.vib_hidden}, seed {args.seed}: folded projections '
          f'{ours.blocks[0].attn.can_fold}, {len(drawn)} layers of noise shared, {len(our_grads)} parameter tensors')
    print(f'logits   max |diff| {(logits - ref_logits).abs().max().item():.2e}   relative {rel(logits, ref_logits):.2e}')
    print(f'KL       max |diff| {(kl - ref_kl).abs().max().item():.2e} nats   relative {rel(kl, ref_kl):.2e}  '
          f'(mean {ref_kl.mean().item():.3f} nats per head and token)')
    print(f'loss     {loss.item():.6f} (ours)   {ref_loss.item():.6f} (reference)')
    worst = max(our_grads, key=lambda n: rel(our_grads[n], ref_grads[n]))
    print(f'gradients: largest relative difference {rel(our_grads[worst], ref_grads[worst]):.2e} ({worst})')

    # weight decay: the reference's get_param_groups against the trainer's timm optimizer factory
    if (args.reference / 'train.py').is_file():
        from timm.optim import create_optimizer_v2
        get_param_groups = reference_function(args.reference / 'train.py', 'get_param_groups')
        ref_names = {id(prm): n for n, prm in ref.named_parameters()}
        ref_decayed_names = decayed(get_param_groups(ref, 0.05), ref_names)
        converted = timm_vib.convert_reference_state_dict(dict(ref.named_parameters()))
        # our name of each reference tensor: 'vit.' + name, a bottleneck's per-head layers under '.attn.ib.'
        ref_decayed = {k for k in converted if '.attn.vib.' not in k and 'vit.' + k in ref_decayed_names}
        if any('.attn.ib.' in n for n in ref_decayed_names):
            ref_decayed |= {k for k in converted if '.attn.vib.' in k}
        our_names = {id(prm): n for n, prm in ours.named_parameters()}
        our_decayed = decayed(create_optimizer_v2(ours, 'adamw', lr=1e-3, weight_decay=0.05).param_groups, our_names)
        print(f'weight decay on {len(our_decayed)} of {len(our_names)} tensors; the same set as the reference\'s: '
              f'{our_decayed == ref_decayed}' + ('' if our_decayed == ref_decayed else
                                                 f' (differ: {sorted(our_decayed ^ ref_decayed)})'))

        schedules(args.reference / 'train.py')


def schedules(train_py: Path) -> None:
    """The learning rate and beta of every update: the reference's lists against the trainer's timm scheduler
    (created with the trainer's arguments) and ``timm_vib.training.beta_at``."""
    import math

    from timm.scheduler import create_scheduler_v2
    from timm_vib.training import beta_at
    cosine = reference_function(train_py, 'cosine_scheduler')
    cosine.__globals__['math'] = math
    ramp = reference_function(train_py, 'linear_ramp_scheduler')
    for name, epochs, warmup, per_epoch, lr, beta_warmup in (('the paper (1000 epochs)', 1000, 10, 50, 6e-4, 100),
                                                             ('the demo (15 epochs)', 15, 2, 23, 3e-3, 1.5)):
        ref_lr = cosine(lr, 1e-6, epochs, per_epoch, warmup)
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
        sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-6,
                                       min_lr=1e-6, step_on_epochs=False, updates_per_epoch=per_epoch)
        our_lr = []
        for update in range(epochs * per_epoch):
            sched.step_update(num_updates=update)
            our_lr.append(opt.param_groups[0]['lr'])
        worst = max(abs(a - b) for a, b in zip(our_lr, ref_lr)) / lr
        w = round(beta_warmup * per_epoch)
        ref_beta = ramp(1.0, beta_warmup, epochs, per_epoch)
        beta_diff = max(abs(beta_at(1.0, u, w) - b) for u, b in enumerate(ref_beta))
        print(f'{name}: lr differs by at most {worst:.1%} of the peak; beta (1 at the end) by at most {beta_diff:.4f}')


if __name__ == '__main__':
    main()
