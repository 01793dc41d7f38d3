"""Figures shared by the Hub cards and the analysis report (matplotlib, saved as PNG atomically)."""
import io
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402
from .runs import run_top1  # noqa: E402

__all__ = ['save_figure', 'plot_accuracy_vs_information', 'model_label', 'beta_colors', 'seed_stats',
           'group_by_position', 'curve_stats']


def save_figure(fig: 'plt.Figure', path: Union[str, os.PathLike], dpi: int = 130) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi, bbox_inches='tight')
    plt.close(fig)
    with atomic_write(path, 'wb') as f:
        f.write(buf.getvalue())
    return Path(path)


def model_label(summary: Dict[str, Any]) -> str:
    """'no attention', 'ViT (gap)' or 'beta=4' for a run summary."""
    mode = summary.get('attn_mode')
    if mode == 'none':
        return 'no attention'
    if mode == 'plain':
        return 'ViT (gap)'
    return f"beta={summary['beta']:g}"


def beta_colors(betas: Sequence[float]) -> Dict[float, Any]:
    """One colour per beta on a log scale (viridis: high beta dark like the paper's no-attention end,
    low beta yellow like its unmodified ViT)."""
    betas = sorted(set(float(b) for b in betas))
    cmap = plt.get_cmap('viridis')
    pos = [b for b in betas if b > 0]
    lo, hi = (np.log10(min(pos)), np.log10(max(pos))) if pos else (0.0, 1.0)
    out = {}
    for b in betas:
        t = 0.0 if b == 0 else (np.log10(b) - lo) / (hi - lo) if hi > lo else 0.5
        out[b] = cmap(0.15 + 0.7 * (1 - t))
    return out


def seed_stats(values: Sequence[float]) -> tuple:
    """(mean, std over seeds with ddof=1; None for a single seed) of a list of per-seed values."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def curve_stats(
        curves: Sequence[Sequence[Dict[str, Any]]],
        key: str = 'val_top1',
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """A metric's learning curve over seeds: (epochs [E], mean [E], std [E] with ddof=1, or None for one run).

    ``curves`` holds each run's metrics.jsonl rows; only the epochs where every run logged a finite ``key``
    count (a run still training, or one without that metric, shortens the curve, never shifts it).
    """
    if not curves:
        raise ValueError('no runs to draw a learning curve from')
    per_run = [{int(r['epoch']): float(r[key]) for r in c if r.get(key) is not None and np.isfinite(r[key])}
               for c in curves]
    epochs = sorted(set.intersection(*(set(d) for d in per_run)))
    v = np.array([[d[e] for e in epochs] for d in per_run], dtype=float).reshape(len(per_run), len(epochs))
    return (np.array(epochs, dtype=int), v.mean(0) if epochs else np.zeros(0),
            v.std(0, ddof=1) if len(per_run) > 1 else None)


def _position(summary: Dict[str, Any]) -> tuple:
    return summary.get('attn_mode'), float(summary.get('beta') or 0.0)


def group_by_position(items: Sequence[Any], key: Callable[[Any], tuple] = _position) -> List[List[Any]]:
    """Items (run summaries, or whatever ``key`` reads) grouped by their place on the spectrum
    (attention mode, beta): one group per model, holding its runs over seeds, in the order first met."""
    groups: Dict[tuple, List[Any]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def plot_accuracy_vs_information(
        summaries: List[Dict[str, Any]],
        path: Union[str, os.PathLike],
        title: Optional[str] = None,
) -> Path:
    """Top-1 against nats per image written by attention (log axis), one point per model (paper Fig. 1b).

    With one run per model, bottlenecked runs are placed at their measured information, with
    stochastic-eval error bars (std over K sampled validation passes) when present. With several
    seeds per model, each point is the mean over seeds with std-over-seeds error bars in both
    directions (the paper's Fig. 1b). The no-attention run (0 nats) and the unmodified ViT
    (unbounded) are horizontal reference lines (a band of ± std over seeds when there are several).
    A run's top-1 is :func:`~timm_vib.runs.run_top1`.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    groups = group_by_position(summaries)
    vib = sorted((g for g in groups if g[0].get('attn_mode') == 'vib'),
                 key=lambda g: seed_stats([s['nats_per_image'] for s in g])[0])
    colors = beta_colors([g[0]['beta'] for g in vib])
    xs, ys = [], []
    for g in vib:
        nats, nats_sd = seed_stats([s['nats_per_image'] for s in g])
        nats = max(nats, 1e-3)  # a log axis has no zero
        st = g[0].get('stochastic_eval') or {}
        if len(g) > 1:
            y, err = seed_stats([run_top1(s) for s in g])
            label = f'{model_label(g[0])} ({len(g)} seeds)'
        else:
            y, err = run_top1(g[0]), st.get('top1_std')
            nats_sd, label = None, model_label(g[0])
        ax.errorbar(nats, y, yerr=err, xerr=nats_sd, fmt='o', color=colors[g[0]['beta']], capsize=3, ms=7, label=label)
        xs.append(nats)
        ys.append(y)
    ax.plot(xs, ys, '-', color='0.7', zorder=0)
    ends = {'none': ('no attention (0 nats)', '#2b2d6e', '--'), 'plain': ('ViT, unrestricted attention', '#d4a017', '-.')}
    for g in groups:
        if g[0].get('attn_mode') in ends:
            label, color, style = ends[g[0]['attn_mode']]
            y, sd = seed_stats([run_top1(s) for s in g])
            text = f'{label}: {y:.1f}%' + (f' ± {sd:.1f} ({len(g)} seeds)' if sd is not None else '')
            ax.axhline(y, color=color, ls=style, lw=1.5, label=text)
            if sd is not None:
                ax.axhspan(y - sd, y + sd, color=color, alpha=0.12, lw=0)
    ax.set_xscale('log')
    ax.set_xlabel('information written by attention (nats per image, log scale)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title or 'Accuracy vs information across the spectrum')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    return save_figure(fig, path)
