""" Vision Transformer with an information bottleneck on every attention head's write

A PyTorch implementation of `From independent patches to coordinated attention: Controlling
information flow in vision transformers` (Murphy): a variational information bottleneck (VIB)
sits between each head's attention output softmax(QK^T)V and the output projection, so every
bit that one patch sends to another is paid for in nats of KL to a N(0, I) prior.

The models are timm VisionTransformers (no class token, average pooling, final norm per token
before pooling) so image logits are exactly the mean of per-patch logits:

* ``vit_tiny_vib`` (beta as a kwarg) and ``vit_tiny_vib_b{0,0p01,0p1,1,4,10}``: bottlenecked ViT-Tiny;
* ``vit_tiny_noattn``: the zero-communication end, MLP-only blocks (a DeepSets model);
* ``vit_tiny_gap``: the unmodified ViT with the same pooling, the other end of the spectrum.

Speed: the encoder's first layer is linear, so it composes exactly with the value projection
(attention rows sum to one, and its bias is added after attention), and the decoder's last layer
with the output projection. The folded path therefore runs timm's usual
qkv -> scaled_dot_product_attention -> proj with slightly different widths, plus the rest of the
bottleneck, the sampling and the KL. It is the default when those widths are not wider than a head
(``VIBAttention.fold_projections``); the explicit encode/decode path runs otherwise, for scale_norm /
gate, and as a reference.
"""
import math
import numbers
import os
import re
from functools import partial
from typing import Any, Dict, Literal, Mapping, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError
from torch.utils.checkpoint import checkpoint

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, Mlp, build_sincos2d_pos_embed, register_notrace_function
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from .information import gaussian_kl

__all__ = [
    'HeadBottleneck', 'VIBAttention', 'VIBBlock', 'MlpBlock', 'VisionTransformerVIB',
    'vibify', 'convert_reference_state_dict', 'beta_from_name', 'name_for_beta', 'HUB_NAMESPACE', 'ATTN_MODES', 'MODEL_NAMES',
    'POS_EMBED_INITS',
]

ATTN_MODES = ('vib', 'none', 'plain')
POS_EMBED_INITS = ('trunc_normal', 'sincos')

# leaves of plain torch.fx.symbolic_trace too (timm's tracers know them already)
torch.fx.wrap('maybe_add_mask')
torch.fx.wrap('resolve_self_attn_mask')


def _check_beta(beta: float) -> float:
    # float() would take True and '2': a flag or a string here is a mistake, not a cost
    if isinstance(beta, bool) or not isinstance(beta, (numbers.Real, torch.Tensor)):
        raise ValueError(f'beta must be a number, got {beta!r}')
    try:
        beta = float(beta)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f'beta must be a number, got {beta!r}') from None
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f'beta is the information cost in the loss and must be finite and >= 0, got {beta}')
    return beta


def _check_vib_dim(vib_dim: int) -> int:
    if isinstance(vib_dim, bool) or int(vib_dim) != vib_dim or vib_dim < 1:
        raise ValueError(f'vib_dim (the latent size r per head) must be an integer >= 1, got {vib_dim!r}')
    return int(vib_dim)


def _check_vib_hidden(vib_hidden: int) -> int:
    if not isinstance(vib_hidden, numbers.Integral) or isinstance(vib_hidden, bool) or vib_hidden < 0:
        raise ValueError(
            f'vib_hidden (hidden width of each head\'s encoder and decoder MLP, 0 = linear) must be an integer '
            f'>= 0, got {vib_hidden!r}')
    return int(vib_hidden)


def _check_logvar_init(logvar_init: float, clamp: Tuple[float, float]) -> float:
    # outside the clamp the log-variance is pinned at its bound with no gradient: the head would stay at
    # that noise for good; NaN would make every output NaN
    if isinstance(logvar_init, bool) or not isinstance(logvar_init, numbers.Real) or not (
            clamp[0] <= logvar_init <= clamp[1]):
        raise ValueError(
            f'vib_logvar_init (the posterior log-variance bias at init) must be a number within the clamp '
            f'[{clamp[0]:g}, {clamp[1]:g}], got {logvar_init!r}')
    return float(logvar_init)


def check_patch_grid(kwargs: Dict[str, Any]) -> None:
    """The patches must tile the image: timm's patch embedding would silently drop the remainder
    (a 28 px image with 16 px patches is one patch of its top-left corner)."""
    if kwargs.get('dynamic_img_pad'):
        return  # padded to a multiple of the patch
    img, patch = kwargs.get('img_size', 224), kwargs.get('patch_size', 16)
    if img is None or patch is None:
        return
    img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if any(int(i) % int(p) for i, p in zip(img, patch)):
        raise ValueError(
            f'img_size {img[0]}x{img[1]} is not a multiple of patch_size {patch[0]}x{patch[1]}: the patches must tile '
            'the image (pass an img_size that is a multiple, another patch_size, or dynamic_img_pad=True)')


