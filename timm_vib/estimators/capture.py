""" Capture of what a forward pass of a timm_vib model computes inside

Forward hooks on every :class:`HeadBottleneck` see (z, mu, logvar) of all heads of a layer; a forward
hook on the ``norm1`` of each block with attention sees the attention's (normed) input tokens, from which
attention maps are recomputed only when asked (the fused kernel never materialises them); a hook on the
final norm gives the per-token features, hence per-patch logits. Each hook writes its layer's slot, so
the recomputation of gradient checkpointing records nothing twice. Hooks exist only inside
``with capture(model)``, so a model outside the context runs with zero overhead.
"""
from contextlib import contextmanager
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..information import gaussian_kl
from ..vision_transformer_vib import HeadBottleneck

__all__ = ['Record', 'capture', 'eval_mode', 'attention_modules', 'attention_maps', 'patch_logits', 'grid_size', 'num_prefix_tokens']

# where an estimator runs the model: a torch device or its name ('cpu', 'cuda:0'); None = where the model is
DeviceLike = Optional[Union[str, torch.device]]


def grid_size(model: nn.Module) -> Tuple[int, int]:
    """(rows, cols) of the model's patch grid."""
    rows, cols = model.patch_embed.grid_size
    return int(rows), int(cols)


def num_prefix_tokens(model: nn.Module) -> int:
    """Class / register tokens in front of the patch tokens (0 for the vit_tiny_* family)."""
    return int(getattr(model, 'num_prefix_tokens', 0))


def attention_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks with a query-key-value attention, in depth order (empty for attention-free models)."""
    return [blk for blk in model.blocks if hasattr(blk, 'attn') and hasattr(blk.attn, 'qkv')]


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The attention module of every block, in depth order (empty for attention-free models)."""
    return [blk.attn for blk in attention_blocks(model)]


