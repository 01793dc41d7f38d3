"""Dissect a set of finished runs: figures (paper Figs. 1-7 and the query-key SVD), captions with
the numbers that matter, and a self-contained ``index.html`` with its markdown twin ``index.md``.

``analyze(run_dirs, out)`` works for any runs sharing a validation set: the demo's tiny digits
spectrum or full-scale ImageNet-100 runs. Every estimator streams over a DataLoader of at most
``max_images`` validation images, so memory stays bounded whatever the run. Information in nats.
"""
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .figures import (beta_colors, curve_stats, group_by_position, model_label, plot_accuracy_vs_information, plt,
                      save_figure, seed_stats)
from .files import atomic_write_json, atomic_write_text, move_into, staging_folder
from .runs import run_top1

__all__ = ['Run', 'load_runs', 'analyze', 'fmt_top1', 'fmt_run_top1', 'fmt_nats', 'head_label', 'FIGURES']

PathLike = Union[str, os.PathLike]

# file name stem of each figure, in report order
FIGURES = ['fig1_accuracy_vs_information', 'fig2_patch_voting', 'fig3_kl_maps', 'fig4_survival_active_heads',
           'fig5_top_patches', 'fig6_repetition_probe', 'fig7_nmi_matrix', 'fig8_js_divergence', 'fig9_qk_svd',
           'fig10_learning_curves']
END_COLORS = {'none': '#2b2d6e', 'plain': '#d4a017'}  # the paper's no-attention blue and ViT yellow


def fmt_top1(v: Optional[float]) -> str:
    """Top-1 as written in captions and tables: '93.1%'."""
    return '-' if v is None else f'{v:.1f}%'


def fmt_run_top1(summary: Dict[str, Any]) -> str:
    """A run's top-1 as tables write it: :func:`~timm_vib.runs.run_top1`, with the std over its sampled
    validation passes where it made them ('59.4% ± 1.2')."""
    st = summary.get('stochastic_eval') or {}
    return fmt_top1(run_top1(summary)) + (f" ± {st['top1_std']:.1f}" if st.get('top1_std') is not None else '')


def fmt_nats(v: Optional[float]) -> str:
    """Nats as written in captions and tables: 3 significant digits ('12.3', '0.0412')."""
    return '-' if v is None else f'{v:.3g}'


def head_label(layer: int, head: int) -> str:
    """'layer.head', the paper's head naming (block 0 first)."""
    return f'{layer}.{head}'


@dataclass(eq=False)
class Run:
    """A finished run: its folder, ``summary.json`` and (loaded on first use) its model in eval mode."""
    dir: Path
    summary: Dict[str, Any]
    _model: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return model_label(self.summary)

    @property
    def mode(self) -> str:
        return self.summary.get('attn_mode', 'vib')

    @property
    def beta(self) -> float:
        return float(self.summary.get('beta') or 0.0)

    @property
    def seed(self) -> int:
        return int(self.summary.get('seed') or 0)

    @property
    def active(self) -> List[Tuple[int, int]]:
        """Active heads from the run's own measurement (KL > 1e-2 nats on some validation patch)."""
        return [tuple(int(i) for i in h.split('.')) for h in (self.summary.get('active_heads') or [])]

    def model(self, device: str = 'cpu'):
        if self._model is None:
            from .checkpoints import load_model
            self._model = load_model(self.dir).to(device).eval()
        return self._model


def _order(run: Run) -> Tuple[int, float, int]:
    # along the spectrum: no attention, then decreasing beta (more information), then the plain ViT;
    # seeds in order within each model
    return {'none': (0, 0.0), 'plain': (2, 0.0)}.get(run.mode, (1, -run.beta)) + (run.seed,)


def seed_groups(runs: Sequence[Run]) -> List[List[Run]]:
    """Runs grouped by model along the spectrum (mode, beta), each group its runs over seeds."""
    return group_by_position(sorted(runs, key=_order), key=lambda r: (r.mode, r.beta))


def load_runs(run_dirs: Sequence[PathLike]) -> List[Run]:
    """Finished runs (a folder with ``summary.json``, or a sweep folder holding such runs), ordered
    along the spectrum: no attention, beta high to low, plain ViT."""
    from .runs import find_runs
    dirs: List[Path] = []
    for d in map(Path, run_dirs):
        if (d / 'summary.json').is_file():
            dirs.append(d)
        elif d.is_dir() and find_runs(d):
            dirs += find_runs(d)
        else:
            raise FileNotFoundError(f'{d} is neither a finished run (no summary.json) nor a folder of finished runs')
    runs = [Run(d, json.loads((d / 'summary.json').read_text())) for d in dict.fromkeys(dirs)]
    return sorted(runs, key=_order)


# --- data ---------------------------------------------------------------------------------------

def _val_data(runs: List[Run], max_images: int):
    """(normalised val dataset capped at max_images, its spec): the same images for every run."""
    from .data import load_run_dataset
    ds = load_run_dataset(runs[0].dir, 'val')
    sizes = {(r.summary.get('img_size'), r.summary.get('dataset')) for r in runs}
    if len(sizes) > 1:
        raise ValueError(f'runs differ in dataset or image size {sorted(map(str, sizes))}: analyse them separately')
    n = min(len(ds), max_images)
    sub = torch.utils.data.Subset(ds, range(n))  # first n in the fixed validation order
    return sub, ds.spec


def _loader(ds, batch_size: int):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def _images(ds, idx: Sequence[int]) -> torch.Tensor:
    return torch.stack([ds[int(i)][0] for i in idx])


