"""The bottlenecked ViT as a Keras model, builders mirroring the timm names, and the KL read-out.

The model adds beta * mean(KL) to its losses (mean over batch, layers, heads and tokens: the
convention of ``timm_vib.information_loss`` that the published betas use), so

    model.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels)

optimises CE + beta * KL. beta is held in a non-trainable variable (``model.beta_variable``) that the
loss reads, so a compiled train step sees a new value (``BetaWarmup`` ramps it during ``fit``).
"""
import numbers
from typing import Any, Dict, Literal, Optional, Sequence, Union

import numpy as np
import keras
from keras import ops

from .layers import MlpBlock, PatchEmbedding, PoolingHead, TransformerBlock, _as_pair, check_images, gaussian_kl

__all__ = [
    'VisionTransformerVIB', 'kl_and_latents', 'information_loss', 'create_model', 'PRESETS', 'MODEL_NAMES',
    'vit_tiny_vib', 'vit_tiny_vib_b0', 'vit_tiny_vib_b0p01', 'vit_tiny_vib_b0p1', 'vit_tiny_vib_b1',
    'vit_tiny_vib_b4', 'vit_tiny_vib_b10', 'vit_tiny_noattn', 'vit_tiny_gap',
]

ATTN_MODES = ('vib', 'none', 'plain')


def _check_beta(beta: float) -> float:
    # float() would take True and '2': a flag or a string here is a mistake, not a cost
    if isinstance(beta, (bool, np.bool_)) or not isinstance(beta, numbers.Real):
        raise ValueError(f'beta must be a number, got {beta!r}')
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f'beta must be a number, got {beta!r}') from None
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f'beta is the information cost in the loss and must be finite and >= 0, got {beta}')
    return beta