def _per_head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[B, H, N, i] @ [H, i, o] + [H, o] -> [B, H, N, o]: one linear layer per head, no loop."""
    return torch.einsum('bhni,hio->bhno', x, weight) + bias[:, None]


class HeadBottleneck(nn.Module):
    """Gaussian VIB for all heads of one layer, with stacked per-head weights.

    Head h encodes its attention output (head_dim) into the mean (first r) and log-variance (last r)
    of a diagonal Gaussian, samples z (train mode, or ``sample_in_eval``) and decodes z back to
    head_dim. No loop over heads. Encoder and decoder are linear (``vib_hidden=0``) or, as in the
    paper's published runs, MLPs with one GELU hidden layer of ``vib_hidden`` units::

        linear:  enc  head_dim -> 2r                          dec  r -> head_dim
        MLP:     enc  head_dim -> hidden -> GELU -> 2r         dec  r -> hidden -> GELU -> head_dim

    Parameters, stacked over heads ([H, in, out] weights, [H, out] biases):

    * ``enc_weight`` / ``enc_bias``: the encoder's first layer (head_dim -> 2r, or -> hidden). Attention
      is linear in the values and its rows sum to one, so this layer composes with the value projection.
    * ``enc_out_weight`` / ``enc_out_bias`` (MLP only): hidden -> 2r.
    * ``dec_in_weight`` / ``dec_in_bias`` (MLP only): r -> hidden.
    * ``dec_weight`` / ``dec_bias``: the decoder's last layer (r or hidden -> head_dim), which composes
      with the output projection.

    The linear layout is the one of timm_vib 0.1 checkpoints. ``forward`` takes the encoder output
    and returns (z, mu, logvar); forward hooks on this module therefore see the posterior of every
    head, which is how ``timm_vib.estimators.capture`` records it.
    """

    def __init__(
            self,
            num_heads: int,
            head_dim: int,
            vib_dim: int = 32,
            logvar_init: float = -6.0,
            logvar_clamp: Tuple[float, float] = (-10.0, 10.0),
            vib_hidden: int = 0,
            small_init_dec: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.vib_dim = _check_vib_dim(vib_dim)
        self.vib_hidden = _check_vib_hidden(vib_hidden)
        self.logvar_clamp = (float(logvar_clamp[0]), float(logvar_clamp[1]))
        self.logvar_init = _check_logvar_init(logvar_init, self.logvar_clamp)
        self.small_init_dec = bool(small_init_dec)
        self.sample_in_eval = False
        self.is_mlp = self.vib_hidden > 0
        H, D, r, h = num_heads, head_dim, self.vib_dim, self.vib_hidden
        enc_width, dec_width = (h, h) if h else (2 * r, r)
        self.enc_weight = nn.Parameter(torch.empty(H, D, enc_width, **dd))
        self.enc_bias = nn.Parameter(torch.empty(H, enc_width, **dd))
        if h:
            self.enc_out_weight = nn.Parameter(torch.empty(H, h, 2 * r, **dd))
            self.enc_out_bias = nn.Parameter(torch.empty(H, 2 * r, **dd))
            self.dec_in_weight = nn.Parameter(torch.empty(H, r, h, **dd))
            self.dec_in_bias = nn.Parameter(torch.empty(H, h, **dd))
        else:
            # declared as None (not in the state dict) so TorchScript sees the MLP branch as dead code
            for name in ('enc_out_weight', 'enc_out_bias', 'dec_in_weight', 'dec_in_bias'):
                self.register_parameter(name, None)
        self.dec_weight = nn.Parameter(torch.empty(H, dec_width, D, **dd))
        self.dec_bias = nn.Parameter(torch.empty(H, D, **dd))
        self.init_weights()

    __jit_unused_properties__ = ['stats_bias']

    @property
    def stats_bias(self) -> torch.Tensor:
        """[H, 2r] bias of the layer that outputs (mu, logvar)."""
        return self.enc_out_bias if self.is_mlp else self.enc_bias

    def init_weights(self) -> None:
        """nn.Linear's uniform init per head, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), zero biases (the reference's: it
        shrinks a signal's rms by sqrt(3) per layer, docs/spectrum.md 4h); log-variance bias at
        ``logvar_init`` (-6 in the reference code: the posterior starts nearly deterministic). With
        ``small_init_dec`` the decoder's last layer starts at N(0, 1e-4^2) (the reference's option):
        the model then starts as independent patches and has to learn to communicate."""
        for w in self._weights():
            nn.init.uniform_(w, -w.shape[1] ** -0.5, w.shape[1] ** -0.5)
        for b in self._biases():
            nn.init.zeros_(b)
        if self.small_init_dec:
            nn.init.normal_(self.dec_weight, std=1e-4)
        with torch.no_grad():
            self.stats_bias[:, self.vib_dim:].fill_(self.logvar_init)

    def _weights(self):
        names = ('enc_weight', 'enc_out_weight', 'dec_in_weight', 'dec_weight') if self.is_mlp else ('enc_weight', 'dec_weight')
        return [getattr(self, n) for n in names]

    def _biases(self):
        names = ('enc_bias', 'enc_out_bias', 'dec_in_bias', 'dec_bias') if self.is_mlp else ('enc_bias', 'dec_bias')
        return [getattr(self, n) for n in names]

    def init_identity(self, generator: Optional[torch.Generator] = None) -> None:
        """Init the means as an orthonormal projection of each head's output and the decoder as its
        transpose, so that without sampling the bottleneck is the identity whenever it is wide enough:
        r >= head_dim (linear), and also vib_hidden >= 2 * head_dim for the MLP, whose hidden layer
        passes a value through as GELU(t) - GELU(-t) = t. Narrower, it is the projection onto the
        first directions. Used by ``vibify`` so a converted pretrained model starts from its function.
        """
        H, D, r, h = self.num_heads, self.head_dim, self.vib_dim, self.vib_hidden
        k = min(r, h // 2) if self.is_mlp else r  # directions carried through
        if self.is_mlp and k < 1:
            raise ValueError(f'an identity init needs vib_hidden >= 2, got {h}')
        with torch.no_grad():
            a = torch.randn(H, max(D, k), max(D, k), generator=generator, dtype=torch.float64)
            q = torch.linalg.qr(a).Q[:, :D, :k].to(self.enc_weight.dtype)  # [H, D, k], orthonormal rows or columns
            for p in self.parameters():
                p.zero_()
            if self.is_mlp:
                eye = torch.eye(k, dtype=q.dtype)
                self.enc_weight[:, :, :k].copy_(q)             # hidden = [q^T x, -q^T x, 0...]
                self.enc_weight[:, :, k:2 * k].copy_(-q)
                self.enc_out_weight[:, :k, :k].copy_(eye)      # mu = GELU(t) - GELU(-t) = t
                self.enc_out_weight[:, k:2 * k, :k].copy_(-eye)
                self.dec_in_weight[:, :k, :k].copy_(eye)       # hidden = [z, -z, 0...]
                self.dec_in_weight[:, :k, k:2 * k].copy_(-eye)
                self.dec_weight[:, :k].copy_(q.transpose(1, 2))
                self.dec_weight[:, k:2 * k].copy_(-q.transpose(1, 2))
            else:
                self.enc_weight[:, :, :k].copy_(q)
                self.dec_weight.copy_(q.transpose(1, 2))
            self.stats_bias[:, r:].fill_(self.logvar_init)

    def encode_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H, N, width of enc_weight] first-layer outputs (before its bias) -> [B, H, N, 2r] (mu, logvar).

        The fused attention path computes the first layer as part of the value projection."""
        hidden = hidden + self.enc_bias[:, None]
        w, b = self.enc_out_weight, self.enc_out_bias
        if w is not None and b is not None:  # MLP encoder
            hidden = _per_head(F.gelu(hidden), w, b)
        return hidden

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, head_dim] attention outputs -> [B, H, N, 2r] encoder outputs."""
        return self.encode_hidden(torch.einsum('bhnd,hde->bhne', x, self.enc_weight))

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """[B, H, N, r] latents -> input of the decoder's last layer (z itself when linear)."""
        w, b = self.dec_in_weight, self.dec_in_bias
        if w is not None and b is not None:  # MLP decoder
            return F.gelu(_per_head(z, w, b))
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, H, N, r] latents -> [B, H, N, head_dim] decoded head outputs."""
        return _per_head(self.decode_hidden(z), self.dec_weight, self.dec_bias)

    def forward(self, stats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, H, N, 2r] encoder outputs -> z, mu, logvar, each [B, H, N, r]."""
        mu, logvar = stats.chunk(2, dim=-1)
        logvar = logvar.clamp(self.logvar_clamp[0], self.logvar_clamp[1])
        if self.training or self.sample_in_eval:
            # a fresh contiguous tensor: randn_like of the strided chunk takes a slow serial path on CPU
            eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device)
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = mu
        return z, mu, logvar

    def extra_repr(self) -> str:
        s = f'num_heads={self.num_heads}, head_dim={self.head_dim}, vib_dim={self.vib_dim}, vib_hidden={self.vib_hidden}'
        return s + (', small_init_dec=True' if self.small_init_dec else '')