def attention_maps(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q_norm(q) k_norm(k)^T * scale) of a timm attention module for its input x [B, N, C]:
    [B, heads, N (queries), N (keys)], rows sum to one (no mask: ViT classification runs none)."""
    if not (hasattr(attn, 'qkv') and hasattr(attn, 'num_heads')):
        raise TypeError(f'attention_maps takes a timm attention module (with qkv), got {type(attn).__name__}')
    C_in = attn.qkv.in_features
    if x.ndim != 3 or x.shape[-1] != C_in:
        raise ValueError(f'attention_maps takes the attention input tokens [B, N, {C_in}], got shape {tuple(x.shape)}')
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    A = H * D
    w, b = attn.qkv.weight[:2 * A], (attn.qkv.bias[:2 * A] if attn.qkv.bias is not None else None)
    q, k = torch.nn.functional.linear(x, w, b).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)


def patch_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token logits [B, N, classes] from final-normed tokens [B, N, C]: the classifier applied to
    each token. For average-pooled models without fc_norm (the vit_tiny_* family) their mean over patch
    tokens is the image logit."""
    C = model.num_features
    if tokens.ndim != 3 or tokens.shape[-1] != C:
        raise ValueError(f'patch_logits takes final-normed tokens [B, N, {C}], not images: got shape '
                         f'{tuple(tokens.shape)} (capture(model) records the per-patch logits as record.logits)')
    return model.head(model.fc_norm(tokens))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` deterministically inside the context: eval mode (no dropout or drop path) and every
    bottleneck at its posterior mean (``stochastic_eval`` off). Without this a latent read at one layer
    carries the noise sampled upstream, so differences such as mu_aug - mu_0 mix the two.

    On exit, also after an error, each module gets back its own ``training`` flag (a model partly in
    train mode stays so) and each :class:`HeadBottleneck` its own sampling flag. Contexts nest.
    """
    modes = [(m, m.training) for m in model.modules()]
    sampling = [(b, b.sample_in_eval) for b in model.modules() if isinstance(b, HeadBottleneck)]
    try:
        model.eval()
        for b, _ in sampling:
            b.sample_in_eval = False
        yield model
    finally:
        model.train(modes[0][1])  # through train(), for modules that override it
        for m, training in modes:
            m.training = training  # then each module's own flag, for mixed models
        for b, sample in sampling:
            b.sample_in_eval = sample


class Record:
    """What :func:`capture` saw in the latest forward pass (a new pass replaces it).

    Attributes (None when not available for this model or not asked for):
        mu, logvar: [B, depth, heads, tokens, r] posterior means / log-variances.
        kl: [B, depth, heads, tokens] float32 KL in nats (zeros for attention-free models).
        attention: [B, depth, heads, tokens, tokens] attention maps (``attention=True``).
        inputs: [B, depth, tokens, embed] normed attention inputs (``inputs=True``).
        features: [B, tokens, embed] final-normed tokens; logits: [B, tokens, classes] per-token logits.
    Tokens include any prefix tokens (``num_prefix_tokens``) in front of the patch tokens.
    """

    def __init__(self, model: nn.Module, attention: bool, inputs: bool, detach: bool):
        self._model = model
        self._want_attention = attention
        self._want_inputs = inputs
        self._detach = detach
        self.grid_size = grid_size(model)
        self.num_prefix_tokens = num_prefix_tokens(model)
        self.clear()

    def clear(self) -> None:
        # layer index -> tensors (a dict, not a list: checkpointed blocks run their hooks again in backward)
        self._post: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._inputs: Dict[int, torch.Tensor] = {}
        self._features: Optional[torch.Tensor] = None

    @staticmethod
    def _layers(d: Dict[int, Any]) -> List[Any]:
        return [d[i] for i in sorted(d)]

    def _d(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self._detach else t

    @property
    def mu(self) -> Optional[torch.Tensor]:
        return torch.stack([p[0] for p in self._layers(self._post)], 1) if self._post else None

    @property
    def logvar(self) -> Optional[torch.Tensor]:
        return torch.stack([p[1] for p in self._layers(self._post)], 1) if self._post else None

    @property
    def kl(self) -> Optional[torch.Tensor]:
        if self._post:
            return gaussian_kl(self.mu, self.logvar)
        if getattr(self._model, 'attn_mode', None) == 'none' and self._features is not None:
            B, N = self._features.shape[:2]
            heads = self._model.blocks[0].num_heads
            return self._features.new_zeros(B, len(self._model.blocks), heads, N, dtype=torch.float32)
        return None

    @property
    def inputs(self) -> Optional[torch.Tensor]:
        return torch.stack(self._layers(self._inputs), 1) if (self._inputs and self._want_inputs) else None

    @property
    def attention(self) -> Optional[torch.Tensor]:
        if not (self._want_attention and self._inputs):
            return None
        with torch.set_grad_enabled(not self._detach):
            inputs = self._layers(self._inputs)
            return torch.stack([attention_maps(a, x) for a, x in zip(attention_modules(self._model), inputs)], 1)

    @property
    def features(self) -> Optional[torch.Tensor]:
        return self._features

    @property
    def logits(self) -> Optional[torch.Tensor]:
        if self._features is None:
            return None
        with torch.set_grad_enabled(not self._detach):
            return patch_logits(self._model, self._features)

    @property
    def patch_tokens(self) -> slice:
        """Slice of the token axis holding the patch tokens (row-major over ``grid_size``)."""
        return slice(self.num_prefix_tokens, None)


@contextmanager
def capture(model: nn.Module, attention: bool = False, inputs: bool = False, detach: bool = True) -> Iterator[Record]:
    """Record posteriors, KL, (attention maps), and per-patch logits of every forward pass of ``model``.

    Works for every timm_vib model and for ``vibify``-ed timm ViTs (prefix tokens kept on the token
    axis). Attention maps are recomputed from the captured attention inputs only when ``attention``
    is set, and only when ``record.attention`` is read. Hooks are removed on exit.

    Example::

        with capture(model, attention=True) as rec:
            model(images)
        rec.mu, rec.kl, rec.attention, rec.logits
    """
    if not hasattr(model, 'blocks') or not hasattr(model, 'patch_embed'):
        raise TypeError(f'capture takes a timm VisionTransformer, got {type(model).__name__}')
    rec = Record(model, attention, inputs, detach)
    handles = []
    try:
        def reset(module, args):
            rec.clear()

        def on_bottleneck(layer, module, args, out):
            _, mu, logvar = out
            rec._post[layer] = (rec._d(mu), rec._d(logvar))

        def on_attn_input(layer, module, args, out):
            rec._inputs[layer] = rec._d(out)

        def on_norm(module, args, out):
            rec._features = rec._d(out)

        handles.append(model.patch_embed.register_forward_pre_hook(reset))
        bottlenecks = [b for b in model.modules() if isinstance(b, HeadBottleneck)]
        handles += [b.register_forward_hook(partial(on_bottleneck, i)) for i, b in enumerate(bottlenecks)]
        if attention or inputs:
            # the attention's input is its block's norm1 output (hooked there: forward_kl, the return_kl
            # path, calls the attention's computation without going through its module call)
            norms = [blk.norm1 for blk in attention_blocks(model)]
            if not norms:
                raise ValueError('this model has no attention modules (attention-free blocks): nothing to capture')
            handles += [n.register_forward_hook(partial(on_attn_input, i)) for i, n in enumerate(norms)]
        handles.append(model.norm.register_forward_hook(on_norm))
        yield rec
    finally:
        for h in handles:
            h.remove()
