""" Query-key SVD of every head (seed 002: Pan, Philip, Xie, Schwartz, NeurIPS 2024)

Per head, M = W_q^T W_k (embed x embed, rank <= head_dim) says how a query token x and a key token y
interact: the (bias-free, unscaled) attention logit is x^T M y = sum_k s_k (x . u_k)(y . v_k). The
cosine of each mode's left (query) and right (key) singular vectors says whether the mode makes
tokens attend to similar (+) or dissimilar (-) tokens.

Definition used: weights only. The q/k biases, the 1/sqrt(d) scale and the norm's affine parameters
are left out, as in the paper; ``fold_norm_scale=True`` instead uses diag(g) M diag(g) with g the
block's norm1 weight.

Weighted means follow the authors' code (schwartz-cnl/DissectingViT, ``cosine_similarity.ipynb``):
singular values are normalised within each head (w_k = s_k / sum of that head's s), so every head
counts equally whatever the size of its W_q^T W_k. The notebook then takes the mean of w_k cos_k over
modes and heads, i.e. our ``layer_weighted_mean`` divided by head_dim; here the per-head sums are true
weighted means (all cosines c give c). ``layer_pooled_weighted_mean`` normalises over all heads of a
layer instead (large heads dominate).

Maps (``qk_maps``, ``optimal_attention_images``) project the block's norm1 output, the tokens the
attention sees; the authors project the pre-norm residual stream. With ``fold_norm_scale`` the gain
g is already in the modes, so the maps project the normalised tokens before the gain and bias,
(norm1(x) - b) / g, the tensor that the folded M pairs with. Both run the model under
:func:`~timm_vib.estimators.capture.eval_mode`: the tokens of a later block carry no sampled noise.
"""
from dataclasses import dataclass
from typing import Iterable, Tuple

import torch
import torch.nn as nn

from .activity import _device, _images
from .capture import DeviceLike, attention_blocks, attention_modules, capture, eval_mode, grid_size, num_prefix_tokens

__all__ = ['QKSVD', 'qk_svd', 'qk_maps', 'optimal_attention_images']


@dataclass
class QKSVD:
    """Modes of M = W_q^T W_k for every layer and head (heads may not differ in size across layers).

    singular_values [depth, heads, head_dim] (descending); u (query) and v (key) [depth, heads, embed,
    head_dim] unit singular vectors, mode k in column k; cosine [depth, heads, head_dim] = u_k . v_k;
    norm_scale_folded: whether M includes norm1's gain (``fold_norm_scale``), which decides the tokens
    that the maps project.
    """
    singular_values: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    cosine: torch.Tensor
    norm_scale_folded: bool = False

    @property
    def head_mean(self) -> torch.Tensor:
        """Plain mean of the cosines over modes: [depth, heads]."""
        return self.cosine.mean(-1)

    @property
    def head_weighted_mean(self) -> torch.Tensor:
        """sum_k w_k cos_k with w_k = s_k / sum_k s_k: [depth, heads]."""
        w = self.singular_values / self.singular_values.sum(-1, keepdim=True).clamp_min(1e-30)
        return (w * self.cosine).sum(-1)

    @property
    def layer_mean(self) -> torch.Tensor:
        """Plain mean over modes and heads: [depth]."""
        return self.cosine.mean((1, 2))

    @property
    def layer_weighted_mean(self) -> torch.Tensor:
        """Mean over heads of ``head_weighted_mean`` (weights normalised within each head, as the authors'
        code; their plotted value is this divided by head_dim): [depth]."""
        return self.head_weighted_mean.mean(-1)

    @property
    def layer_pooled_weighted_mean(self) -> torch.Tensor:
        """Singular-value-weighted mean over the modes of all heads of a layer, weights normalised over
        the whole layer (heads with a larger ||W_q^T W_k|| count more): [depth]."""
        w = self.singular_values / self.singular_values.sum((1, 2), keepdim=True).clamp_min(1e-30)
        return (w * self.cosine).sum((1, 2))


