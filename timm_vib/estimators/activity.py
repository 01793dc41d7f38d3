""" KL maps, head and latent-dimension activity, information totals and top-activating patches

Tensor functions take the KL [B, depth, heads, tokens] in nats of ``model(x, return_kl=True)`` or of
a :func:`capture` record; dataset functions take a model and a DataLoader and stream over it,
keeping counts, maxima or a running top-k (never the whole dataset). They run the model under
:func:`eval_mode` (posterior means, no upstream noise) and leave its modes as they found them.
"""
import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from ..information import gaussian_kl
from .capture import DeviceLike, Record, attention_maps, attention_modules, capture, eval_mode, grid_size, num_prefix_tokens

__all__ = [
    'to_grid', 'kl_map', 'iterate_records', 'survival_function', 'max_kl', 'active_heads', 'active_dims',
    'information_per_image', 'information_per_patch', 'mean_information', 'TopPatches', 'top_patches',
    'check_layer_head',
]


def to_grid(t: torch.Tensor, grid: Union[int, Sequence[int]], num_prefix_tokens: int = 0) -> torch.Tensor:
    """[..., tokens] -> [..., rows, cols]: drop prefix tokens and lay patch tokens on the patch grid
    (``grid`` (rows, cols), or one int for a square grid)."""
    gh, gw = to_2tuple(grid)
    if t.shape[-1] != num_prefix_tokens + gh * gw:
        raise ValueError(
            f'last axis has {t.shape[-1]} tokens, expected {num_prefix_tokens} prefix + {gh}x{gw} patch tokens')
    return t[..., num_prefix_tokens:].reshape(*t.shape[:-1], gh, gw)


def kl_map(kl: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 0, reduce: bool = True) -> torch.Tensor:
    """Per-patch KL in nats on the image's patch grid.

    Args:
        kl: [B, depth, heads, tokens] nats.
        reduce: sum over layers and heads (the paper's KL heatmap) -> [B, rows, cols];
            otherwise [B, depth, heads, rows, cols].
    """
    _check_kl(kl)
    m = to_grid(kl, grid, num_prefix_tokens)
    return m.sum((1, 2)) if reduce else m


KL_ROUNDING = 1e-6  # nats


def _check_kl(kl: torch.Tensor) -> None:
    if not isinstance(kl, torch.Tensor) or kl.ndim != 4:
        shape = tuple(kl.shape) if isinstance(kl, torch.Tensor) else type(kl).__name__
        raise ValueError(f'kl must be [batch, depth, heads, tokens], got {shape}')
    if kl.numel() and not torch.isfinite(kl).all():
        raise ValueError('kl holds NaN or infinite values: a model that diverged, or not a KL tensor')
    # a KL is >= 0; gaussian_kl's float32 rounding stays far above -1e-6 nats
    if kl.numel() and kl.min() < -KL_ROUNDING:
        raise ValueError(f'kl holds negative values (min {float(kl.min()):.3g} nats) but a KL is >= 0: '
                         'pass the KL of model(x, return_kl=True), not log-probabilities or a difference')


def information_per_image(kl: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Total information written by attention per image: KL summed over layers, heads and patch tokens. [B] nats.

    ``num_prefix_tokens``: class / register tokens at the front of the token axis, left out as
    :func:`mean_information` leaves them out (``capture.num_prefix_tokens(model)``; 0 for ``vit_tiny_vib*``)."""
    _check_kl(kl)
    return kl.float()[..., _prefix(kl, num_prefix_tokens):].sum((1, 2, 3))


def information_per_patch(kl: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Information written into each patch token, summed over layers and heads: [B, patches] nats (prefix
    tokens left out, as in :func:`information_per_image`)."""
    _check_kl(kl)
    return kl.float()[..., _prefix(kl, num_prefix_tokens):].sum((1, 2))


def _prefix(kl: torch.Tensor, num_prefix_tokens: int) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral) \
            or not 0 <= num_prefix_tokens < kl.shape[-1]:
        raise ValueError(f'num_prefix_tokens must be an integer in 0..{kl.shape[-1] - 1} (kl has {kl.shape[-1]} '
                         f'tokens), got {num_prefix_tokens!r}')
    return int(num_prefix_tokens)


def _num_heads(block: nn.Module) -> int:
    return block.attn.num_heads if hasattr(block, 'attn') else block.num_heads


def check_layer_head(model: nn.Module, layer: int, head: int) -> None:
    """IndexError unless (layer, head) names a head of the model."""
    depth = len(model.blocks)
    if not -depth <= layer < depth:
        raise IndexError(f'layer {layer} out of range: the model has {depth} blocks')
    heads = _num_heads(model.blocks[layer])
    if not -heads <= head < heads:
        raise IndexError(f'head {head} out of range: layer {layer} has {heads} heads')