def _maps_wanted(q: torch.Tensor, attn_drop: nn.Module) -> bool:
    """Attention maps are asked for while FX traces the model (``AttentionExtract(method='fx')``,
    ``create_feature_extractor``: they look for the ``attn.softmax`` node) or while a hook waits on
    ``attn_drop`` (``AttentionExtract(method='hook')``); the fused kernel never materialises them."""
    return isinstance(q, torch.fx.Proxy) or bool(attn_drop._forward_hooks) or bool(attn_drop._forward_pre_hooks)


class MapAttention(Attention):
    """timm's ``Attention`` (same weights, same output) whose fused kernel steps aside when attention maps
    are asked for (see :func:`_maps_wanted`): the explicit path then runs ``softmax`` and ``attn_drop``
    as timm's non-fused path does, so ``timm.utils.AttentionExtract`` finds them with either method.
    The attention of ``vit_tiny_gap``; :class:`VIBAttention` builds on it.
    """

    def _attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v per head: [B, H, N, D] x3 -> [B, H, N, D_v]."""
        if torch.jit.is_scripting():
            fused = self.fused_attn
        else:
            fused = self.fused_attn and not _maps_wanted(q, self.attn_drop)
        if fused:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0., is_causal=is_causal)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        return attn @ v

    def _split_heads(self, t: torch.Tensor, B: int, N: int) -> torch.Tensor:
        # sizes spelled out: with -1, a batch of 0 images is ambiguous to reshape
        return t.reshape(B, N, self.num_heads, t.shape[-1] // self.num_heads).transpose(1, 2)

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).split(self.attn_dim, dim=-1)
        q, k, v = self._split_heads(q, B, N), self._split_heads(k, B, N), self._split_heads(v, B, N)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, attn_mask, is_causal)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class VIBAttention(MapAttention):
    """timm's multi-head self-attention with a :class:`HeadBottleneck` on each head's output.

    Same constructor as :class:`timm.layers.Attention` plus the bottleneck's ``vib_dim``,
    ``vib_hidden``, ``vib_logvar_init`` and ``vib_small_init_dec``; same options (qk_norm,
    scale_norm, gated, masks, causal, fused or explicit attention).
    ``forward(x)`` returns the tokens; ``forward_kl(x)`` also returns the KL [B, heads, tokens] in nats
    (float32).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            vib_dim: int = 32,
            vib_logvar_init: float = -6.0,
            vib_hidden: int = 0,
            vib_small_init_dec: bool = False,
            **kwargs,
    ):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self._add_bottleneck(vib_dim, vib_logvar_init, vib_hidden, vib_small_init_dec)

    def _add_bottleneck(self, vib_dim, vib_logvar_init, vib_hidden, vib_small_init_dec) -> None:
        w = self.qkv.weight
        self.vib = HeadBottleneck(
            self.num_heads, self.head_dim, vib_dim, vib_logvar_init, vib_hidden=vib_hidden,
            small_init_dec=vib_small_init_dec, device=w.device, dtype=w.dtype)
        # the encoder composes with the value projection and the decoder with the output projection
        # unless a norm or gate sits between the head outputs and ``proj``
        self.foldable = isinstance(self.norm, nn.Identity) and self.gate is None
        # Folded, attention runs over the encoder's first-layer width and the output projection reads the
        # decoder's last-layer input: cheaper only when neither is wider than head_dim (ViT-Tiny's 64 hidden
        # units on heads of 64). Wider (64 on the demo's heads of 16) the explicit path does fewer products:
        # 1.6x instead of 2.2x the ViT's training step there, on one thread (benchmarks/overhead.py --scale demo).
        # Set it True or False to force either path; both compute the same function.
        self.fold_projections = max(self.vib.enc_weight.shape[-1], self.vib.dec_weight.shape[1]) <= self.head_dim

    @classmethod
    def from_attention(
            cls,
            attn: Attention,
            vib_dim: int = 32,
            vib_logvar_init: float = -6.0,
            vib_hidden: int = 0,
            vib_small_init_dec: bool = False,
    ) -> 'VIBAttention':
        """Turn a timm ``Attention`` into a ``VIBAttention`` in place, keeping its weights."""
        if isinstance(attn, VIBAttention):
            return attn
        if type(attn) not in (Attention, MapAttention):
            raise TypeError(
                f'only timm.layers.Attention can take a bottleneck, got {type(attn).__name__} '
                '(its forward differs, so the bottleneck cannot be placed on the head outputs)')
        attn.__class__ = cls
        attn._add_bottleneck(vib_dim, vib_logvar_init, vib_hidden, vib_small_init_dec)
        return attn

    __jit_unused_properties__ = ['can_fold']

    @property
    def can_fold(self) -> bool:
        """Whether forward runs the folded projections (see the module docstring)."""
        return self.fold_projections and self.foldable

    def _forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, C] tokens -> output tokens [B, N, C], posterior mu and logvar [B, H, N, r]."""
        B, N, C = x.shape
        H, D, A = self.num_heads, self.head_dim, self.attn_dim
        vib = self.vib
        fold = self.fold_projections and self.foldable
        if fold:
            # value projection composed with the encoder's first layer: [H * width, C]
            w_q, w_k, w_v = self.qkv.weight.split(A)
            w_ve = torch.einsum('hdc,hde->hec', w_v.reshape(H, D, C), vib.enc_weight).reshape(-1, C)
            weight = torch.cat([w_q, w_k, w_ve])
            qkv_bias = self.qkv.bias
            bias: Optional[torch.Tensor] = None
            if qkv_bias is not None:
                b_q, b_k, b_v = qkv_bias.split(A)
                bias = torch.cat([b_q, b_k, torch.einsum('hd,hde->he', b_v.reshape(H, D), vib.enc_weight).reshape(-1)])
            q, k, v = F.linear(x, weight, bias).split([A, A, w_ve.shape[0]], dim=-1)
        else:
            q, k, v = self.qkv(x).split(A, dim=-1)
        q, k, v = self._split_heads(q, B, N), self._split_heads(k, B, N), self._split_heads(v, B, N)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self._attend(q, k, v, attn_mask, is_causal)

        # the first encoder layer's bias comes after attention (exact even under attention dropout)
        stats = vib.encode_hidden(out) if fold else vib.encode(out)
        z, mu, logvar = vib(stats)

        if fold:
            # decoder's last layer composed with the output projection: [C, H * width]
            w_p = self.proj.weight
            w_out = torch.einsum('chd,hed->che', w_p.reshape(-1, H, D), vib.dec_weight).reshape(w_p.shape[0], -1)
            b_out = w_p @ vib.dec_bias.reshape(-1)
            proj_bias = self.proj.bias
            if proj_bias is not None:
                b_out = b_out + proj_bias
            x_out = F.linear(vib.decode_hidden(z).transpose(1, 2).reshape(B, N, w_out.shape[1]), w_out, b_out)
        else:
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            x_out = self.norm(vib.decode(z).transpose(1, 2).reshape(B, N, A))
            if gate is not None:
                x_out = x_out * gate
            x_out = self.proj(x_out)
        return self.proj_drop(x_out), mu, logvar

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """[B, N, C] tokens -> [B, N, C] tokens, as timm's ``Attention``."""
        return self._forward(x, attn_mask, is_causal)[0]

    def forward_kl(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, N, C] tokens -> tokens [B, N, C] and KL [B, heads, N] (float32, nats)."""
        x, mu, logvar = self._forward(x, attn_mask, is_causal)
        return x, gaussian_kl(mu, logvar)


class VIBBlock(Block):
    """timm's pre-norm transformer ``Block`` whose attention is a :class:`VIBAttention`.

    ``forward(x)`` returns tokens as a timm block does (so ``nn.Sequential``, feature extraction,
    TorchScript and ``forward_intermediates`` work); ``forward_kl(x)`` returns (tokens, kl [B, heads, N]).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            vib_dim: int = 32,
            vib_logvar_init: float = -6.0,
            vib_hidden: int = 0,
            vib_small_init_dec: bool = False,
            **kwargs,
    ):
        super().__init__(dim, num_heads, **kwargs)
        VIBAttention.from_attention(self.attn, vib_dim, vib_logvar_init, vib_hidden, vib_small_init_dec)

    @classmethod
    def from_block(cls, block: Block, **vib_args: Any) -> 'VIBBlock':
        """Turn a timm ``Block`` into a ``VIBBlock`` in place, keeping its weights (``vib_args``: those
        of :meth:`VIBAttention.from_attention`)."""
        if isinstance(block, VIBBlock):
            return block
        if type(block) is not Block:
            raise TypeError(f'only timm Block can take a bottleneck, got {type(block).__name__}')
        VIBAttention.from_attention(block.attn, **vib_args)
        block.__class__ = cls
        return block

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_kl(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, N, C] tokens -> tokens [B, N, C] and the KL of its heads [B, heads, N] (float32, nats)."""
        a, mu, logvar = self.attn._forward(self.norm1(x), attn_mask, is_causal)
        x = x + self.drop_path1(self.ls1(a))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, gaussian_kl(mu, logvar)


class MlpBlock(nn.Module):
    """A transformer block with its attention branch removed: tokens never communicate.

    Takes the arguments of timm's ``Block`` (attention ones are ignored) and keeps its parameter
    names (norm2, mlp, ls2), so the MLP weights line up with those of a full block.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            scale_mlp_norm: bool = False,
            device=None,
            dtype=None,
            **attn_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads  # the KL it reports (zero) keeps the [heads] axis of its siblings
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            norm_layer=norm_layer if scale_mlp_norm else None,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """[B, N, C] tokens -> [B, N, C] tokens, each on its own (``attn_mask`` / ``is_causal`` have nothing to mask)."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_kl(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens and a zero KL [B, heads, N] (float32): nothing is communicated."""
        return self.forward(x), x.new_zeros(x.shape[0], self.num_heads, x.shape[1], dtype=torch.float32)