def _show(x: torch.Tensor, spec) -> np.ndarray:
    """[3, H, W] normalised -> [H, W, 3] in [0, 1] for imshow."""
    from .data import denormalize
    return denormalize(x[None], spec.mean, spec.std)[0].permute(1, 2, 0).cpu().numpy()


# --- figures ------------------------------------------------------------------------------------

def _color(run: Run, colors: Dict[float, Any]):
    return END_COLORS.get(run.mode) or colors[run.beta]


def fig_accuracy(runs: List[Run], path: Path) -> str:
    plot_accuracy_vs_information([r.summary for r in runs], path,
                                 title='Accuracy vs information written by attention (Fig. 1b)')
    parts = []
    groups = seed_groups(runs)
    for g in groups:
        r, s = g[0], g[0].summary
        if len(g) > 1:  # mean ± std over seeds (ddof 1), as the paper reports
            top1, top1_sd = seed_stats([run_top1(x.summary) for x in g])
            info = ''
            if r.mode == 'vib':
                nats, nats_sd = seed_stats([x.summary['nats_per_image'] for x in g])
                info = f" at {fmt_nats(nats)} ± {fmt_nats(nats_sd)} nats/image"
            parts.append(f"{r.label}: {fmt_top1(top1)} ± {top1_sd:.1f}{info}")
            continue
        st = s.get('stochastic_eval') or {}
        sd = f" ± {st['top1_std']:.1f} over {st['k']} sampled passes" if st.get('top1_std') is not None else ''
        info = '' if r.mode != 'vib' else f" at {fmt_nats(s['nats_per_image'])} nats/image"
        parts.append(f"{r.label}: {fmt_top1(run_top1(s))}{sd}{info}")
    seeds = sorted({r.seed for r in runs})
    over = f' (mean ± std over seeds {", ".join(map(str, seeds))})' if any(len(g) > 1 for g in groups) else ''
    return f'Validation top-1 vs nats per image written by attention{over}: ' + '; '.join(parts) + '.'


def fig_voting(groups: List[List[Run]], loader, path: Path, colors) -> str:
    """Patch voting (Fig. 1c): one dot per validation image for each model's first run; the caption gives each
    model's median inverse Simpson index and logit range, mean ± std over its seeds where it has several."""
    from .estimators import patch_voting
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    parts = []
    for g in groups:
        medians = []
        for i, r in enumerate(g):
            simpson, rng = patch_voting(r.model(), loader)
            s, lr = simpson.numpy(), rng.numpy()
            ms, ml = float(np.median(s)), float(np.median(lr))
            medians.append((ms, ml))
            if i:
                continue
            ax.scatter(lr, s, s=7, alpha=0.35, color=_color(r, colors), edgecolors='none')
            ax.errorbar(ml, ms, xerr=[[ml - np.percentile(lr, 25)], [np.percentile(lr, 75) - ml]],
                        yerr=[[ms - np.percentile(s, 25)], [np.percentile(s, 75) - ms]], fmt='o', ms=8,
                        color=_color(r, colors), mec='k', capsize=3, label=r.label)
        (ms, ms_sd), (ml, ml_sd) = seed_stats([m[0] for m in medians]), seed_stats([m[1] for m in medians])
        parts.append(f'{g[0].label}: {ms:.2f}' + ('' if ms_sd is None else f' ± {ms_sd:.2f}') + f' / {ml:.1f}'
                     + ('' if ml_sd is None else f' ± {ml_sd:.1f}'))
    seeds = sorted({r.seed for g in groups for r in g})
    several = any(len(g) > 1 for g in groups)
    ax.set_xlabel('logit range over patches and classes (max - min)')
    ax.set_ylabel('inverse Simpson index of patch votes\n(effective number of classes voted for)')
    ax.set_title('Patch voting, one dot per validation image (Fig. 1c)' + (f', seed {groups[0][0].seed}' if several else ''))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title='median, IQR', title_fontsize=8)
    save_figure(fig, path)
    over = f' (mean ± std over seeds {", ".join(map(str, seeds))})' if several else ''
    return (f'Patch voting per image; median inverse Simpson index / logit range{over}: ' + '; '.join(parts)
            + '. An index near 1 means the patches agree on one class; near the number of classes, they vote independently.')


def _js_to_ends(runs: List[Run], loader) -> Dict[str, Dict[str, torch.Tensor]]:
    """JS divergence (nats) per image of every run to the no-attention and plain ends present."""
    from .estimators import compare_models
    ends = {r.mode: r for r in runs if r.mode in ('none', 'plain')}
    return {mode: {r.label: compare_models(r.model(), end.model(), loader) for r in runs}
            for mode, end in ends.items()}


def _pick_images(runs: List[Run], js, ds, k: int) -> Tuple[List[int], str]:
    """Up to k images for KL maps: among the 10% where the two ends disagree most (JS), as the paper
    (its random sample; here the top ones, deterministic); else the first k."""
    from .estimators import top_fraction
    noattn = next((r for r in runs if r.mode == 'none'), None)
    if 'none' in js and noattn is not None and any(r.mode == 'plain' for r in runs):
        gap = next(r for r in runs if r.mode == 'plain')
        scores = js['none'][gap.label]
        idx = top_fraction(scores, 0.1)[:k].tolist()
        return idx, 'among the 10% of images where the no-attention model and the ViT disagree most (JS)'
    return list(range(min(k, len(ds)))), 'the first validation images'