def _qk_weights(model: nn.Module, fold_norm_scale: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(getattr(model, 'blocks', None), nn.Sequential):
        raise ValueError(f'qk_svd reads the query-key weights of a timm Vision Transformer (model.blocks[i].attn.qkv); '
                         f'{type(model).__name__} has no transformer blocks')
    attns = attention_modules(model)
    if not attns:
        raise ValueError('this model has no attention (attention-free blocks): there is no query-key matrix')
    wq, wk = [], []
    for blk, a in zip(attention_blocks(model), attns):
        H, D = a.num_heads, a.head_dim
        w = a.qkv.weight.detach().to(torch.float64)
        C = w.shape[1]
        q, k = w[:H * D].reshape(H, D, C), w[H * D:2 * H * D].reshape(H, D, C)
        if fold_norm_scale:
            g = getattr(blk.norm1, 'weight', None)
            if g is not None:
                q, k = q * g.detach().double(), k * g.detach().double()
        wq.append(q)
        wk.append(k)
    if len({t.shape for t in wq}) > 1:
        raise ValueError('layers differ in heads or head size; call qk_svd on one block at a time')
    return torch.stack(wq), torch.stack(wk)  # [depth, heads, head_dim, embed]


def qk_svd(model: nn.Module, fold_norm_scale: bool = False) -> QKSVD:
    """SVD of M = W_q^T W_k for every layer and head of a timm ViT (bottlenecked or not), all heads at once.

    W_q, W_k are the head's rows of the qkv weight (biases ignored). M has rank <= head_dim, so its first
    head_dim modes come from QR factors: W_q^T = Q_a R_a, W_k^T = Q_b R_b, M = Q_a (R_a R_b^T) Q_b^T,
    and the small head_dim x head_dim core is decomposed (float64). Cosines are invariant to the joint
    sign flip of a pair; with ``fold_norm_scale`` M becomes diag(g) M diag(g) (g: norm1 weight).
    """
    wq, wk = _qk_weights(model, fold_norm_scale)
    qa, ra = torch.linalg.qr(wq.transpose(-1, -2))
    qb, rb = torch.linalg.qr(wk.transpose(-1, -2))
    uc, s, vch = torch.linalg.svd(ra @ rb.transpose(-1, -2))
    u, v = qa @ uc, qb @ vch.transpose(-1, -2)
    cos = (u * v).sum(-2)
    return QKSVD(s.float(), u.float(), v.float(), cos.float(), norm_scale_folded=bool(fold_norm_scale))


def _map_tokens(model: nn.Module, svd: QKSVD, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The tokens that ``svd``'s modes pair with: norm1 outputs [B, N, C], or, when the gain is folded into
    the modes, the normalised tokens before norm1's gain and bias, (norm1(x) - b) / g."""
    if not svd.norm_scale_folded:
        return tokens
    norm = attention_blocks(model)[layer].norm1
    g, b = getattr(norm, 'weight', None), getattr(norm, 'bias', None)
    if g is None:
        return tokens
    if (g == 0).any():
        raise ValueError(f'layer {layer}: norm1 has zero gains, so the tokens before its gain cannot be recovered; '
                         'use an SVD without fold_norm_scale')
    if b is not None:
        tokens = tokens - b.detach().float()
    return tokens / g.detach().float()


def _check_mode(svd: QKSVD, layer: int, head: int, mode: int) -> None:
    depth, heads, modes = svd.cosine.shape
    if not -depth <= layer < depth:
        raise IndexError(f'layer {layer} out of range: the model has {depth} attention layers')
    if not -heads <= head < heads:
        raise IndexError(f'head {head} out of range: layer {layer} has {heads} heads')
    if not -modes <= mode < modes:
        raise IndexError(f'mode {mode} out of range: heads have {modes} modes')


def qk_maps(
        model: nn.Module,
        images: torch.Tensor,
        layer: int,
        head: int,
        mode: int,
        svd: QKSVD = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Query and key maps of one mode: the block's normed attention input tokens projected on u_k and
    on v_k, on the patch grid: ([B, rows, cols], [B, rows, cols]) (embedding units). For an SVD with
    ``fold_norm_scale`` the tokens before norm1's gain and bias (see the module docstring)."""
    svd = qk_svd(model) if svd is None else svd
    _check_mode(svd, layer, head, mode)
    with torch.no_grad(), eval_mode(model), capture(model, inputs=True) as rec:
        model(images.to(_device(model, None)))
        x = _map_tokens(model, svd, layer, rec.inputs[:, layer, num_prefix_tokens(model):].float())
    gh, gw = grid_size(model)
    u, v = svd.u[layer, head, :, mode].to(x.device), svd.v[layer, head, :, mode].to(x.device)
    return (x @ u).reshape(-1, gh, gw), (x @ v).reshape(-1, gh, gw)


def optimal_attention_images(
        model: nn.Module,
        loader: Iterable,
        layer: int,
        head: int,
        mode: int,
        k: int = 8,
        svd: QKSVD = None,
        device: DeviceLike = None,
) -> dict:
    """Images of a dataset maximising max(query map) x max(key map) for one mode, for both sign
    conventions of the pair (u, v) and (-u, -v): {'+': (scores [k], indices [k]), '-': (...)},
    best first, indices in loader order. Streams with a running top-k."""
    svd = qk_svd(model) if svd is None else svd
    _check_mode(svd, layer, head, mode)
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f'k must be an integer >= 1, got {k!r}')
    device = _device(model, device)
    P = num_prefix_tokens(model)
    u, v = svd.u[layer, head, :, mode].to(device), svd.v[layer, head, :, mode].to(device)
    best = {'+': None, '-': None}
    seen = 0
    with torch.no_grad(), eval_mode(model), capture(model, inputs=True) as rec:
        for batch in loader:
            x = _images(batch).to(device)
            model(x)
            t = _map_tokens(model, svd, layer, rec.inputs[:, layer, P:].float())
            qm, km = t @ u, t @ v
            for sign, s in (('+', 1.0), ('-', -1.0)):
                # both maps must reach the sign somewhere: two negative maxima would multiply to a high score
                score = (s * qm).amax(1).clamp_min(0) * (s * km).amax(1).clamp_min(0)
                idx = torch.arange(seen, seen + len(x), device=score.device)
                if best[sign] is not None:
                    score, idx = torch.cat([best[sign][0], score]), torch.cat([best[sign][1], idx])
                top = score.topk(min(k, len(score)))
                best[sign] = (top.values, idx[top.indices])
            seen += len(x)
    if seen == 0:
        raise ValueError('the loader yielded no batches')
    return best