def _traced_flag(return_kl: Any) -> bool:
    """``return_kl`` as a Python bool. FX makes every argument a graph input (a Proxy): the traced graph
    is the logits path, with an assert node that refuses ``return_kl=True`` when the graph is called."""
    if isinstance(return_kl, torch.fx.Proxy):
        torch._assert(
            return_kl == False,  # noqa: E712 (a graph node, not a Python comparison)
            'this FX graph of a timm_vib model computes logits only; call the model itself with return_kl=True')
        return False
    return bool(return_kl)


@torch.fx.wrap
@register_notrace_function  # (timm's tracers autowrap only names without a leading underscore)
def check_image_batch(
        x: torch.Tensor, in_chans: int, img_size: Optional[Tuple[int, int]], fixed_size: bool, name: str,
) -> torch.Tensor:
    """``x`` itself if it is a batch of ``in_chans``-channel images of the size the model was built for,
    else a ValueError naming the problem. A leaf of FX graphs (symbolic tracing cannot branch on shapes),
    so a traced model checks its input eagerly with the same messages; it returns ``x`` so that the graph
    keeps it on the data path. Scriptable, for FX graphs that are scripted."""
    if not torch.jit.is_scripting():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f'{name} expects images [batch, channels, height, width], got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{name} expects images [batch, channels, height, width], got shape {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{name} expects {in_chans} input channels (NCHW), got {x.shape[1]} in an input of shape {list(x.shape)}')
    if not x.is_floating_point():
        raise ValueError(
            f'{name} expects floating-point images, got {x.dtype}: convert them with the model\'s normalisation '
            '(timm.data.resolve_model_data_config and create_transform)')
    if fixed_size and img_size is not None and (x.shape[-2] != img_size[0] or x.shape[-1] != img_size[1]):
        raise ValueError(
            f'{name} was built for {img_size[0]}x{img_size[1]} images, got {x.shape[-2]}x{x.shape[-1]}; resize the '
            f'input, or create the model with img_size={x.shape[-2]} (or dynamic_img_size=True)')
    return x