def fig_kl_maps(runs: List[Run], ds, spec, idx: List[int], why: str, path: Path) -> str:
    from .estimators import capture, kl_map
    vib = [r for r in runs if r.mode == 'vib']
    x = _images(ds, idx)
    maps = []
    for r in vib:
        m = r.model()
        with torch.no_grad(), capture(m) as rec:
            m(x)
            maps.append(kl_map(rec.kl, rec.grid_size, rec.num_prefix_tokens).numpy())  # [k, rows, cols] nats
    n, c = len(idx), len(vib) + 1
    fig, axes = plt.subplots(n, c, figsize=(1.55 * c + 0.6, 1.55 * n + 0.9), squeeze=False, layout='constrained')
    for i in range(n):
        axes[i, 0].imshow(_show(x[i], spec), interpolation='nearest')
        axes[i, 0].set_ylabel(f'image {idx[i]}\nclass {spec.classes[int(ds[idx[i]][1])]}', fontsize=7)
        for j, mp in enumerate(maps):
            vmax = max(float(mp.max()), 1e-6)  # one colour range per model (column), as the paper
            im = axes[i, j + 1].imshow(mp[i], cmap='magma', vmin=0, vmax=vmax, interpolation='nearest')
            if i == n - 1:
                cb = fig.colorbar(im, ax=axes[:, j + 1].tolist(), orientation='horizontal', fraction=0.04, pad=0.02)
                cb.ax.tick_params(labelsize=6)
                cb.set_label('nats / patch', fontsize=6)
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    axes[0, 0].set_title('image', fontsize=8)
    for j, r in enumerate(vib):
        axes[0, j + 1].set_title(r.label, fontsize=8)
    fig.suptitle('Per-patch KL summed over all heads (Fig. 2)', fontsize=10)
    save_figure(fig, path)
    peaks = '; '.join(f'{r.label}: {fmt_nats(float(mp.max()))}' for r, mp in zip(vib, maps))
    return (f'Per-patch KL (nats, summed over layers and heads) for {n} images {why}; '
            f'largest patch per model: {peaks}.')


def fig_survival(runs: List[Run], loader, path: Path) -> str:
    from .estimators import survival_function
    vib = [r for r in runs if r.mode == 'vib']
    n = len(vib)
    fig, axes = plt.subplots(2, n, figsize=(2.7 * n + 0.4, 5.6), squeeze=False, layout='constrained',
                             gridspec_kw={'height_ratios': [2.2, 1]})
    parts = []
    for j, r in enumerate(vib):
        x, surv = survival_function(r.model(), loader)
        D, H, _ = surv.shape
        active = set(r.active)
        ax = axes[0, j]
        xs = x.clamp_min(1e-4).numpy()
        styles = ['-', '--', ':', '-.']
        for l in range(D):
            for h in range(H):
                on = (l, h) in active  # colour: layer; line style: head; inactive heads faint
                ax.plot(xs, surv[l, h].numpy(), ls=styles[h % 4], lw=1.4 if on else 0.8, alpha=0.95 if on else 0.35,
                        color=plt.get_cmap('viridis')(l / max(1, D - 1) * 0.9),
                        label=f'block {l}' if h == 0 and j == 0 else None)
        ax.set_xscale('log')
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(r.label, fontsize=9)
        ax.set_xlabel('x (nats)', fontsize=8)
        ax.axvline(1e-2, color='r', ls=':', lw=0.8)
        if j == 0:
            ax.set_ylabel('P(KL >= x) over validation patches', fontsize=8)
        if j == 0:
            heads = ', '.join(f'{h} {styles[h % 4]}' for h in range(min(H, 4))) + (' (then again)' if H > 4 else '')
            ax.legend(fontsize=6, title=f'colour: block\nstyle: head {heads}', title_fontsize=6)
        grid = np.zeros((D, H))
        for l, h in active:
            grid[l, h] = 1
        g = axes[1, j]
        g.imshow(grid, cmap='Greys', vmin=0, vmax=1.4, origin='lower', aspect='auto')
        g.set_xticks(range(H))
        g.set_yticks(range(D))
        g.set_xlabel('head', fontsize=8)
        if j == 0:
            g.set_ylabel('block (0 at bottom)', fontsize=8)
        g.tick_params(labelsize=7)
        for l in range(D + 1):
            g.axhline(l - 0.5, color='0.8', lw=0.5)
        for h in range(H + 1):
            g.axvline(h - 0.5, color='0.8', lw=0.5)
        for l in range(D):  # the head's mean KL per patch, nats
            for h in range(H):
                g.text(h, l, f"{r.summary['head_kl'][l][h]:.2g}", ha='center', va='center', fontsize=6,
                       color='w' if (l, h) in active else 'k')
        g.set_title(f'{len(active)} of {D * H} heads active (mean nats/patch)', fontsize=8)
        parts.append(f"{r.label}: {len(active)} active heads" + (f": {', '.join(r.summary['active_heads'])}" if active else ''))
    fig.suptitle('Survival of per-patch KL per head (top; red: 0.01 nats) and active heads (bottom, black) (Fig. 3)',
                 fontsize=10)
    save_figure(fig, path)
    return ('Survival function P(KL >= x) of per-patch KL for every head; a head is active when it sends more than '
            '0.01 nats to some validation patch. ' + '; '.join(parts) + '.')


def _no_figure(path: Path, why: str) -> None:
    """A one-line figure saying why there is nothing to plot (the report links every figure)."""
    fig, ax = plt.subplots(figsize=(5, 1))
    ax.axis('off')
    ax.text(0.5, 0.5, why, ha='center', va='center')
    save_figure(fig, path)


def _restricted(runs: List[Run]) -> List[Run]:
    """Bottlenecked runs with at least one active head, most restricted (highest beta) first."""
    return [r for r in runs if r.mode == 'vib' and r.active]


