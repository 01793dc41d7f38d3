"""How much top-1 the sampled writes cost a trained run at evaluation (docs/spectrum.md, section 5).

    python docs/experiments/mean_writes.py RUN_DIR [RUN_DIR ...] [--samples 32] [--passes 3]

Top-1 on the run's validation set twice: as the demo validates (every bottleneck samples z, the mean of
``--passes`` passes), and with every head's write replaced by its expectation over z, E_z[dec(z)] for
z ~ N(mu, sigma^2) of each image and token, estimated with ``--samples`` draws. The second keeps what each head
sends on average and removes the sampling noise the decoders add to the residual stream, so the difference is
what that noise costs the trained function; a run that is worse in both is worse in what it learnt. Also printed:
the rms of each layer's decoder last-layer weights (small_init_dec starts them at 1e-4).
"""
import argparse

import numpy as np
import torch

from timm_vib.checkpoints import load_model
from timm_vib.data import load_run_dataset
from timm_vib.vision_transformer_vib import VIBAttention


def top1(model: torch.nn.Module, loader, passes: int) -> float:
    accs = []
    with torch.no_grad():
        for _ in range(passes):
            hits = n = 0
            for x, y in loader:
                hits += (model(x).argmax(-1) == y).sum().item()
                n += len(y)
            accs.append(100.0 * hits / n)
    return float(np.mean(accs))


def use_mean_writes(model: torch.nn.Module, samples: int) -> None:
    """Every bottleneck's decode returns the mean of ``samples`` decoded draws from its posterior."""
    for attn in model.modules():
        if isinstance(attn, VIBAttention):
            attn.fold_projections = False  # the unfolded path calls vib.decode, which is replaced below
    for vib in model.bottlenecks():
        forward, decode = vib.forward, vib.decode

        def fwd(stats, vib=vib, forward=forward):
            z, mu, logvar = forward(stats)
            vib._posterior = (mu, logvar)
            return z, mu, logvar

        def dec(z, vib=vib, decode=decode):
            mu, logvar = vib._posterior
            sigma = torch.exp(0.5 * logvar)
            return torch.stack([decode(mu + sigma * torch.randn_like(mu)) for _ in range(samples)]).mean(0)

        vib.forward, vib.decode = fwd, dec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--samples', type=int, default=32)
    p.add_argument('--passes', type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print('| run | top-1, z sampled | top-1, mean writes | decoder last-layer weight rms per layer |')
    print('| --- | --- | --- | --- |')
    for run in args.runs:
        torch.manual_seed(0)
        model = load_model(run).eval().set_stochastic_eval(True)
        if not model.bottlenecks():
            raise SystemExit(f'{run}: no bottlenecked attention to measure')
        loader = torch.utils.data.DataLoader(load_run_dataset(run), batch_size=256)
        sampled = top1(model, loader, args.passes)
        rms = ' '.join(f'{float(v.dec_weight.detach().pow(2).mean().sqrt()):.3f}' for v in model.bottlenecks())
        use_mean_writes(model, args.samples)
        mean = top1(model, loader, 1)
        print(f'| {run} | {sampled:.1f} | {mean:.1f} | {rms} |', flush=True)


if __name__ == '__main__':
    main()