@keras.saving.register_keras_serializable(package='keras_vib')
class VisionTransformerVIB(keras.Model):
    """ViT with a Gaussian bottleneck on every attention head (timm_vib.VisionTransformerVIB).

    Images [batch, height, width, in_chans] (channels last) -> logits [batch, num_classes].
    No class token; learned position embeddings; pre-norm blocks; final LayerNorm per token, mean
    over tokens, Dense head.

    Args:
        image_size, patch_size: int or (height, width).
        in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: as timm's ViT.
        attn_mode: 'vib' bottlenecked attention; 'none' MLP-only blocks (no communication between
            patches, KL zero); 'plain' attention without bottleneck (no KL).
        vib_dim: latent size r per head.
        vib_hidden: hidden width of each head's encoder / decoder MLP (the paper's runs: 64); 0 = linear.
        beta: information cost; the model adds beta * mean KL (nats) to its losses.
        vib_logvar_init: initial log-variance bias of the posteriors.
        layer_norm_epsilon: LayerNorm epsilon (timm's ViT: 1e-6).
        seed: seed of the bottleneck noise (layer i gets seed + i).
        vib_small_init_dec: start every decoder's last layer near zero (timm_vib's option of that name).
        pos_embed_init: 'trunc_normal' (timm's) or 'sincos' (started at the 2-D sin-cos embedding), as timm_vib.
        **kwargs: name, dtype (a dtype policy such as 'mixed_bfloat16', passed to every sublayer), trainable.
    """

    def __init__(
            self,
            image_size: Union[int, Sequence[int]] = 224,
            patch_size: Union[int, Sequence[int]] = 16,
            in_chans: int = 3,
            num_classes: int = 100,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            attn_mode: Literal['vib', 'none', 'plain'] = 'vib',
            vib_dim: int = 32,
            beta: float = 1.0,
            vib_logvar_init: float = -6.0,
            layer_norm_epsilon: float = 1e-6,
            seed: Optional[int] = None,
            vib_hidden: int = 64,
            vib_small_init_dec: bool = False,
            pos_embed_init: str = 'trunc_normal',
            **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if attn_mode not in ATTN_MODES:
            raise ValueError(f'attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}')
        if isinstance(vib_dim, bool) or not isinstance(vib_dim, numbers.Integral) or vib_dim < 1:
            raise ValueError(f'vib_dim (the latent size r per head) must be an integer >= 1, got {vib_dim!r}')
        vib_dim = int(vib_dim)  # numpy integers too; get_config holds a plain int
        if isinstance(vib_hidden, numbers.Integral) and not isinstance(vib_hidden, bool):
            vib_hidden = int(vib_hidden)
        for what, value, low in (('depth', depth, 1), ('num_heads', num_heads, 1), ('embed_dim', embed_dim, 1),
                                 ('in_chans', in_chans, 1), ('num_classes', num_classes, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f'{what} must be an integer >= {low}, got {value!r}')
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        self.image_size = _as_pair(image_size, 'image_size')
        self.patch_size = _as_pair(patch_size, 'patch_size')
        self.in_chans, self.num_classes, self.embed_dim = int(in_chans), int(num_classes), int(embed_dim)
        self.depth, self.num_heads, self.mlp_ratio = int(depth), int(num_heads), float(mlp_ratio)
        self.qkv_bias, self.attn_mode, self.vib_dim = bool(qkv_bias), attn_mode, vib_dim
        self.vib_logvar_init, self.layer_norm_epsilon, self.seed = float(vib_logvar_init), float(layer_norm_epsilon), seed
        self.vib_hidden = vib_hidden
        self.vib_small_init_dec, self.pos_embed_init = bool(vib_small_init_dec), pos_embed_init
        self._beta = _check_beta(beta)
        dt = self.dtype_policy
        self.patch_embed = PatchEmbedding(
            self.image_size, self.patch_size, embed_dim, in_chans, pos_embed_init=pos_embed_init, dtype=dt,
            name='patch_embed')
        self.blocks = []
        for i in range(self.depth):
            if attn_mode == 'none':
                blk = MlpBlock(embed_dim, mlp_ratio, layer_norm_epsilon, dtype=dt, name=f'blocks_{i}')
            else:
                blk = TransformerBlock(
                    embed_dim, num_heads, mlp_ratio, vib_dim=vib_dim if attn_mode == 'vib' else None,
                    qkv_bias=qkv_bias, kl_weight=0.0, logvar_init=vib_logvar_init,
                    layer_norm_epsilon=layer_norm_epsilon, seed=None if seed is None else seed + i,
                    vib_hidden=vib_hidden, small_init_dec=vib_small_init_dec, dtype=dt, name=f'blocks_{i}')
            self.blocks.append(blk)
        self.head = PoolingHead(num_classes, layer_norm_epsilon, dtype=dt, name='head')
        self.build((None,) + self.image_size + (self.in_chans,))

    # --- beta ---------------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        """Information cost: training minimises CE + beta * mean KL (nats)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        # the loss reads the non-trainable variable ``beta_variable``, so a compiled train step
        # (JAX, TensorFlow) sees a new value without recompiling; on JAX, inside fit, sync the
        # state first (``model.jax_state_sync()``, as BetaWarmup does)
        self._beta = _check_beta(value)
        if self.attn_mode == 'vib':
            self.beta_variable.assign(self._beta)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # --- forward -------------------------------------------------------------------------------

    def build(self, input_shape) -> None:
        check_images(input_shape, self.image_size, self.in_chans, self._who())
        self.patch_embed.build(input_shape)
        tokens = (input_shape[0], self.num_patches, self.embed_dim)
        for blk in self.blocks:
            blk.build(tokens)
        self.head.build(tokens)
        if self.attn_mode == 'vib' and not hasattr(self, 'beta_variable'):
            self.beta_variable = self.add_weight(
                name='beta', shape=(), dtype='float32', trainable=False,
                initializer=keras.initializers.Constant(self._beta))
        self.built = True

    def _who(self) -> str:
        return f'{self.name} ({self.attn_mode} attention)'

    def forward_features(self, images, training=None, return_latents: bool = False):
        """Images -> tokens [batch, tokens, embed_dim] before the final norm; with ``return_latents``
        also lists of per-layer mu, logvar [batch, tokens, heads, r] (None entries without bottleneck)."""
        check_images(images.shape, self.image_size, self.in_chans, self._who(), images.dtype)
        x = self.patch_embed(images)
        mus, logvars = [], []
        for blk in self.blocks:
            if return_latents:
                x, mu, logvar = blk(x, training=training, return_latents=True)
                mus.append(mu)
                logvars.append(logvar)
            else:
                x = blk(x, training=training)
        return (x, mus, logvars) if return_latents else x

    def call(self, images, training=None):
        if self.attn_mode != 'vib':
            return self.head(self.forward_features(images, training=training))
        x, mus, logvars = self.forward_features(images, training=training, return_latents=True)
        # beta * mean KL over batch, layers, heads and tokens (every layer has as many terms)
        kl = ops.mean(ops.stack([ops.mean(gaussian_kl(mu, logvar)) for mu, logvar in zip(mus, logvars)]))
        self.add_loss(self.beta_variable * kl)
        return self.head(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes or self.embed_dim)

    def kl_and_latents(self, images, training: bool = False) -> Dict[str, Any]:
        """One forward pass returning backend tensors:

        logits [B, classes]; kl [B, depth, heads, tokens] float32 nats; mu and logvar
        [B, depth, heads, tokens, r] (the latent posteriors, None for ``attn_mode='none'``, whose
        kl is zero). ``attn_mode='plain'`` has no bottleneck and raises ValueError.
        """
        if self.attn_mode == 'plain':
            raise ValueError(
                f'{self._who()} has no information bottleneck: its attention writes are unrestricted, so there '
                'is no KL or latent to return')
        images = ops.convert_to_tensor(images, dtype=self.compute_dtype)
        x, mus, logvars = self.forward_features(images, training=training, return_latents=True)
        logits = self.head(x)
        if self.attn_mode == 'none':
            b = ops.shape(x)[0]
            return dict(logits=logits, kl=ops.zeros((b, self.depth, self.num_heads, self.num_patches), 'float32'),
                        mu=None, logvar=None)
        # [B, N, H, r] per layer -> [B, depth, H, N, r], timm's axis order
        mu = ops.transpose(ops.stack(mus, axis=1), (0, 1, 3, 2, 4))
        logvar = ops.transpose(ops.stack(logvars, axis=1), (0, 1, 3, 2, 4))
        return dict(logits=logits, kl=gaussian_kl(mu, logvar), mu=mu, logvar=logvar)

    def get_config(self) -> Dict[str, Any]:
        config = {'name': self.name, 'trainable': self.trainable,
                  'dtype': keras.dtype_policies.serialize(self.dtype_policy)}
        config.update(
            image_size=list(self.image_size), patch_size=list(self.patch_size), in_chans=self.in_chans,
            num_classes=self.num_classes, embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, attn_mode=self.attn_mode, vib_dim=self.vib_dim,
            beta=self.beta, vib_logvar_init=self.vib_logvar_init, layer_norm_epsilon=self.layer_norm_epsilon,
            seed=self.seed, vib_hidden=self.vib_hidden, vib_small_init_dec=self.vib_small_init_dec,
            pos_embed_init=self.pos_embed_init)
        return config

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> 'VisionTransformerVIB':
        config = dict(config)
        if isinstance(config.get('dtype'), dict):
            config['dtype'] = keras.dtype_policies.deserialize(config['dtype'])
        return cls(**config)


def kl_and_latents(
        model: VisionTransformerVIB,
        images,
        training: bool = False,
        batch_size: Optional[int] = None,
        as_numpy: bool = True,
) -> Dict[str, Optional[np.ndarray]]:
    """Per-token KL and latent posteriors of a keras_vib model, for the estimators.

    Args:
        model: a :class:`VisionTransformerVIB` with a bottleneck (or attn_mode='none': zero KL).
        images: [B, H, W, C] channels-last, numpy or backend tensor.
        training: sample z as in training (the KL and mu / logvar do not depend on it in the first
            layer; later layers see the sampled writes of earlier ones).
        batch_size: run in chunks of this many images (numpy output only).
        as_numpy: numpy arrays (default) or backend tensors.

    Returns:
        dict with ``logits`` [B, classes], ``kl`` [B, depth, heads, tokens] float32 nats, ``mu`` and
        ``logvar`` [B, depth, heads, tokens, r] (None for the attention-free model).
    """
    if not isinstance(model, VisionTransformerVIB):
        raise TypeError(f'kl_and_latents takes a keras_vib VisionTransformerVIB, got {type(model).__name__}')
    if isinstance(images, (list, tuple)):
        images = np.asarray(images)
    if not hasattr(images, 'shape') or len(images.shape) != 4:
        raise ValueError(f'images must be a [batch, height, width, channels] array, got '
                         f'{getattr(images, "shape", type(images).__name__)}')
    if int(images.shape[0]) == 0:
        raise ValueError('images holds 0 images: there is nothing to measure')
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f'batch_size must be an integer >= 1 (or None: all at once), got {batch_size!r}')
    if not as_numpy:
        return model.kl_and_latents(images, training=training)
    n = int(images.shape[0])
    step = batch_size or n
    parts = []
    for i in range(0, n, step):
        out = model.kl_and_latents(images[i:i + step], training=training)
        parts.append({k: None if v is None else ops.convert_to_numpy(v) for k, v in out.items()})
    return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in parts[0]}


