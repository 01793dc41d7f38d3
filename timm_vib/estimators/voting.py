""" Patch voting and model comparison

Bottlenecked ViTs without class token average per-patch logits, so each patch casts a vote (its top
class). Diversity of the votes (inverse Simpson index), logit range, and the Jensen-Shannon
divergence between two models' class probabilities per image (nats).
"""
import math
from typing import Iterable, Tuple

import torch
import torch.nn as nn

from .activity import _device, _images
from .capture import DeviceLike, capture, eval_mode

__all__ = [
    'patch_votes', 'vote_fractions', 'inverse_simpson', 'logit_range', 'js_divergence', 'js_distance',
    'top_fraction', 'compare_models', 'patch_voting',
]


def _check_patch_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f'patch logits must be [batch, tokens, classes], got {shape}')
    # argmax of a NaN row is an arbitrary class: a vote nobody cast
    if not torch.isfinite(logits).all():
        raise ValueError('patch logits have NaN or infinite entries')


def patch_votes(logits: torch.Tensor) -> torch.Tensor:
    """Top class of each patch: [B, tokens, classes] logits -> [B, tokens] class indices."""
    _check_patch_logits(logits)
    return logits.argmax(-1)


def vote_fractions(logits: torch.Tensor) -> torch.Tensor:
    """p_c: fraction of an image's patches whose top class is c, [B, classes] (rows sum to one)."""
    _check_patch_logits(logits)
    B, N, C = logits.shape
    votes = torch.zeros(B, C, device=logits.device, dtype=torch.float64)
    votes.scatter_add_(1, logits.argmax(-1), torch.ones(B, N, device=logits.device, dtype=torch.float64))
    return votes / N


def inverse_simpson(fractions: torch.Tensor) -> torch.Tensor:
    """1 / sum_c p_c^2 of vote fractions [B, classes] -> [B]: the effective number of classes voted
    for (1 when all patches agree, C when votes are spread evenly)."""
    if fractions.ndim != 2:
        raise ValueError(f'vote fractions must be [batch, classes], got {tuple(fractions.shape)}')
    p = fractions.double()
    # a row that is not a distribution (all zero, negative, not summing to one) has no effective number
    if not (torch.isfinite(p).all() and (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones_like(p[:, 0]), atol=1e-6)):
        raise ValueError('vote fractions must be non-negative and sum to one per image (rows of vote_fractions)')
    return 1.0 / p.square().sum(-1)


def logit_range(logits: torch.Tensor) -> torch.Tensor:
    """max - min of the per-patch logits over patches and classes: [B, tokens, classes] -> [B]."""
    _check_patch_logits(logits)
    return logits.amax((1, 2)) - logits.amin((1, 2))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in nats between class distributions p, q [..., classes] -> [...].

    JS = (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2; 0 <= JS <= ln 2. Inputs are normalised to
    sum to one as scipy does; zero probabilities are fine (0 log 0 = 0).
    """
    if p.shape != q.shape:
        raise ValueError(f'p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}')
    p, q = p.double(), q.double()
    if (p < 0).any() or (q < 0).any() or not (torch.isfinite(p).all() and torch.isfinite(q).all()):
        raise ValueError('p and q must be finite, non-negative probabilities')
    if (p.sum(-1) == 0).any() or (q.sum(-1) == 0).any():  # nothing to normalise: scipy answers nan
        raise ValueError('p and q must each have some positive entry (an all-zero row is no distribution)')
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    m = 0.5 * (p + q)
    kl = lambda a: torch.where(a > 0, torch.xlogy(a, a) - torch.xlogy(a, m), torch.zeros_like(a)).sum(-1)
    return (0.5 * (kl(p) + kl(q))).clamp_min(0)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt of :func:`js_divergence` (natural log): equals ``scipy.spatial.distance.jensenshannon(p, q)``."""
    return js_divergence(p, q).sqrt()


def top_fraction(scores: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Indices of the top ``fraction`` of items by score, largest first (ceil(fraction * n), at least 1):
    the paper's selection of the 10% of images where two models disagree most."""
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f'scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}')
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}')
    k = max(1, math.ceil(fraction * len(scores) - 1e-9))
    return scores.topk(k).indices


def compare_models(model_a: nn.Module, model_b: nn.Module, loader: Iterable, device: DeviceLike = None) -> torch.Tensor:
    """Jensen-Shannon divergence in nats between the class probabilities (softmax of image logits) of
    two models for every image of a dataset, in loader order: [n_images] (sqrt: the distance).
    Both models run under :func:`eval_mode` (posterior means)."""
    device = _device(model_a, device)
    out = []
    with torch.no_grad(), eval_mode(model_a), eval_mode(model_b):
        for batch in loader:
            x = _images(batch).to(device)
            a, b = model_a(x), model_b(x.to(_device(model_b, None))).to(device)
            if a.shape != b.shape:
                raise ValueError(f'the two models do not classify into the same classes: {a.shape[-1]} and {b.shape[-1]} outputs')
            out.append(js_divergence(a.softmax(-1), b.softmax(-1)).cpu())
    if not out:
        raise ValueError('the loader yielded no batches')
    return torch.cat(out)


def patch_voting(model: nn.Module, loader: Iterable, device: DeviceLike = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per image of a dataset (loader order): (inverse Simpson index of patch votes [n], logit range [n]),
    the model under :func:`eval_mode`."""
    device = _device(model, device)
    simpson, ranges = [], []
    with torch.no_grad(), eval_mode(model), capture(model) as rec:
        for batch in loader:
            model(_images(batch).to(device))
            logits = rec.logits[:, rec.patch_tokens]
            simpson.append(inverse_simpson(vote_fractions(logits)).cpu())
            ranges.append(logit_range(logits).cpu())
    if not simpson:
        raise ValueError('the loader yielded no batches')
    return torch.cat(simpson), torch.cat(ranges)