def _most_active_head(r: Run) -> Tuple[int, int]:
    kl = r.summary['head_kl']
    return max(r.active, key=lambda lh: kl[lh[0]][lh[1]])


def fig_top_patches(runs: List[Run], loader, ds, spec, path: Path, k: int = 8) -> str:
    from .estimators import top_patches
    cand = _restricted(runs)
    if not cand:
        _no_figure(path, 'no bottlenecked model has an active head')
        return 'No bottlenecked model has an active head: nothing to show.'
    r = cand[0]
    layer, head = _most_active_head(r)
    tp = top_patches(r.model(), loader, layer, head, k=k)
    ph = spec.img_size // r.model().patch_embed.grid_size[0]
    k = len(tp.score)
    fig, axes = plt.subplots(2, k, figsize=(1.4 * k, 3.2), squeeze=False)
    for i in range(k):
        img = _show(ds[int(tp.image[i])][0], spec)
        row, col = int(tp.row[i]), int(tp.col[i])
        axes[0, i].imshow(img, interpolation='nearest')
        axes[0, i].set_title(f'{float(tp.score[i]):.3g} nats', fontsize=7)
        axes[1, i].imshow(tp.attention[i].numpy(), cmap='viridis', interpolation='nearest')
        for a, scale in ((axes[0, i], ph), (axes[1, i], 1)):
            a.add_patch(plt.Rectangle((col * scale - 0.5, row * scale - 0.5), scale, scale, fill=False, ec='r', lw=1.5))
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_ylabel('image', fontsize=8)
    axes[1, 0].set_ylabel('attention\nof the patch', fontsize=8)
    fig.suptitle(f'{r.label}, head {head_label(layer, head)}: top {k} patches by KL (red square) (Fig. 4)', fontsize=9)
    save_figure(fig, path)
    mean_kl = r.summary['head_kl'][layer][head]
    return (f'{r.label}, head {head_label(layer, head)} (its most active head, mean {fmt_nats(mean_kl)} nats/patch): '
            f'the {k} validation patches it spends most on ({fmt_nats(float(tp.score.min()))} to '
            f'{fmt_nats(float(tp.score.max()))} nats), with the head\'s attention map from that patch.')