SQRT_EPS = 1e-8  # the reference code's SAFETY_EPSILON, as timm_vib's


def information_loss(kl, reduction: Literal['mean', 'sum', 'sqrt'] = 'mean'):
    """The information term of the loss from kl [batch, depth, heads, tokens] (nats), as timm_vib:
    ``'mean'`` over every axis (the convention of the published betas, what ``fit`` uses),
    ``'sum'`` over depth x heads x tokens, mean over the batch (eq. 3 of the paper, nats per image),
    ``'sqrt'`` the reference code's ``--sqrt-kl``: the square root of each head's mean KL over tokens, then
    the mean over layers, heads and batch (sqrt-nats)."""
    kl = ops.cast(ops.convert_to_tensor(kl), 'float32')
    if len(kl.shape) != 4:
        raise ValueError(f'kl must be [batch, depth, heads, tokens], got shape {tuple(kl.shape)}')
    if kl.shape[0] == 0:
        raise ValueError('kl holds a batch of 0 images: the mean information over it is undefined')
    if reduction == 'mean':
        return ops.mean(kl)
    if reduction == 'sum':
        return ops.mean(ops.sum(kl, axis=(1, 2, 3)))
    if reduction == 'sqrt':
        return ops.mean(ops.sqrt(ops.maximum(ops.mean(kl, axis=3), 0.0) + SQRT_EPS))
    raise ValueError(f"reduction must be 'mean', 'sum' or 'sqrt', got {reduction!r}")