class VIBMixin:
    """What a VisionTransformer gains from bottlenecks: ``beta``, ``return_kl`` and clear errors.

    Mixed into :class:`VisionTransformerVIB`, and into the class of a model that :func:`vibify` converts.
    """
    attn_mode: str = 'vib'
    # Python-side conveniences that TorchScript need not compile
    __jit_unused_properties__ = ['beta', 'has_bottleneck', 'vib_dim', 'vib_hidden', 'stochastic_eval']

    @property
    def beta(self) -> float:
        """Information cost: the loss is CE + beta * information_loss(kl)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    @property
    def has_bottleneck(self) -> bool:
        return self.attn_mode == 'vib'

    def bottlenecks(self):
        """The :class:`HeadBottleneck` of every block, in depth order."""
        return [m for m in self.modules() if isinstance(m, HeadBottleneck)]

    @property
    def vib_dim(self) -> Optional[int]:
        b = self.bottlenecks()
        return b[0].vib_dim if b else None

    @property
    def vib_hidden(self) -> Optional[int]:
        """Hidden width of the bottlenecks' encoder / decoder MLPs (0: linear; None: no bottleneck)."""
        b = self.bottlenecks()
        return b[0].vib_hidden if b else None

    @property
    def stochastic_eval(self) -> bool:
        """If True, eval mode samples z as training does (the paper's stochastic validation);
        if False (default), eval mode uses the posterior mean mu."""
        return any(b.sample_in_eval for b in self.bottlenecks())

    @stochastic_eval.setter
    def stochastic_eval(self, enabled: bool) -> None:
        if not self.has_bottleneck:
            raise ValueError(f'{self._name()} has no bottleneck to sample from (attn_mode={self.attn_mode!r})')
        for b in self.bottlenecks():
            b.sample_in_eval = bool(enabled)

    def set_stochastic_eval(self, enabled: bool = True) -> 'VIBMixin':
        self.stochastic_eval = enabled
        return self

    def _name(self) -> str:
        cfg = getattr(self, 'pretrained_cfg', None) or {}
        return cfg.get('architecture', type(self).__name__)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Prefix tokens and every bottleneck parameter (appendix A). Unlike timm's ViT default,
        pos_embed is decayed, as in the paper."""
        names = {'cls_token', 'reg_token', 'dist_token'}
        names |= {n for n, _ in self.named_parameters() if '.vib.' in n}
        return names

    def _run_blocks_kl(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor],
            is_causal: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        kls = []
        for blk in self.blocks:
            if self.grad_checkpointing:
                x, kl = checkpoint(blk.forward_kl, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x, kl = blk.forward_kl(x, attn_mask=attn_mask, is_causal=is_causal)
            kls.append(kl)
        return x, torch.stack(kls, dim=1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # a leaf for FX (register_notrace_function): the eager checks and messages survive tracing
            x = check_image_batch(x, self.in_chans, self.patch_embed.img_size, self._fixed_img_size(), self._name())
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    @torch.jit.unused
    def _fixed_img_size(self) -> bool:
        pe = self.patch_embed
        return (not self.dynamic_img_size and getattr(pe, 'strict_img_size', False)
                and not getattr(pe, 'dynamic_img_pad', False))

    def forward_features(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """Images [B, C, H, W] -> normed tokens [B, N, embed_dim], as timm's ViT."""
        x = self._embed(x)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.unused
    def forward_features_kl(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images [B, C, H, W] -> normed tokens [B, N, embed_dim] and kl [B, depth, heads, N] (float32, nats).
        Eager / FX / torch.compile only (a scripted model runs ``forward(x)``)."""
        if self.attn_mode == 'plain':
            raise ValueError(
                f'{self._name()} has no information bottleneck (attn_mode={self.attn_mode!r}): its attention '
                'writes are unrestricted, so there is no KL to return; call model(x) without return_kl')
        x = self._embed(x)
        x, kl = self._run_blocks_kl(x, attn_mask, is_causal)
        return self.norm(x), kl

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
            return_kl: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Images [B, C, H, W] -> logits [B, classes]; with ``return_kl`` also kl [B, depth, heads, tokens]
        float32 in nats (zeros for the attention-free model; an error for a model without bottleneck)."""
        if not torch.jit.is_scripting():
            return_kl = _traced_flag(return_kl)
        if return_kl:
            x, kl = self.forward_features_kl(x, attn_mask=attn_mask, is_causal=is_causal)
            return self.forward_head(x), kl
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if strict:
            mine = any('.vib.' in k for k, _ in self.named_parameters())
            theirs = any('.vib.' in k for k in state_dict)
            if mine and not theirs:
                raise ValueError(
                    f'{self._name()} has an information bottleneck in every attention head, but this state dict '
                    'has no bottleneck weights (".attn.vib.*"): it comes from a model without bottlenecks '
                    '(vit_tiny_gap, vit_tiny_noattn or a plain timm ViT). Load it into that architecture, '
                    'or put bottlenecks into it with timm_vib.vibify(model)')
            if theirs and not mine:
                raise ValueError(
                    f'this state dict has information bottleneck weights (".attn.vib.*") but {self._name()} '
                    f'(attn_mode={self.attn_mode!r}) has none: it belongs to a vit_tiny_vib model')
            mlp_mine = any(k.endswith('.vib.enc_out_weight') for k, _ in self.named_parameters())
            mlp_theirs = any(k.endswith('.vib.enc_out_weight') for k in state_dict)
            if mine and theirs and mlp_mine != mlp_theirs:
                layout = 'MLP encoders / decoders' if mlp_theirs else 'linear encoders / decoders (vib_hidden=0)'
                raise ValueError(
                    f'this state dict has bottlenecks with {layout} but {self._name()} was built with '
                    f'vib_hidden={self.vib_hidden}: create the model with '
                    + ('vib_hidden=<the hidden width it was trained with>' if mlp_theirs else 'vib_hidden=0')
                    + ' (timm_vib 0.1 checkpoints are linear)')
            has_attn = any('.attn.' in k for k, _ in self.named_parameters())
            if not has_attn and any('.attn.' in k for k in state_dict):
                raise ValueError(
                    f'this state dict has attention weights but {self._name()} has no attention (MLP-only '
                    'blocks): load it into the architecture it came from')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class VisionTransformerVIB(VIBMixin, VisionTransformer):
    """A timm VisionTransformer whose attention heads write through Gaussian bottlenecks.

    Args:
        beta: information cost (>= 0) that training multiplies the information loss by.
        vib_dim: latent size r of every head's bottleneck.
        vib_hidden: hidden width of each head's encoder and decoder MLP (one GELU layer each, the
            architecture of the paper's published runs: 64); 0 makes them linear.
        attn_mode: ``'vib'`` bottlenecked attention; ``'none'`` MLP-only blocks (zero communication);
            ``'plain'`` timm's attention unchanged (no bottleneck, no KL).
        vib_logvar_init: initial log-variance bias of the posteriors.
        vib_small_init_dec: start every decoder's last layer near zero (the reference code's
            ``small_init_dec``): the model starts as independent patches.
        stochastic_eval: sample z in eval mode too (default: the posterior mean).
        pos_embed_init: ``'trunc_normal'`` timm's learned position embedding init (std 0.02);
            ``'sincos'`` the same learned embedding started at the 2-D sin-cos embedding of MAE and of
            Beyer et al.'s plain ViT (timm's ``build_sincos2d_pos_embed``; patch tokens only): tokens
            know where they are from the first step. Needs embed_dim divisible by 4.
        **kwargs: timm ``VisionTransformer`` arguments, passed straight through.
    """

    def __init__(
            self,
            beta: float = 1.0,
            vib_dim: int = 32,
            vib_hidden: int = 64,
            attn_mode: Literal['vib', 'none', 'plain'] = 'vib',
            vib_logvar_init: float = -6.0,
            vib_small_init_dec: bool = False,
            stochastic_eval: bool = False,
            pos_embed_init: Literal['trunc_normal', 'sincos'] = 'trunc_normal',
            **kwargs: Any,
    ) -> None:
        if attn_mode not in ATTN_MODES:
            raise ValueError(f'attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}')
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f'pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}')
        beta = _check_beta(beta)
        vib_dim = _check_vib_dim(vib_dim)
        vib_hidden = _check_vib_hidden(vib_hidden)
        check_patch_grid(kwargs)
        if attn_mode == 'vib':
            if 'block_fn' in kwargs:
                raise ValueError('block_fn is set by attn_mode; use timm_vib.vibify for other block types')
            kwargs['block_fn'] = partial(
                VIBBlock, vib_dim=vib_dim, vib_logvar_init=vib_logvar_init, vib_hidden=vib_hidden,
                vib_small_init_dec=vib_small_init_dec)
        elif attn_mode == 'none':
            kwargs['block_fn'] = MlpBlock
        else:
            kwargs.setdefault('attn_layer', MapAttention)
        super().__init__(**kwargs)
        self.attn_mode = attn_mode
        self.beta = beta
        if attn_mode == 'vib':
            self.stochastic_eval = stochastic_eval
        if pos_embed_init == 'sincos' and self.embed_dim % 4:
            raise ValueError(f"pos_embed_init='sincos' needs embed_dim divisible by 4 (a sine and a cosine per "
                             f"axis), got {self.embed_dim}")
        self.pos_embed_init = pos_embed_init
        if kwargs.get('weight_init') != 'skip':
            self._init_pos_embed()

    def init_weights(self, *args: Any, **kwargs: Any) -> None:
        """timm's init (its arguments passed through: they differ between timm versions), then the position
        embedding of ``pos_embed_init``."""
        super().init_weights(*args, **kwargs)
        if hasattr(self, 'pos_embed_init'):  # timm's __init__ calls this before the attribute exists
            self._init_pos_embed()

    def _init_pos_embed(self) -> None:
        # after timm's init, so that 'sincos' draws every other weight exactly as 'trunc_normal' does
        if self.pos_embed_init != 'sincos' or self.pos_embed is None:
            return
        gh, gw = self.patch_embed.grid_size
        pe = build_sincos2d_pos_embed([gh, gw], self.embed_dim, device=self.pos_embed.device)
        with torch.no_grad():  # the last gh * gw rows: prefix tokens, if embedded, keep timm's init
            self.pos_embed[:, -gh * gw:].copy_(pe.to(self.pos_embed.dtype))