def _copies(grid_cells: int) -> Tuple[int, ...]:
    # the paper's 4, 16, 64 copies on a 14x14 grid; scaled down on small grids
    if grid_cells > 64:
        return (4, 16, 64)
    return tuple(sorted({max(1, grid_cells // 16), max(1, grid_cells // 4), grid_cells - 1}))


def fig_repetition(runs: List[Run], ds, path: Path, n_patches: int = 256, max_heads: int = 4, seed: int = 0) -> str:
    from .estimators import repetition_probe
    heads = [(r, lh) for r in _restricted(runs)[:2] for lh in sorted(r.active, key=lambda lh: -r.summary['head_kl'][lh[0]][lh[1]])]
    heads = heads[:max_heads]
    if not heads:
        _no_figure(path, 'no active heads to probe')
        return 'No active heads: no repetition probe.'
    g = torch.Generator().manual_seed(seed)
    m0 = heads[0][0].model()
    G = int(np.prod(m0.patch_embed.grid_size))
    n = min(n_patches, len(ds))
    img_idx = torch.randperm(len(ds), generator=g)[:n]
    patches = torch.randint(0, G, (n,), generator=g)
    x = _images(ds, img_idx)
    copies = _copies(G)
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.3), squeeze=False, layout='constrained')
    parts = []
    probes = {}  # one probe per run, of all its heads: the same passes and copy locations as one per head
    for r, _ in heads:
        if r.dir not in probes:
            lhs = [lh for rr, lh in heads if rr.dir == r.dir]
            probes[r.dir] = lhs, repetition_probe(r.model(), x, patches, lhs, copies, seed=seed)
    for j, (r, (layer, head)) in enumerate(heads):
        lhs, probe = probes[r.dir]
        k = lhs.index((layer, head))
        shift, mu0 = probe.shift[:, :, k], probe.mu0[:, k]  # [P, copies, r], [P, r]
        dim = int(mu0.var(0).argmax())  # the head's most used latent dimension
        ax = axes[0, j]
        cm = plt.get_cmap('plasma')
        stats = []
        for c, nc in enumerate(copies):
            ax.scatter(mu0[:, dim], shift[:, c, dim], s=6, alpha=0.5, color=cm(0.15 + 0.7 * c / max(1, len(copies) - 1)),
                       label=f'N={nc}')
            stats.append(f'{float(shift[:, c, dim].mean()):+.3g}')
        ax.axhline(0, color='0.5', lw=0.6)
        ax.set_title(f'{r.label}, head {head_label(layer, head)}, latent dim {dim}', fontsize=8)
        ax.set_xlabel('mu_0 (original image)', fontsize=8)
        if j == 0:
            ax.set_ylabel('mu_aug - mu_0', fontsize=8)
        ax.legend(fontsize=7, title='copies', title_fontsize=7)
        parts.append(f'{r.label} head {head_label(layer, head)}: ' + ', '.join(stats))
    fig.suptitle(f'Repetition probe: a patch copied to N other places, shift of the head\'s latent mean at it '
                 f'({n} patches) (Fig. 5)', fontsize=9)
    save_figure(fig, path)
    return (f'Repetition probe on {n} random (image, patch) pairs, N = {", ".join(map(str, copies))} copies; '
            'mean shift of the most used latent dimension per N: ' + '; '.join(parts) + '.')


def fig_nmi(runs: List[Run], ds, loader, path: Path, max_heads: int = 12, max_points: int = 2048,
            n_samples: int = 20000, seed: int = 0, other_seeds: Sequence[Run] = ()) -> str:
    """``other_seeds``: the most restricted model's runs with other seeds; their most informative
    head joins the matrix, to compare the first head to open across seeds (Fig. 6a)."""
    from .estimators import iterate_records, nmi_matrix

    def ranked(r: Run) -> List[Tuple[int, int]]:
        # active heads that carry most (mean KL per patch >= 1e-3 nats: below that the Monte Carlo
        # NMI is a ratio of noise), most informative first
        kl = r.summary['head_kl']
        return sorted((lh for lh in r.active if kl[lh[0]][lh[1]] >= 1e-3), key=lambda lh: -kl[lh[0]][lh[1]])
    # per model, its most informative heads, the most restricted models first
    across = [(r, ranked(r)[0]) for r in other_seeds if ranked(r)]
    per_model = max(2, (max_heads - len(across)) // max(1, len(_restricted(runs))))
    heads = []
    for i, r in enumerate(_restricted(runs)):
        heads += [(r, lh) for lh in sorted(ranked(r)[:per_model])]
        if i == 0:
            heads += across
    heads = heads[:max_heads]
    if len(heads) < 2:
        _no_figure(path, 'fewer than two active heads: no NMI matrix')
        return f'{len(heads)} active head(s) in all: no NMI matrix.'
    # the same L data points (image, patch) for every head, streamed, subsampled at random
    params = {}
    for r in dict.fromkeys(h[0] for h in heads):
        mine = [lh for rr, lh in heads if rr is r]
        mus, lvs = [], []
        for _, rec in iterate_records(r.model(), loader):
            sl = rec.patch_tokens
            mus.append(torch.stack([rec.mu[:, l, h, sl].reshape(-1, rec.mu.shape[-1]) for l, h in mine]))  # [heads, B*N, r]
            lvs.append(torch.stack([rec.logvar[:, l, h, sl].reshape(-1, rec.mu.shape[-1]) for l, h in mine]))
        mu, lv = torch.cat(mus, 1), torch.cat(lvs, 1)  # points in (image, patch) order, same for every run
        params[id(r)] = (mine, mu, lv)
    L = next(iter(params.values()))[1].shape[1]
    pts = torch.randperm(L, generator=torch.Generator().manual_seed(seed))[:max_points]
    pairs = []
    for r, lh in heads:
        mine, mu, lv = params[id(r)]
        i = mine.index(lh)
        pairs.append((mu[i, pts].double(), lv[i, pts].double()))
    res = nmi_matrix(pairs, n_samples=n_samples, seed=seed)
    seeded = bool(across)
    names = [f'{r.label}{f" seed {r.seed}" if seeded else ""}, head {head_label(*lh)}' for r, lh in heads]
    K = len(heads)
    # I(U;U') near 0 makes the ratio meaningless: leave those heads out (named in the caption)
    self_mi, self_se = torch.diagonal(res.mutual_information), torch.diagonal(res.mutual_information_stderr)
    ok = ((self_mi > 1e-3) & (self_se < 0.25 * self_mi)).nonzero().flatten().tolist()
    dropped = [names[i] for i in range(K) if i not in ok]
    if len(ok) < 2:  # a matrix of ratios of noise would look like a result: say so instead
        _no_figure(path, f'the samples resolve the information of {len(ok)} of {K} heads: no NMI matrix')
        info = ', '.join(f'{n}: {float(res.information[i]):.3g} ± {float(res.information_stderr[i]):.2g}'
                         for i, n in enumerate(names))
        return (f"No NMI matrix: of the {K} most informative active heads, the {n_samples} samples resolve I(U;U') "
                f"(above 0.001 nats, standard error below a quarter of it) for {len(ok)}; I(X;U) in nats: {info}.")
    val = res.value[ok][:, ok].clamp(0, 1)
    se = res.stderr[ok][:, ok]
    names = [names[i] for i in ok]
    heads = [heads[i] for i in ok]
    K = len(ok)
    fig, ax = plt.subplots(figsize=(0.55 * K + 2.6, 0.5 * K + 1.8))
    cmap = plt.get_cmap('viridis')
    im = ax.imshow(val.numpy(), cmap=cmap, vmin=0, vmax=1)
    for a in range(K):
        for b in range(K):
            v = float(val[a, b])
            ax.text(b, a, 'n/a' if math.isnan(v) else f'{v:.2f}', ha='center', va='center', fontsize=6,
                    color='k' if math.isnan(v) or v > 0.6 else 'w')
    ax.set_xticks(range(K))
    ax.set_yticks(range(K))
    ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, label='NMI')
    ax.set_title(f'NMI between active heads ({len(pts)} patches, {n_samples} samples) (Fig. 6)', fontsize=9)
    save_figure(fig, path)
    cross = [(float(val[a, b]), a, b) for a in range(K) for b in range(a + 1, K)
             if heads[a][0] is not heads[b][0] and not math.isnan(float(val[a, b]))]
    best = sorted(cross, reverse=True)[:3]
    info = ', '.join(f'{n}: {float(res.information[i]):.3g}' for n, i in zip(names, ok))
    if dropped:
        info += f" (left out, I(U;U') below 0.001 nats or not resolved by the samples: {', '.join(dropped)})"
    if seeded:  # the most restricted model's most informative head, seed against seed
        r0 = _restricted(runs)[0]
        tops = [(r0, ranked(r0)[0])] + across if ranked(r0) else across
        first = [i for i, (r, lh) in enumerate(heads) if any(r is t and lh == tl for t, tl in tops)]
        pairs_txt = [f'{names[a]} ~ {names[b]}: ' + ('n/a' if math.isnan(float(val[a, b])) else f'{float(val[a, b]):.2f}')
                     for ai, a in enumerate(first) for b in first[ai + 1:]]
        if pairs_txt:
            best = [x for x in best if not (x[1] in first and x[2] in first)]
            info += f". Across seeds, the most restricted model's most informative head: {'; '.join(pairs_txt)}"
    txt = '; '.join(f'{names[a]} ~ {names[b]}: {v:.2f}±{float(se[a, b]):.2f}' for v, a, b in best)
    return (f'Normalised mutual information between {K} active heads (the most informative of the most restricted '
            f'models whose information the {n_samples} samples resolve) over {len(pts)} '
            f'patches; I(X;U) in nats: {info}. ' + (f'Most similar heads across models: {txt}.' if best else
                                                 'All heads are from one model.'))


def fig_js(runs: List[Run], js, path: Path) -> str:
    if not js:
        _no_figure(path, 'neither end of the spectrum (no attention, ViT) among the runs')
        return 'No end of the spectrum among the runs: no Jensen-Shannon comparison.'
    names = {'none': 'no attention', 'plain': 'ViT (gap)'}
    fig, axes = plt.subplots(len(js), 1, figsize=(0.9 * len(runs) + 2.5, 2.6 * len(js)), squeeze=False)
    parts = []
    for ax, (mode, per) in zip(axes[:, 0], js.items()):
        data = [per[r.label].numpy() for r in runs]
        ax.boxplot(data, showfliers=False, whis=(5, 95))
        for i, d in enumerate(data):
            ax.scatter(np.full(len(d), i + 1) + np.random.default_rng(i).uniform(-0.2, 0.2, len(d)), d, s=3,
                       alpha=0.25, color=END_COLORS[mode])
        ax.set_xticks(range(1, len(runs) + 1))
        ax.set_xticklabels([r.label for r in runs], fontsize=8)
        ax.set_ylabel(f'JS to {names[mode]}\n(nats)', fontsize=8)
        top = max(float(np.percentile(np.concatenate(data), 99)), 1e-3)
        ax.set_ylim(-0.02 * top, min(math.log(2), 1.1 * top))  # JS <= ln 2; zoom to where the data are
        ax.grid(True, axis='y', alpha=0.3)
        parts.append(f'to {names[mode]}: ' + ', '.join(f'{r.label} {float(per[r.label].median()):.3g}' for r in runs))
    axes[0, 0].set_title('Jensen-Shannon divergence of class probabilities per image, to each end (Fig. 7)', fontsize=9)
    save_figure(fig, path)
    return 'Median Jensen-Shannon divergence (nats, at most ln 2) per image ' + '; '.join(parts) + '.'


def fig_qk(runs: List[Run], path: Path, colors) -> str:
    from .estimators import qk_svd
    with_attn = [r for r in runs if r.mode in ('vib', 'plain')]
    if not with_attn:
        _no_figure(path, 'no model with attention')
        return 'No model with attention: no query-key SVD.'
    fig, ax = plt.subplots(figsize=(6, 4))
    parts = []
    for r in with_attn:
        s = qk_svd(r.model())
        lm, wm = s.layer_mean.numpy(), s.layer_weighted_mean.numpy()
        c = _color(r, colors)
        lw = 2.4 if r.mode == 'plain' else 1.3
        ax.plot(range(len(lm)), lm, '-o', color=c, lw=lw, ms=4, label=f'{r.label}')
        ax.plot(range(len(wm)), wm, ':', color=c, lw=lw * 0.8)
        parts.append(f"{r.label}: {', '.join(f'{v:+.2f}' for v in lm)}")
    ax.axhline(0, color='0.4', lw=0.7)
    ax.set_xlabel('layer')
    ax.set_ylabel('cosine(query mode u_k, key mode v_k)')
    ax.set_xticks(range(len(lm)))
    ax.set_title('Query-key SVD: mean cosine of mode pairs by layer\n(solid: mean over modes and heads; '
                 'dotted: singular-value weighted)', fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return ('Query-key SVD of W_q^T W_k per head: cosine of paired query/key singular vectors averaged per layer '
            '(+: attend to similar tokens, -: to dissimilar), layer 0 first: ' + '; '.join(parts) + '.')


def fig_curves(runs: List[Run], path: Path, colors) -> str:
    """Validation top-1 per epoch, mean ± std over seeds per model: how fast each model learns, which the
    table's end-of-training numbers mix with what it can learn."""
    from .runs import read_metrics
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    parts = []
    groups = seed_groups(runs)
    for g in groups:
        r = g[0]
        epochs, mean, sd = curve_stats([read_metrics(x.dir) for x in g])
        if len(epochs) == 0:
            continue
        color = END_COLORS.get(r.mode) or colors.get(r.beta)
        ax.plot(epochs, mean, '-', marker='o' if len(epochs) < 3 else None, color=color,
                label=r.label + (f' ({len(g)} seeds)' if len(g) > 1 else ''))
        if sd is not None:
            ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.15, lw=0)
        mid = (len(epochs) - 1) // 2
        at = [mid, len(epochs) - 1] if mid < len(epochs) - 1 else [len(epochs) - 1]
        parts.append(f'{r.label} ' + ', '.join(f'{fmt_top1(float(mean[i]))} at epoch {int(epochs[i])}' for i in at))
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title('Learning curves' + (' (mean ± std over seeds)' if any(len(g) > 1 for g in groups) else ''))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    save_figure(fig, path)
    z = {x.summary.get('eval_z') for x in runs if x.mode == 'vib'}
    how = {frozenset(): [], frozenset({'sample'}): ['z sampled in bottlenecks'],
           frozenset({'mean'}): ['posterior means in bottlenecks']}.get(frozenset(z), ['bottlenecks as each run validated'])
    if any(len(g) > 1 for g in groups):
        how.append(f'mean over seeds {", ".join(map(str, sorted({r.seed for r in runs})))}')
    return ('Validation top-1 after each epoch' + (f' ({"; ".join(how)})' if how else '') + ': ' + '; '.join(parts)
            + '. A curve that flattens as the learning rate decays need not have converged: models that climb at '
            'different speeds can end apart at one length and together at a longer one.')


# --- report -------------------------------------------------------------------------------------

def _table_rows(runs: List[Run]) -> List[Dict[str, str]]:
    groups = seed_groups(runs)
    if any(len(g) > 1 for g in groups):
        return [_seed_row(g) for g in groups]
    rows = []
    for r in runs:
        s = r.summary
        rows.append({
            'run': r.dir.name, 'model': s['model'], 'beta': '-' if r.mode != 'vib' else f"{s['beta']:g}",
            'top-1': fmt_run_top1(s),
            'nats / image': fmt_nats(s.get('nats_per_image')) if r.mode == 'vib' else ('0' if r.mode == 'none' else 'unbounded'),
            'nats / patch': fmt_nats(s.get('nats_per_patch')) if r.mode == 'vib' else ('0' if r.mode == 'none' else 'unbounded'),
            'active heads': '-' if r.mode != 'vib' else
            (f"{len(r.active)}: {', '.join(s['active_heads'])}" if r.active else '0'),
        })
    return rows


def _seed_row(g: List[Run]) -> Dict[str, str]:
    """A model's table row over its seeds: mean ± std (ddof 1) of top-1, nats and active heads."""
    r = g[0]

    def ms(values: List[float], fmt) -> str:
        m, sd = seed_stats(values)
        return fmt(m) + ('' if sd is None else f' ± {fmt(sd).rstrip("%")}')
    vib = r.mode == 'vib'
    heads = seed_stats([len(x.active) for x in g])
    return {
        'run': r.dir.name, 'model': r.summary['model'], 'beta': f'{r.beta:g}' if vib else '-',
        'seeds': ', '.join(str(x.seed) for x in g),
        'top-1': ms([run_top1(x.summary) for x in g], fmt_top1),
        'nats / image': ms([x.summary['nats_per_image'] for x in g], fmt_nats) if vib else
        ('0' if r.mode == 'none' else 'unbounded'),
        'nats / patch': ms([x.summary['nats_per_patch'] for x in g], fmt_nats) if vib else
        ('0' if r.mode == 'none' else 'unbounded'),
        'active heads': '-' if not vib else f'{heads[0]:.3g}' + ('' if heads[1] is None else f' ± {heads[1]:.2g}')
        + ' (' + ', '.join(str(len(x.active)) for x in g) + ')',
    }


def _write_index(out: Path, runs: List[Run], figures: List[Tuple[str, str, str]], meta: Dict[str, Any]) -> None:
    rows = _table_rows(runs)
    cols = list(rows[0])
    title = f"timm-vib report: {len(runs)} runs on {meta['dataset']}"
    sub = (f"{meta['images']} validation images analysed; models: depth {meta['depth']}, {meta['heads']} heads, "
           f"{meta['img_size']} px, patch {meta['patch_size']}; KL convention: {meta['kl_reduction']}. Information in nats.")
    md = [f'# {title}', '', sub, '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    md += ['| ' + ' | '.join(r[c] for c in cols) + ' |' for r in rows]
    h = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8">', f'<title>{html.escape(title)}</title>',
         '<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}'
         'table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}'
         'figure{margin:2em 0}img{max-width:100%}figcaption{margin-top:.4em}</style></head><body>',
         f'<h1>{html.escape(title)}</h1>', f'<p>{html.escape(sub)}</p>', '<table>',
         '<tr>' + ''.join(f'<th>{html.escape(c)}</th>' for c in cols) + '</tr>']
    h += ['<tr>' + ''.join(f'<td>{html.escape(r[c])}</td>' for c in cols) + '</tr>' for r in rows]
    h.append('</table>')
    for i, (name, heading, caption) in enumerate(figures, 1):
        md += ['', f'## {i}. {heading}', '', f'![{heading}]({name}.png)', '', caption]
        h += [f'<figure id="{name}"><h2>{i}. {html.escape(heading)}</h2>',
              f'<img src="{name}.png" alt="{html.escape(heading)}">',
              f'<figcaption>{html.escape(caption)}</figcaption></figure>']
    h.append('</body></html>')
    atomic_write_text(out / 'index.md', '\n'.join(md) + '\n')
    atomic_write_text(out / 'index.html', '\n'.join(h) + '\n')


def analyze(
        run_dirs: Sequence[PathLike],
        out: PathLike,
        max_images: int = 512,
        batch_size: int = 64,
        kl_map_images: int = 6,
        nmi_samples: int = 20000,
        nmi_points: int = 2048,
        probe_patches: int = 256,
        device: str = 'cpu',
        progress: bool = True,
) -> Path:
    """Write the report of ``run_dirs`` (runs or sweep folders) into ``out``: ten PNG figures,
    ``captions.json``, ``index.html`` and ``index.md``. Returns the ``index.html`` path.

    Estimators stream over at most ``max_images`` validation images (the first ones, same for every run).
    With several seeds per model (``timm-vib sweep --seeds``), the accuracy figure and the table show
    mean ± std over seeds, the NMI figure compares the most restricted model's most informative head
    across seeds, and the other figures dissect the first seed's runs.
    """
    check_device(device)
    all_runs = load_runs(run_dirs)
    if not all_runs:
        raise ValueError('no runs to analyse')
    _check_finite_runs(all_runs)
    final = Path(out)
    if final.exists() and not final.is_dir():
        raise ValueError(f'report folder {final} exists and is not a folder')
    # the report is written into a staging folder and its files renamed into place at the end: an error
    # or a kill half-way leaves the previous report (or none), never a partial one
    with staging_folder(final, STAGING_PREFIX) as staging:
        index = _analyze(all_runs, staging, max_images, batch_size, kl_map_images, nmi_samples, nmi_points,
                         probe_patches, device, progress)
        move_into(staging, final, last=index.name)
    return final / index.name


STAGING_PREFIX = '.timm-vib-report-'


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device, or a ValueError when it is not one or is not present on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'--device {device!r} is not a torch device ({e})') from None
    mps = getattr(torch.backends, 'mps', None)
    present = {'cpu': True, 'cuda': torch.cuda.is_available(), 'mps': bool(mps and mps.is_available()),
               'xpu': bool(getattr(torch, 'xpu', None) and torch.xpu.is_available())}.get(dev.type, True)
    if not present:
        raise ValueError(f'--device {device}: this machine has no {dev.type.upper()} device that torch can use; '
                         'use --device cpu')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f'--device {device}: there are only {torch.cuda.device_count()} CUDA devices')
    return dev


