"""What each attention head writes into the residual stream of a trained run, split into signal and noise
(docs/spectrum.md, section 4c, the learning-rate table).

    python docs/experiments/head_writes.py RUN_DIR [RUN_DIR ...] [--images 128] [--samples 8]

For the first validation images, every bottleneck samples z (``stochastic_eval``) and the model runs
``--samples`` times. A head's write is its decoded output through its slice of the output projection
(what it adds to the residual stream), [samples, B, tokens, C]. Printed per layer: the rms of the block's
input (the residual stream), then per head ``signal/noise``: the rms over images of the write averaged over
the samples, and the rms of its spread over the samples. For a head that sends nothing the signal column is
the noise divided by sqrt(samples) (the average of S draws keeps that much of the noise).
"""
import argparse

import torch

from timm_vib.checkpoints import load_model
from timm_vib.data import load_run_dataset
from timm_vib.vision_transformer_vib import VIBAttention


def head_writes(run: str, n_images: int, samples: int) -> str:
    torch.manual_seed(0)
    model = load_model(run).eval().set_stochastic_eval(True)
    ds = load_run_dataset(run)
    x = torch.stack([ds[i][0] for i in range(min(n_images, len(ds)))])
    attns = [m for m in model.modules() if isinstance(m, VIBAttention)]
    if not attns:
        raise SystemExit(f'{run}: no bottlenecked attention to measure')
    z = {i: [] for i in range(len(attns))}
    resid = {i: [] for i in range(len(attns))}
    hooks = [a.vib.register_forward_hook(lambda m, inp, out, i=i: z[i].append(out[0])) for i, a in enumerate(attns)]
    hooks += [b.register_forward_hook(lambda m, inp, out, i=i: resid[i].append(inp[0])) for i, b in enumerate(model.blocks)]
    lines = [run]
    with torch.no_grad():
        for _ in range(samples):
            model(x)
        for i, a in enumerate(attns):
            zs = torch.stack(z[i])  # [S, B, H, N, r]
            dec = a.vib.decode(zs.flatten(0, 1)).unflatten(0, zs.shape[:2])  # [S, B, H, N, head_dim]
            w = torch.einsum('sbhnd,chd->sbhnc', dec, a.proj.weight.reshape(-1, a.num_heads, a.head_dim))
            noise = w.var(0).mean(dim=(0, 2, 3)).sqrt()  # [H]
            signal = w.mean(0).var(dim=(0, 2)).mean(-1).sqrt()
            rms = torch.stack(resid[i]).pow(2).mean().sqrt()
            heads = ' '.join(f'{s:.3f}/{n:.3f}' for s, n in zip(signal, noise))
            lines.append(f'  layer {i}: residual rms {rms:.2f} | signal/noise per head {heads}')
    for h in hooks:
        h.remove()
    return '\n'.join(lines)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--images', type=int, default=128)
    p.add_argument('--samples', type=int, default=8)
    a = p.parse_args()
    if a.images < 1 or a.samples < 2:
        p.error('--images must be >= 1 and --samples >= 2 (the noise is a spread over samples)')
    for run in a.runs:
        print(head_writes(run, a.images, a.samples))