# --- builders mirroring the timm names ----------------------------------------------------------

VIT_TINY_ARGS = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, image_size=224, num_classes=100)

_BETA_NAMES = {'b0': 0.0, 'b0p01': 0.01, 'b0p1': 0.1, 'b1': 1.0, 'b4': 4.0, 'b10': 10.0}

# name -> fixed arguments; beta=None: a kwarg (default 1)
PRESETS: Dict[str, Dict[str, Any]] = {'vit_tiny_vib': dict(attn_mode='vib', beta=None)}
PRESETS.update({f'vit_tiny_vib_{k}': dict(attn_mode='vib', beta=v) for k, v in _BETA_NAMES.items()})
PRESETS['vit_tiny_noattn'] = dict(attn_mode='none', beta=0.0)
PRESETS['vit_tiny_gap'] = dict(attn_mode='plain', beta=0.0)
MODEL_NAMES = tuple(PRESETS)


def create_model(name: str, **kwargs: Any) -> VisionTransformerVIB:
    """Build the Keras model of a timm_vib name (``vit_tiny_vib_b4``, ``vit_tiny_noattn``, ...).

    kwargs override ViT-Tiny's (image_size 224, patch_size 16, embed_dim 192, depth 12, num_heads 3,
    num_classes 100) and take any :class:`VisionTransformerVIB` argument; ``dtype`` is a dtype policy.
    """
    if name not in PRESETS:
        raise ValueError(f'unknown model {name!r}; keras_vib has {", ".join(MODEL_NAMES)}')
    preset = dict(PRESETS[name])
    fixed_beta = preset.pop('beta')
    if 'attn_mode' in kwargs and kwargs['attn_mode'] != preset['attn_mode']:
        raise ValueError(f'{name} has attn_mode={preset["attn_mode"]!r}; got attn_mode={kwargs["attn_mode"]!r}')
    if name.startswith('vit_tiny_vib_') and 'beta' in kwargs and _check_beta(kwargs['beta']) != fixed_beta:
        raise ValueError(f'{name} has beta={fixed_beta:g} in its name; use vit_tiny_vib(beta={kwargs["beta"]})')
    if fixed_beta is not None:
        kwargs.setdefault('beta', fixed_beta)
    kwargs.setdefault('name', name)
    return VisionTransformerVIB(**{**VIT_TINY_ARGS, **preset, **kwargs})


def vit_tiny_vib(beta: float = 1.0, num_classes: int = 100, image_size=224, patch_size=16, **kwargs) -> VisionTransformerVIB:
    """ViT-Tiny with a bottleneck on every head, beta as an argument."""
    return create_model('vit_tiny_vib', beta=beta, num_classes=num_classes, image_size=image_size,
                        patch_size=patch_size, **kwargs)


def _fixed(name: str, doc: str):
    def builder(num_classes: int = 100, image_size=224, patch_size=16, **kwargs) -> VisionTransformerVIB:
        return create_model(name, num_classes=num_classes, image_size=image_size, patch_size=patch_size, **kwargs)
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = doc
    return builder


vit_tiny_vib_b0 = _fixed('vit_tiny_vib_b0', 'Bottlenecked ViT-Tiny, beta = 0.')
vit_tiny_vib_b0p01 = _fixed('vit_tiny_vib_b0p01', 'Bottlenecked ViT-Tiny, beta = 0.01.')
vit_tiny_vib_b0p1 = _fixed('vit_tiny_vib_b0p1', 'Bottlenecked ViT-Tiny, beta = 0.1.')
vit_tiny_vib_b1 = _fixed('vit_tiny_vib_b1', 'Bottlenecked ViT-Tiny, beta = 1.')
vit_tiny_vib_b4 = _fixed('vit_tiny_vib_b4', 'Bottlenecked ViT-Tiny, beta = 4.')
vit_tiny_vib_b10 = _fixed('vit_tiny_vib_b10', 'Bottlenecked ViT-Tiny, beta = 10.')
vit_tiny_noattn = _fixed('vit_tiny_noattn', 'ViT-Tiny with MLP-only blocks: independent patches (KL zero).')
vit_tiny_gap = _fixed('vit_tiny_gap', 'Unmodified ViT-Tiny with the same pooling (no bottleneck, no KL).')