def _check_finite_runs(runs: List[Run]) -> None:
    bad = [str(r.dir) for r in runs if not isinstance(r.summary.get('val_top1'), (int, float))
           or not math.isfinite(r.summary['val_top1'])]
    if bad:
        raise ValueError(f'runs without finite validation results (diverged?): {", ".join(bad)}; leave them out')


def _analyze(all_runs, out: Path, max_images, batch_size, kl_map_images, nmi_samples, nmi_points, probe_patches,
             device, progress) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    groups = seed_groups(all_runs)
    runs = [g[0] for g in groups]  # one seed per model for the per-run dissections
    # the other seeds of the model whose heads Fig. 6 shows first: the most restricted one with an active head
    first = _restricted(runs)[:1]
    other_seeds = next((g[1:] for g in groups if first and g[0] is first[0]), [])
    torch.manual_seed(0)
    for r in all_runs:  # every seed: patch voting (Fig. 1c) is reported over seeds
        r.model(device)
    ds, spec = _val_data(runs, max_images)
    loader = _loader(ds, batch_size)
    colors = beta_colors([r.beta for r in runs if r.mode == 'vib'] or [1.0])
    js: Dict[str, Any] = {}

    def kl_maps(p):
        idx, why = _pick_images(runs, js, ds, kl_map_images)
        return fig_kl_maps(runs, ds, spec, idx, why, p)

    def js_first(p):  # JS divergences feed both fig. 8 and the choice of images for fig. 3
        js.update(_js_to_ends(runs, loader))
        return fig_voting(groups, loader, p, colors)

    steps: List[Tuple[str, str, Callable[[Path], str]]] = [
        (FIGURES[0], 'Accuracy vs information (Fig. 1b)', lambda p: fig_accuracy(all_runs, p)),
        (FIGURES[1], 'Patch voting (Fig. 1c)', js_first),
        (FIGURES[2], 'KL maps (Fig. 2)', kl_maps),
        (FIGURES[3], 'Survival functions and active heads (Fig. 3)', lambda p: fig_survival(runs, loader, p)),
        (FIGURES[4], 'Top-activating patches (Fig. 4)', lambda p: fig_top_patches(runs, loader, ds, spec, p)),
        (FIGURES[5], 'Repetition probe (Fig. 5)', lambda p: fig_repetition(runs, ds, p, probe_patches)),
        (FIGURES[6], 'NMI between active heads (Fig. 6)',
         lambda p: fig_nmi(runs, ds, loader, p, n_samples=nmi_samples, max_points=nmi_points, other_seeds=other_seeds)),
        (FIGURES[7], 'Jensen-Shannon divergence to the ends (Fig. 7)', lambda p: fig_js(runs, js, p)),
        (FIGURES[8], 'Query-key SVD by layer', lambda p: fig_qk(runs, p, colors)),
        (FIGURES[9], 'Learning curves', lambda p: fig_curves(all_runs, p, colors)),
    ]
    done = []
    prog = Progress(TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not progress)
    with prog:
        task = prog.add_task('report', total=len(steps))
        for name, heading, fn in steps:
            prog.update(task, description=f'report: {heading}')
            with torch.no_grad():
                caption = fn(out / f'{name}.png')
            done.append((name, heading, caption))
            prog.advance(task)
    s0 = runs[0].summary
    meta = {'dataset': s0.get('dataset'), 'images': len(ds), 'depth': s0.get('depth'), 'heads': s0.get('num_heads'),
            'img_size': s0.get('img_size'), 'patch_size': s0.get('patch_size'), 'kl_reduction': s0.get('kl_reduction')}
    atomic_write_json(out / 'captions.json', {
        'runs': [str(r.dir) for r in all_runs], **meta,
        'figures': [{'file': f'{n}.png', 'title': t, 'caption': c} for n, t, c in done]})
    _write_index(out, all_runs, done, meta)
    return out / 'index.html'