def _images(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get('image', batch.get('pixel_values'))
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f'loader batches must be images or (images, targets), got {type(batch).__name__}')
    if batch.ndim == 3:
        # what iterating over a tensor of images, or over a Dataset, yields
        raise TypeError(f'loader batches must be image batches [B, C, H, W] or (images, targets), got one image '
                        f'{list(batch.shape)}: pass a DataLoader, or a list of batches such as [images]')
    return batch


def _device(model: nn.Module, device: DeviceLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


def iterate_records(
        model: nn.Module,
        loader: Iterable,
        attention: bool = False,
        inputs: bool = False,
        device: DeviceLike = None,
) -> Iterator[Tuple[torch.Tensor, Record]]:
    """Stream a DataLoader through the model under :func:`eval_mode` and :func:`capture` without
    gradients: yields (images, record) per batch; records are only valid until the next batch. The
    model's modes come back when the loop ends or the generator is closed."""
    device = _device(model, device)
    with torch.no_grad(), eval_mode(model), capture(model, attention=attention, inputs=inputs) as rec:
        for batch in loader:
            x = _images(batch).to(device)
            model(x)
            yield x, rec


def _need_bottleneck(model: nn.Module, allow_attention_free: bool = True) -> None:
    # attention-free models report zero KL (nothing is communicated), so their statistics are defined
    if allow_attention_free and getattr(model, 'attn_mode', None) == 'none':
        return
    if not any(True for _ in _bottlenecks(model)):
        raise ValueError('this model has no information bottleneck: there is no KL or posterior to analyse')


def _bottlenecks(model):
    from ..vision_transformer_vib import HeadBottleneck
    return (m for m in model.modules() if isinstance(m, HeadBottleneck))


def survival_function(
        model: nn.Module,
        loader: Iterable,
        thresholds: Optional[torch.Tensor] = None,
        device: DeviceLike = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """P(KL >= x) per head over all patch tokens of a dataset (paper fig. 3).

    Args:
        thresholds: [T] increasing KL values x in nats (default: 0 and 10^-4 .. 10^2, 121 log-spaced).

    Returns:
        (thresholds [T] nats, survival [depth, heads, T] probabilities), from exact counts.
    """
    _need_bottleneck(model)
    if thresholds is None:
        thresholds = torch.cat([torch.zeros(1), torch.logspace(-4, 2, 120)]).double()
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    if thresholds.ndim != 1 or (thresholds.diff() <= 0).any():
        raise ValueError('thresholds must be a 1-D increasing sequence of KL values')
    counts, n = None, 0
    with eval_mode(model):  # modes back on return or error, not only when the generator is collected
        for _, rec in iterate_records(model, loader, device=device):
            kl = rec.kl[..., rec.patch_tokens].double()
            B, D, H, N = kl.shape
            # bin b = number of thresholds <= kl; P(KL >= x_t) = fraction with bin > t
            bins = torch.searchsorted(thresholds.to(kl.device), kl.permute(1, 2, 0, 3).reshape(D * H, -1), right=True)
            offs = torch.arange(D * H, device=kl.device)[:, None] * (len(thresholds) + 1)
            c = torch.bincount((bins + offs).reshape(-1), minlength=D * H * (len(thresholds) + 1))
            c = c.reshape(D, H, -1).cpu()
            counts = c if counts is None else counts + c
            n += B * N
    if counts is None:
        raise ValueError('the loader yielded no batches')
    surv = counts.flip(-1).cumsum(-1).flip(-1)[..., 1:].double() / n
    return thresholds, surv


def max_kl(model: nn.Module, loader: Iterable, device: DeviceLike = None) -> torch.Tensor:
    """Largest KL of each head over all patch tokens of a dataset: [depth, heads] nats."""
    _need_bottleneck(model)
    out = None
    with eval_mode(model):  # modes back on return or error, not only when the generator is collected
        for _, rec in iterate_records(model, loader, device=device):
            m = rec.kl[..., rec.patch_tokens].amax((0, 3))
            out = m if out is None else torch.maximum(out, m)
    if out is None:
        raise ValueError('the loader yielded no batches')
    return out


def _check_threshold(threshold: float) -> float:
    # a KL is never negative: below zero every head or dimension would count as active
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < math.inf:
        raise ValueError(f'threshold must be a finite KL in nats >= 0 (the paper: 1e-2), got {threshold!r}')
    return float(threshold)


def active_heads(model: nn.Module, loader: Iterable, threshold: float = 1e-2, device: DeviceLike = None) -> torch.Tensor:
    """Heads whose KL exceeds ``threshold`` nats for at least one patch of the dataset: bool [depth, heads]."""
    threshold = _check_threshold(threshold)
    return max_kl(model, loader, device) > threshold


def active_dims(model: nn.Module, loader: Iterable, threshold: float = 1e-2, device: DeviceLike = None) -> torch.Tensor:
    """Latent dimensions whose own KL term 0.5 (exp(lv) + mu^2 - 1 - lv) exceeds ``threshold`` nats for
    at least one patch: bool [depth, heads, r]; ``.sum(-1)`` counts the active dims of each head."""
    threshold = _check_threshold(threshold)
    _need_bottleneck(model, allow_attention_free=False)
    out = None
    with eval_mode(model):  # modes back on return or error, not only when the generator is collected
        for _, rec in iterate_records(model, loader, device=device):
            sl = rec.patch_tokens
            kd = gaussian_kl(rec.mu[..., sl, :, None], rec.logvar[..., sl, :, None])  # per dim: [B, D, H, N, r]
            m = kd.amax((0, 3))
            out = m if out is None else torch.maximum(out, m)
    if out is None:
        raise ValueError('the loader yielded no batches')
    return out > threshold


def mean_information(model: nn.Module, loader: Iterable, device: DeviceLike = None) -> Tuple[float, float]:
    """Dataset means of the information written by attention: (nats per image, nats per patch token)."""
    _need_bottleneck(model)
    total, images, tokens = 0.0, 0, 0
    with eval_mode(model):  # modes back on return or error, not only when the generator is collected
        for _, rec in iterate_records(model, loader, device=device):
            kl = rec.kl[..., rec.patch_tokens]
            total += float(kl.double().sum())
            images += kl.shape[0]
            tokens += kl.shape[0] * kl.shape[-1]
    if images == 0:
        raise ValueError('the loader yielded no batches')
    return total / images, total / tokens


@dataclass
class TopPatches:
    """The k patches of a dataset scoring highest for one head, best first.

    score [k] (nats for ``by='kl'``, latent units for ``by='latent'``); image [k] index in loader
    order; token [k] patch index (row-major on the grid); row, col [k]; attention [k, rows, cols] the
    head's attention map of that patch as query (None unless asked).
    """
    score: torch.Tensor
    image: torch.Tensor
    token: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    attention: Optional[torch.Tensor]


def top_patches(
        model: nn.Module,
        loader: Iterable,
        layer: int,
        head: int,
        k: int = 16,
        by: str = 'kl',
        dim: int = 0,
        sign: int = 1,
        attention: bool = True,
        device: DeviceLike = None,
) -> TopPatches:
    """Top-k patches of head (layer, head) over a dataset, by KL or by the signed value of one
    latent dimension of the posterior mean (``by='latent'``, ``dim``, ``sign`` = +1 or -1), with the
    head's attention maps of those patches. Keeps a running top-k while streaming."""
    _need_bottleneck(model, allow_attention_free=False)
    check_layer_head(model, layer, head)
    if by not in ('kl', 'latent'):
        raise ValueError(f"by must be 'kl' or 'latent', got {by!r}")
    if sign not in (1, -1):
        raise ValueError(f'sign must be +1 or -1, got {sign!r}')
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f'k must be an integer >= 1, got {k!r}')
    r = model.blocks[layer].attn.vib.vib_dim
    if by == 'latent' and not -r <= dim < r:
        raise IndexError(f'latent dim {dim} out of range: heads have r = {r} dims')
    attn_mod = attention_modules(model)[layer]
    gh, gw = grid_size(model)
    P = num_prefix_tokens(model)
    best = None  # (score, image, token, attention rows)
    seen = 0
    with eval_mode(model):  # modes back on return or error, not only when the generator is collected
        for x, rec in iterate_records(model, loader, inputs=attention, device=device):
            if by == 'kl':
                s = rec.kl[:, layer, head, P:]
            else:
                s = sign * rec.mu[:, layer, head, P:, dim].float()
            B, N = s.shape
            v, i = s.reshape(-1).topk(min(k, B * N))
            b, t = i // N, i % N
            rows = None
            if attention:
                a = attention_maps(attn_mod, rec.inputs[b, layer])[:, head]  # [k, tokens, tokens]
                rows = a[torch.arange(len(b)), t + P, P:]
            cand = (v, b + seen, t, rows)
            if best is not None:
                cand = tuple(torch.cat([c0, c1.to(c0.device)]) if c0 is not None else None for c0, c1 in zip(best, cand))
                v, j = cand[0].topk(min(k, len(cand[0])))
                cand = tuple(c[j] if c is not None else None for c in cand)
            best = cand
            seen += B
    if best is None:
        raise ValueError('the loader yielded no batches')
    v, img, tok, rows = best
    return TopPatches(
        v if by == 'kl' else sign * v, img, tok, tok // gw, tok % gw,
        rows.reshape(-1, gh, gw) if rows is not None else None)
