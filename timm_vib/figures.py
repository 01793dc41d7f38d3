"""Figures shared by the Hub cards and the analysis report (matplotlib, saved as PNG atomically)."""
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import matplotlib

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402

__all__ = ['save_figure', 'plot_accuracy_vs_information', 'model_label', 'beta_colors']


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


def plot_accuracy_vs_information(
        summaries: List[Dict[str, Any]],
        path: Union[str, os.PathLike],
        title: Optional[str] = None,
) -> Path:
    """Top-1 against nats per image written by attention (log axis), one point per run (paper Fig. 1b).

    Bottlenecked runs are placed at their measured information, with stochastic-eval error bars
    (std over K sampled validation passes) when present; the no-attention run (0 nats) and the
    unmodified ViT (unbounded) are drawn as horizontal reference lines.
    """
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    vib = sorted((s for s in summaries if s.get('attn_mode') == 'vib'), key=lambda s: s['nats_per_image'])
    colors = beta_colors([s['beta'] for s in vib])
    xs, ys = [], []
    for s in vib:
        nats = max(s['nats_per_image'], 1e-3)  # a log axis has no zero
        st = s.get('stochastic_eval') or {}
        y, err = (st['top1_mean'], st['top1_std']) if st.get('top1_mean') is not None else (s['val_top1'], None)
        ax.errorbar(nats, y, yerr=err, fmt='o', color=colors[s['beta']], capsize=3, ms=7, label=model_label(s))
        xs.append(nats)
        ys.append(y)
    ax.plot(xs, ys, '-', color='0.7', zorder=0)
    ends = {'none': ('no attention (0 nats)', '#2b2d6e', '--'), 'plain': ('ViT, unrestricted attention', '#d4a017', '-.')}
    for s in summaries:
        if s.get('attn_mode') in ends:
            label, color, style = ends[s['attn_mode']]
            ax.axhline(s['val_top1'], color=color, ls=style, lw=1.5, label=f"{label}: {s['val_top1']:.1f}%")
    ax.set_xscale('log')
    ax.set_xlabel('information written by attention (nats per image, log scale)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title or 'Accuracy vs information across the spectrum')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    return save_figure(fig, path)
