"""Learning curves of a demo trained for longer: top-1 at a few epochs and at the end, mean ± std over seeds,
and a figure of the curves (docs/spectrum.md, section 4d).

    timm-vib demo --epochs 90 --beta-warmup-epochs 9 --pos-embed-init trunc_normal --output runs/long90  # ~45 min
    timm-vib demo --epochs 90 --beta-warmup-epochs 9 --pos-embed-init trunc_normal --vib-logvar-init -6 \
        --betas 10,0.01 --no-ends --seeds 0 --output runs/long90_m6                        # the reference's start
    python docs/experiments/long_runs.py runs/long90/runs docs/figures/spectrum_90_epochs.png \
        --extra 'beta 10, logvar init -6 (reference)=runs/long90_m6/runs/seed0/vit_tiny_vib_b10' \
        --extra 'beta 0.01, logvar init -6 (reference)=runs/long90_m6/runs/seed0/vit_tiny_vib_b0p01'

(`--pos-embed-init trunc_normal`: section 4d was measured with timm's position init, before the demo started
from the sin-cos embedding.) ROOT is a demo's or sweep's runs folder (seed<S>/<model>); each --extra 'LABEL=RUN_DIR' adds one run, drawn dotted.
"""
import argparse
import statistics as st
from pathlib import Path
from typing import List, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from timm_vib.figures import curve_stats, seed_stats  # noqa: E402
from timm_vib.runs import is_finished, read_metrics, read_summary  # noqa: E402

MODELS = [('no attention', 'vit_tiny_noattn'), ('beta 10', 'vit_tiny_vib_b10'), ('beta 1', 'vit_tiny_vib_b1'),
          ('beta 0.01', 'vit_tiny_vib_b0p01'), ('ViT (gap)', 'vit_tiny_gap')]


def _mean_std(xs: List[float], fmt: str = '{:.1f}') -> str:
    if not xs:
        return '-'
    mean, std = seed_stats(xs)
    return fmt.format(mean) + ('' if std is None else ' ± ' + fmt.format(std))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('root', type=Path)
    p.add_argument('figure', type=Path, nargs='?')
    p.add_argument('--at', default='15,30', help='epochs to tabulate besides the last')
    p.add_argument('--extra', action='append', default=[], metavar='LABEL=RUN_DIR')
    args = p.parse_args()
    groups: List[Tuple[str, List[Path], str]] = [
        (label, sorted(d for d in args.root.glob(f'seed*/{name}') if is_finished(d)), '-') for label, name in MODELS]
    for e in args.extra:
        label, sep, run = e.partition('=')
        if not sep or not is_finished(run):
            p.error(f"--extra takes 'LABEL=RUN_DIR' naming a finished run, got {e!r}")
        groups.append((label, [Path(run)], ':'))
    at = [int(e) for e in args.at.split(',')]
    print('| model | ' + ' | '.join(f'top-1 at epoch {e}' for e in at) + ' | top-1 at the end | nats / image (end) '
          '| active heads (end) | seeds |')
    print('| --- ' * (len(at) + 5) + '|')
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, dirs, ls) in enumerate(groups):
        if not dirs:
            continue
        summaries, curves = [read_summary(d) for d in dirs], [read_metrics(d) for d in dirs]
        vib = summaries[0].get('attn_mode') == 'vib'  # the ends have no bottleneck: no nats, no heads
        ls = ls if vib else '--'
        nats = [s['nats_per_image'] for s in summaries if s.get('nats_per_image') is not None]
        heads = [s['num_active_heads'] for s in summaries if s.get('num_active_heads') is not None]
        cells = [_mean_std([c[e - 1]['val_top1'] for c in curves]) for e in at]
        cells += [_mean_std([s['val_top1'] for s in summaries]), _mean_std(nats, '{:.3g}') if vib else '-',
                  f'{st.mean(heads):.1f}/{summaries[0]["depth"] * summaries[0]["num_heads"]} '
                  f'({", ".join(map(str, heads))})' if vib else '-', str(len(dirs))]
        print(f'| {label} | ' + ' | '.join(cells) + ' |')
        epochs, top1, _ = curve_stats(curves)
        axes[0].plot(epochs, top1, ls, color=f'C{i}', label=label)
        if vib:
            epochs, nats_curve, _ = curve_stats(curves, 'nats_per_image')
            axes[1].semilogy(epochs, np.maximum(nats_curve, 1e-4), ls, color=f'C{i}', label=label)
    if args.figure:
        axes[0].axvline(15, color='grey', lw=0.5)
        axes[0].set_xlabel('epoch'); axes[0].set_ylabel('validation top-1 (%), mean over seeds')  # noqa: E702
        axes[1].set_xlabel('epoch'); axes[1].set_ylabel('nats per image (validation)')  # noqa: E702
        axes[0].legend(fontsize=8, loc='lower right'); axes[1].legend(fontsize=8, loc='center right')  # noqa: E702
        fig.suptitle("the demo's settings trained for longer (grey line: the demo's 15 epochs)")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=110)


if __name__ == '__main__':
    main()