_vibified_classes: Dict[type, type] = {VisionTransformer: VisionTransformerVIB}


def vibify(
        model: VisionTransformer,
        vib_dim: int = 32,
        beta: float = 1.0,
        vib_logvar_init: float = -6.0,
        init: Literal['identity', 'random'] = 'identity',
        seed: int = 0,
        vib_hidden: int = 0,
        vib_small_init_dec: bool = False,
) -> VisionTransformer:
    """Put a Gaussian bottleneck on every attention head of a timm VisionTransformer, in place.

    Every other weight is kept. With ``init='identity'`` the means start as an orthonormal
    projection of each head's output and the decoder as its transpose, so a wide enough bottleneck
    (vib_dim >= head_dim, and vib_hidden 0 or >= 2 * head_dim) computes in eval mode exactly what the
    model computed before (up to float rounding); ``init='random'`` uses the from-scratch init.
    ``vib_hidden`` defaults to linear encoders / decoders here (the registered ``vit_tiny_vib*``
    models use the paper's MLPs of 64) because a pretrained model should start from its own function.
    The model gains ``beta``, ``model(x, return_kl=True)``, ``stochastic_eval`` and bottleneck-aware
    ``no_weight_decay``.

    Returns the same model object (its class becomes a VIB subclass of its class).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f'vibify takes a timm VisionTransformer, got {type(model).__name__}')
    if getattr(model, 'attn_mode', None) == 'none':
        raise ValueError('cannot vibify an attention-free model (attn_mode="none"): it has no heads to bottleneck')
    beta = _check_beta(beta)
    vib_args = dict(vib_dim=_check_vib_dim(vib_dim), vib_logvar_init=vib_logvar_init,
                    vib_hidden=_check_vib_hidden(vib_hidden), vib_small_init_dec=vib_small_init_dec)
    if init not in ('identity', 'random'):
        raise ValueError(f"init must be 'identity' or 'random', got {init!r}")
    if init == 'identity' and vib_args['vib_hidden'] == 1:
        raise ValueError("init='identity' needs vib_hidden 0 or >= 2 (a hidden layer of 1 cannot pass a value through)")
    generator = torch.Generator().manual_seed(seed)
    for blk in model.blocks:
        fresh = not isinstance(blk, VIBBlock)
        VIBBlock.from_block(blk, **vib_args)
        if fresh and init == 'identity':
            blk.attn.vib.init_identity(generator)
    cls = type(model)
    if not isinstance(model, VIBMixin):
        if cls not in _vibified_classes:
            _vibified_classes[cls] = type(f'{cls.__name__}VIB', (VIBMixin, cls), {'__module__': __name__})
        model.__class__ = _vibified_classes[cls]
    model.attn_mode = 'vib'
    model.beta = beta
    return model


def beta_from_name(name: str) -> Optional[float]:
    """``'vit_tiny_vib_b0p01'`` -> 0.01; None for names without a fixed beta."""
    m = re.search(r'_b(\d+(?:p\d+)?)(?:\.|$)', name)
    return float(m.group(1).replace('p', '.')) if m else None


def name_for_beta(beta: float) -> str:
    """0.01 -> ``'vit_tiny_vib_b0p01'``: the ViT-Tiny name carrying this beta (inverse of beta_from_name);
    registered only for the published betas."""
    return 'vit_tiny_vib_b' + f'{_check_beta(beta):g}'.replace('.', 'p')


_REFERENCE_IB = re.compile(r'^blocks\.(\d+)\.attn\.ib\.(enc|dec)_list\.(\d+)\.(?:(\d+)\.)?(weight|bias)$')


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict of the paper's reference code (murphyka/vit_ib ``ViTWithHeadIB``) in this layout.

    The reference wraps a class-token timm ViT (``vit.*``, its blocks also listed again under
    ``blocks.N.blk.*``) and keeps one ``nn.Linear`` or ``nn.Sequential(Linear, GELU, Linear)`` per
    head (``...attn.ib.enc_list.H`` / ``dec_list.H``). Here the per-head layers are stacked and
    transposed to [heads, in, out], the class-token position of ``pos_embed`` (which the reference
    skips) and the unused ``cls_token`` are dropped. Other state dicts are returned unchanged.
    """
    if not any(k.startswith('vit.') for k in state_dict) or not any('.attn.ib.' in k for k in state_dict):
        return dict(state_dict)
    out: Dict[str, torch.Tensor] = {}
    per_head: Dict[Tuple[int, str, str], Dict[int, torch.Tensor]] = {}
    # (side, index in the per-head Sequential, None when the head's layer is a single Linear) -> our name
    names = {('enc', '0'): 'enc', ('enc', '2'): 'enc_out', ('dec', '0'): 'dec_in', ('dec', '2'): 'dec',
             ('enc', None): 'enc', ('dec', None): 'dec'}
    for key, value in state_dict.items():
        if not key.startswith('vit.'):
            continue  # blocks.N.blk.* repeat the vit.blocks tensors
        key = key[4:]
        m = _REFERENCE_IB.match(key)
        if m:
            layer, side, head, idx, kind = m.groups()
            name = names[(side, idx)]
            per_head.setdefault((int(layer), f'{name}_{kind}', kind), {})[int(head)] = value
        elif key == 'cls_token':
            continue
        elif key == 'pos_embed':
            out[key] = value[:, 1:]  # the reference adds pos_embed[:, 1:]: no class token in its forward
        else:
            out[key.replace('.attn.ib.', '.attn.vib.')] = value
    for (layer, name, kind), heads in per_head.items():
        stacked = torch.stack([heads[h] for h in sorted(heads)])
        out[f'blocks.{layer}.attn.vib.{name}'] = stacked.transpose(1, 2) if kind == 'weight' else stacked
    return out


