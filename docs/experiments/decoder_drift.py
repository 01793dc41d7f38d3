"""What a trained run's decoders do with the prior's noise: the write of a head that sends nothing (docs/spectrum.md 4m).

    python docs/experiments/decoder_drift.py RUN_DIR [RUN_DIR ...] [--draws 8192] [--per-head]

A head whose channel is closed decodes z ~ N(0, I). The MLP decoder's hidden layer h = GELU(z W1 + b1) then has
a mean hbar and a centred part h - hbar; its last layer W2 [hidden, head_dim] turns them into a constant write
and a noise write, both measured through the head's slice of the output projection (what reaches the residual
stream). If W2 grew by learning a useful constant through hbar, its rows would line up with hbar; if it
random-walks (Adam's steps on a gradient that is noise, 4f) it has no preferred input direction. The alignment
a = |W2^T hbar / |hbar||^2 / (|W2|_F^2 / hidden) tells them apart: about 1 for a W2 with no preferred direction
(a chi-square of head_dim degrees of freedom over head_dim), up to `hidden` for one aligned with hbar.

Printed per run: median, min and max of the alignment over all layers x heads, and the mean and max over heads
of the noise write's rms (per channel of the stream). ``--per-head`` adds one line per layer and head.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from timm_vib.checkpoints import load_model
from timm_vib.vision_transformer_vib import VIBAttention


def decoder_drift(run: str, draws: int, per_head: bool) -> str:
    torch.manual_seed(0)
    model = load_model(run).eval()
    attns = [m for m in model.modules() if isinstance(m, VIBAttention)]
    if not attns or not attns[0].vib.is_mlp:
        raise SystemExit(f'{run}: needs MLP bottlenecks (vib_hidden > 0) to split a decoder at its hidden layer')
    lines, align, noise_rms = [run], [], []
    with torch.no_grad():
        for i, a in enumerate(attns):
            v = a.vib
            proj = a.proj.weight.reshape(-1, v.num_heads, v.head_dim)  # [C, H, head_dim]
            z = torch.randn(draws, v.num_heads, v.vib_dim)
            h = F.gelu(torch.einsum('nhr,hrk->nhk', z, v.dec_in_weight) + v.dec_in_bias)  # [draws, H, hidden]
            hbar = h.mean(0)  # [H, hidden]
            noise = torch.einsum('nhk,hkd,chd->nhc', h - hbar, v.dec_weight, proj).pow(2).mean((0, 2)).sqrt()  # [H]
            const = torch.einsum('hk,hkd,chd->hc', hbar, v.dec_weight, proj).pow(2).mean(-1).sqrt()  # [H]
            along = torch.einsum('hk,hkd->hd', hbar / hbar.norm(dim=-1, keepdim=True), v.dec_weight).pow(2).sum(-1)
            a_h = along / (v.dec_weight.pow(2).sum((1, 2)) / v.vib_hidden)  # [H]
            align += a_h.tolist()
            noise_rms += noise.tolist()
            if per_head:
                for k in range(v.num_heads):
                    lines.append(f'  layer {i} head {k}: noise write rms {noise[k]:.4f}, constant write rms '
                                 f'{const[k]:.4f}, alignment {a_h[k]:.2f}, |hbar| {hbar[k].norm():.2f}')
    lines.append(f'  alignment median {statistics.median(align):.2f} (min {min(align):.2f}, max {max(align):.2f}) | '
                 f'noise write rms mean {statistics.mean(noise_rms):.4f}, max {max(noise_rms):.4f}')
    return '\n'.join(lines)


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--draws', type=int, default=8192, help='z draws per head')
    p.add_argument('--per-head', action='store_true')
    args = p.parse_args()
    if args.draws < 2:
        p.error('--draws must be >= 2 (the noise is a spread over draws)')
    for run in args.runs:
        print(decoder_drift(run, args.draws, args.per_head))