def _filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformerVIB) -> Dict[str, torch.Tensor]:
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    state_dict = convert_reference_state_dict(state_dict)
    # only the ViT pos_embed / patch resampling of timm's filter; the vib weights pass through as they are
    return checkpoint_filter_fn(state_dict, model)


def _create_vit_vib(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    out_indices = kwargs.pop('out_indices', 3)
    try:
        return build_model_with_cfg(
            VisionTransformerVIB,
            variant,
            pretrained,
            pretrained_filter_fn=_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    except LocalEntryNotFoundError as e:  # not cached, and the Hub out of reach: say where weights come from
        raise LocalEntryNotFoundError(_no_weights_message(variant, kwargs)) from e
    except SafetensorError as e:  # a damaged weights file: name it
        cfg = kwargs.get('pretrained_cfg')
        cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else (cfg or {})
        where = os.path.join(cfg['file'], 'model.safetensors') if cfg.get('file') else cfg.get('hf_hub_id') or variant
        raise ValueError(f'the pretrained weights of {variant} ({where}) are corrupt: {e}') from None


def _no_weights_message(variant: str, kwargs: Dict[str, Any]) -> str:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(variant)
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    repo = overlay.get('hf_hub_id') or (cfg.hf_hub_id if cfg is not None else None) or f'{HUB_NAMESPACE}/{variant}'
    return (
        f'no pretrained weights for {variant}: the Hub repo {repo} is neither in the local cache nor reachable '
        f'(offline?). Either download it once with network access, set TIMM_VIB_HUB_NAMESPACE=ORG (before '
        f'importing timm_vib) to load ORG/{variant}.in100, load a local folder with '
        f'timm.create_model("local-dir:FOLDER"), or train the weights yourself: timm-vib sweep, then timm-vib push')


# Where `pretrained=True` looks: set TIMM_VIB_HUB_NAMESPACE before importing timm_vib to use your own
# organisation's published spectrum.
HUB_NAMESPACE = os.environ.get('TIMM_VIB_HUB_NAMESPACE', 'timm-vib')

VIT_TINY_ARGS = dict(
    patch_size=16, embed_dim=192, depth=12, num_heads=3,
    class_token=False, global_pool='avg', fc_norm=False,  # final norm per token, then mean: logits = mean of patch logits
)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100,  # ImageNet-100 (Tian et al. 2020)
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


_BETA_NAMES = {'b0': 0.0, 'b0p01': 0.01, 'b0p1': 0.1, 'b1': 1.0, 'b4': 4.0, 'b10': 10.0}
MODEL_NAMES = (
    ['vit_tiny_vib'] + [f'vit_tiny_vib_{b}' for b in _BETA_NAMES] + ['vit_tiny_noattn', 'vit_tiny_gap'])

default_cfgs = generate_default_cfgs({
    f'{name}.in100': _cfg(hf_hub_id=f'{HUB_NAMESPACE}/{name}.in100') for name in MODEL_NAMES
})


def _create_fixed_beta(variant: str, fixed_beta: float, pretrained: bool, **kwargs) -> VisionTransformerVIB:
    if 'beta' in kwargs and _check_beta(kwargs['beta']) != fixed_beta:
        raise ValueError(
            f'{variant} has beta={fixed_beta:g} in its name; use vit_tiny_vib(beta={kwargs["beta"]}) for another value')
    kwargs['beta'] = fixed_beta
    return _create_vit_vib(variant, pretrained=pretrained, **dict(VIT_TINY_ARGS, **kwargs))


@register_model
def vit_tiny_vib(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """ViT-Tiny/16 with a bottleneck on every head (36), beta from the kwargs (default 1)."""
    return _create_vit_vib('vit_tiny_vib', pretrained=pretrained, **dict(VIT_TINY_ARGS, **kwargs))


@register_model
def vit_tiny_vib_b0(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny trained with beta = 0 (bottlenecks with no information cost)."""
    return _create_fixed_beta('vit_tiny_vib_b0', 0.0, pretrained, **kwargs)


@register_model
def vit_tiny_vib_b0p01(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny, beta = 0.01 (all 36 heads active in the paper)."""
    return _create_fixed_beta('vit_tiny_vib_b0p01', 0.01, pretrained, **kwargs)


@register_model
def vit_tiny_vib_b0p1(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny, beta = 0.1."""
    return _create_fixed_beta('vit_tiny_vib_b0p1', 0.1, pretrained, **kwargs)


@register_model
def vit_tiny_vib_b1(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny, beta = 1 (14 active heads in the paper)."""
    return _create_fixed_beta('vit_tiny_vib_b1', 1.0, pretrained, **kwargs)


@register_model
def vit_tiny_vib_b4(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny, beta = 4 (4 active heads in the paper)."""
    return _create_fixed_beta('vit_tiny_vib_b4', 4.0, pretrained, **kwargs)


@register_model
def vit_tiny_vib_b10(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Bottlenecked ViT-Tiny, beta = 10 (1 active head in the paper)."""
    return _create_fixed_beta('vit_tiny_vib_b10', 10.0, pretrained, **kwargs)


@register_model
def vit_tiny_noattn(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """ViT-Tiny with the attention branch removed from every block: independent patches (DeepSets)."""
    kwargs.setdefault('beta', 0.0)
    return _create_vit_vib('vit_tiny_noattn', pretrained=pretrained, attn_mode='none', **dict(VIT_TINY_ARGS, **kwargs))


@register_model
def vit_tiny_gap(pretrained: bool = False, **kwargs) -> VisionTransformerVIB:
    """Unmodified ViT-Tiny with the same pooling (no class token, per-token norm, mean): the full-attention end."""
    kwargs.setdefault('beta', 0.0)
    return _create_vit_vib('vit_tiny_gap', pretrained=pretrained, attn_mode='plain', **dict(VIT_TINY_ARGS, **kwargs))
