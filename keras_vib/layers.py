"""Keras 3 layers of the bottlenecked ViT, weight for weight the modules of ``timm_vib``.

Token tensors are [batch, tokens, channels]; inside attention, per-head tensors are
[batch, tokens, heads, head_dim] (Keras's attention layout). Every layer is registered as
``keras_vib>Name`` and its ``get_config`` holds exactly its constructor arguments.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import keras
import numpy as np
from keras import ops

__all__ = [
    'GaussianBottleneck', 'VIBMultiHeadAttention', 'TransformerBlock', 'MlpBlock', 'PatchEmbedding',
    'PoolingHead', 'gaussian_kl', 'check_images', 'sincos_2d', 'POS_EMBED_INITS',
]

_register = keras.saving.register_keras_serializable(package='keras_vib')


def _dense_init():
    # timm's ViT init for Linear layers, trunc_normal_(std=.02) with zero bias: its cut is at +-2 in absolute
    # terms, 100 standard deviations, so a plain normal (Keras's TruncatedNormal cuts at 2 standard deviations:
    # std 0.0176)
    return keras.initializers.RandomNormal(stddev=0.02)


def _conv_inits(fan_in: int):
    """torch's nn.Conv2d default, which timm leaves on the patch embedding: kaiming_uniform_(a=sqrt(5)) for the
    kernel and U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias, i.e. both uniform within 1/sqrt(fan_in)."""
    bound = fan_in ** -0.5
    return dict(kernel_initializer=keras.initializers.VarianceScaling(1 / 3, 'fan_in', 'uniform'),
                bias_initializer=keras.initializers.RandomUniform(-bound, bound))


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over the last (latent) axis, float32.

    mu, logvar: [..., r] -> [...]. float32 whatever the compute dtype, as on the timm side: in half
    precision exp(logvar) - 1 - logvar loses the small values. expm1(logvar) - logvar, not
    exp(logvar) - 1 - logvar: near logvar = 0 the latter cancels to about -1e-6 in float32.
    """
    mu = ops.cast(mu, 'float32')
    logvar = ops.cast(logvar, 'float32')
    return 0.5 * ops.sum(ops.expm1(logvar) - logvar + ops.square(mu), axis=-1)


POS_EMBED_INITS = ('trunc_normal', 'sincos')


def sincos_2d(grid_size: Tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """The 2-D sin-cos position embedding [rows * cols, dim] of a patch grid, row-major, laid out as timm's
    ``build_sincos2d_pos_embed``: [sin(y w), sin(x w), cos(y w), cos(x w)], w_k = temperature^(-k / (dim / 4))."""
    gh, gw = grid_size
    bands = temperature ** (-np.arange(dim // 4) / (dim // 4))
    y, x = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
    pos = np.stack([y.ravel(), x.ravel()], 1)[..., None] * bands  # [N, 2, dim / 4]
    return np.concatenate([np.sin(pos), np.cos(pos)], 1).reshape(gh * gw, dim).astype('float32')


def _as_pair(v: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) and i > 0 for i in pair):
        raise ValueError(f'{what} must be a positive int or a pair of them, got {v!r}')
    return pair


def check_images(shape, image_size: Tuple[int, int], in_chans: int, who: str, dtype=None) -> None:
    """Raise a ValueError naming the problem unless ``shape`` is [batch, height, width, channels] (and
    ``dtype``, when given, a float type: integer pixels would reach the model unnormalised, and the backends
    disagree on them, JAX casting silently, torch and TensorFlow failing inside Conv2D)."""
    dtype = None if dtype is None else keras.backend.standardize_dtype(dtype)
    if dtype is not None and 'float' not in dtype:
        raise ValueError(f'{who} expects floating-point images, got {dtype}: '
                         'scale them to [0, 1] and normalise them with the mean and std the model was trained with')
    shape = tuple(shape)
    expected = f'[batch, {image_size[0]}, {image_size[1]}, {in_chans}]'
    if len(shape) != 4:
        raise ValueError(f'{who} expects images {expected} (channels last), got an input of shape {list(shape)}')
    h, w, c = shape[1:]
    if c != in_chans:
        hint = ''
        if h == in_chans:
            hint = ': channels-first input? transpose to NHWC, e.g. ops.transpose(x, (0, 2, 3, 1))'
        raise ValueError(
            f'{who} expects images {expected} (channels last), got {list(shape)}{hint}')
    if (h is not None and h != image_size[0]) or (w is not None and w != image_size[1]):
        raise ValueError(
            f'{who} was built for {image_size[0]}x{image_size[1]} images, expects {expected}, got {list(shape)}; '
            f'resize the input or build the model with image_size=({h}, {w})')


@_register
class GaussianBottleneck(keras.layers.Layer):
    """Variational bottleneck on every head of one layer, vectorised over heads.

    Input [..., heads, head_dim] (one attention output per head) -> output of the same shape.
    Head h encodes into the mean (first r) and log-variance (last r, clamped to ``logvar_clamp``) of a
    diagonal Gaussian, samples z = mu + exp(logvar / 2) * eps in training (eps from the layer's own
    SeedGenerator) and takes z = mu in inference, then decodes z back to head_dim. Encoder and decoder
    are linear (``vib_hidden=0``) or MLPs with one exact-GELU hidden layer of ``vib_hidden`` units (the
    paper's published architecture, 64). Weights are stacked per head with timm_vib's names and
    layout ([H, in, out]): ``enc_weight`` / ``enc_bias`` (first encoder layer), ``enc_out_*`` and
    ``dec_in_*`` (MLP only), ``dec_weight`` / ``dec_bias`` (last decoder layer).

    Args:
        num_heads, head_dim: heads and their width.
        vib_dim: latent size r per head.
        kl_weight: if > 0 the layer adds ``kl_weight * mean(KL)`` (nats, mean over every axis) to
            its losses, so ``fit`` optimises it (standalone use; VisionTransformerVIB leaves it at 0
            and adds beta * mean KL itself, beta being a variable).
        logvar_init: initial log-variance bias (-6: the posteriors start nearly deterministic).
        logvar_clamp: (min, max) of the log-variance.
        seed: seed of the noise.
        vib_hidden: hidden width of the encoder / decoder MLPs; 0 = linear.
        small_init_dec: start the decoder's last layer at N(0, 1e-4^2) (timm_vib's ``vib_small_init_dec``,
            the reference code's ``small_init_dec``): the head starts writing almost nothing.

    ``call(x, return_latents=True)`` returns (decoded, mu, logvar) with mu, logvar [..., heads, r].
    """

    def __init__(
            self,
            num_heads: int,
            head_dim: int,
            vib_dim: int = 32,
            kl_weight: float = 0.0,
            logvar_init: float = -6.0,
            logvar_clamp: Sequence[float] = (-10.0, 10.0),
            seed: Optional[int] = None,
            vib_hidden: int = 0,
            small_init_dec: bool = False,
            **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(vib_dim, bool) or not isinstance(vib_dim, numbers.Integral) or vib_dim < 1:
            raise ValueError(f'vib_dim (the latent size r per head) must be an integer >= 1, got {vib_dim!r}')
        if isinstance(vib_hidden, bool) or not isinstance(vib_hidden, numbers.Integral) or vib_hidden < 0:
            raise ValueError(f'vib_hidden (hidden width of the encoder / decoder MLPs, 0 = linear) must be an '
                             f'integer >= 0, got {vib_hidden!r}')
        clamp = tuple(float(v) for v in logvar_clamp)
        # outside the clamp the log-variance is pinned at its bound with no gradient; NaN poisons every output
        if isinstance(logvar_init, bool) or not isinstance(logvar_init, numbers.Real) or not (
                clamp[0] <= logvar_init <= clamp[1]):
            raise ValueError(f'logvar_init (the posterior log-variance bias at init) must be a number within the '
                             f'clamp [{clamp[0]:g}, {clamp[1]:g}], got {logvar_init!r}')
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.vib_dim = int(vib_dim)  # numpy integers too; get_config holds plain ints
        self.vib_hidden = int(vib_hidden)
        self.kl_weight = float(kl_weight)
        self.logvar_init = float(logvar_init)
        self.logvar_clamp = clamp
        self.seed = seed
        self.small_init_dec = bool(small_init_dec)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape) -> None:
        H, D, r, h = self.num_heads, self.head_dim, self.vib_dim, self.vib_hidden
        if tuple(input_shape[-2:]) != (H, D):
            raise ValueError(f'{self.name} expects [..., {H} heads, {D}], got {list(input_shape)}')
        lv = self.logvar_init

        def stats_bias_init(shape, dtype=None):
            # first r: means (0); last r: log-variances (logvar_init)
            return ops.concatenate([ops.zeros((H, r), dtype=dtype), ops.full((H, r), lv, dtype=dtype)], axis=-1)

        def weight(name, fan_in, fan_out):
            # nn.Linear's uniform init U(+-1/sqrt(fan_in)), per head (as timm_vib.HeadBottleneck)
            init = keras.initializers.RandomUniform(-fan_in ** -0.5, fan_in ** -0.5)
            if name == 'dec_weight' and self.small_init_dec:
                init = keras.initializers.RandomNormal(stddev=1e-4)
            return self.add_weight(name=name, shape=(H, fan_in, fan_out), initializer=init)

        if h:
            self.enc_weight = weight('enc_weight', D, h)
            self.enc_bias = self.add_weight(name='enc_bias', shape=(H, h), initializer='zeros')
            self.enc_out_weight = weight('enc_out_weight', h, 2 * r)
            self.enc_out_bias = self.add_weight(name='enc_out_bias', shape=(H, 2 * r), initializer=stats_bias_init)
            self.dec_in_weight = weight('dec_in_weight', r, h)
            self.dec_in_bias = self.add_weight(name='dec_in_bias', shape=(H, h), initializer='zeros')
            self.dec_weight = weight('dec_weight', h, D)
        else:
            self.enc_weight = weight('enc_weight', D, 2 * r)
            self.enc_bias = self.add_weight(name='enc_bias', shape=(H, 2 * r), initializer=stats_bias_init)
            self.dec_weight = weight('dec_weight', r, D)
        self.dec_bias = self.add_weight(name='dec_bias', shape=(H, D), initializer='zeros')

    @property
    def weight_names(self) -> Tuple[str, ...]:
        """The names of the weights, those of timm_vib.HeadBottleneck."""
        if self.vib_hidden:
            return ('enc_weight', 'enc_bias', 'enc_out_weight', 'enc_out_bias',
                    'dec_in_weight', 'dec_in_bias', 'dec_weight', 'dec_bias')
        return ('enc_weight', 'enc_bias', 'dec_weight', 'dec_bias')

    def encode_hidden(self, a):
        """The encoder after its first layer's matmul: [..., H, vib_hidden or 2r] (that matmul's output,
        without bias) -> mu, logvar [..., H, r] (logvar clamped)."""
        stats = a + ops.cast(self.enc_bias, a.dtype)
        if self.vib_hidden:
            stats = ops.einsum('...hd,hde->...he', ops.gelu(stats, approximate=False),
                               ops.cast(self.enc_out_weight, a.dtype))
            stats = stats + ops.cast(self.enc_out_bias, a.dtype)
        mu, logvar = ops.split(stats, 2, axis=-1)
        return mu, ops.clip(logvar, *self.logvar_clamp)

    def encode(self, x):
        """[..., H, head_dim] -> mu, logvar [..., H, r] (logvar clamped)."""
        return self.encode_hidden(ops.einsum('...hd,hde->...he', x, ops.cast(self.enc_weight, x.dtype)))

    def sample(self, mu, logvar, training=None):
        """z = mu + exp(logvar / 2) * eps in training, mu in inference."""
        if not training:
            return mu
        eps = keras.random.normal(ops.shape(mu), dtype=mu.dtype, seed=self.seed_generator)
        return mu + ops.exp(0.5 * logvar) * eps

    def decode_hidden(self, z):
        """The decoder before its last layer's matmul: [..., H, r] -> [..., H, vib_hidden or r]."""
        if not self.vib_hidden:
            return z
        h = ops.einsum('...hr,hrd->...hd', z, ops.cast(self.dec_in_weight, z.dtype))
        return ops.gelu(h + ops.cast(self.dec_in_bias, z.dtype), approximate=False)

    def decode(self, z):
        """[..., H, r] -> [..., H, head_dim]."""
        h = self.decode_hidden(z)
        return ops.einsum('...hr,hrd->...hd', h, ops.cast(self.dec_weight, h.dtype)) + ops.cast(self.dec_bias, h.dtype)

    def fold_value(self, kernel, bias=None):
        """The value projection composed with the encoder's first layer (without its bias, which is
        added after attention: attention rows sum to one, so softmax(.) (v W + b) = softmax(.) v W + b).

        kernel [C, H * head_dim] (Keras Dense layout), bias [H * head_dim] or None ->
        kernel [C, H * width], bias [H * width] or None; width = vib_hidden, or 2r when linear.
        """
        H, D = self.num_heads, self.head_dim
        w = ops.cast(self.enc_weight, kernel.dtype)
        c = ops.shape(kernel)[0]
        folded = ops.reshape(ops.einsum('chd,hde->che', ops.reshape(kernel, (c, H, D)), w), (c, -1))
        if bias is None:
            return folded, None
        return folded, ops.reshape(ops.einsum('hd,hde->he', ops.reshape(bias, (H, D)), w), (-1,))

    def fold_output(self, kernel, bias=None):
        """The decoder's last layer composed with the output projection.

        kernel [H * head_dim, C] (Keras Dense layout), bias [C] or None -> kernel [H * width, C],
        bias [C]; width = vib_hidden, or r when linear.
        """
        H, D = self.num_heads, self.head_dim
        w = ops.cast(self.dec_weight, kernel.dtype)
        c = ops.shape(kernel)[-1]
        k3 = ops.reshape(kernel, (H, D, c))
        folded = ops.reshape(ops.einsum('hdc,hed->hec', k3, w), (-1, c))
        b = ops.matmul(ops.reshape(ops.cast(self.dec_bias, kernel.dtype), (1, -1)), kernel)[0]
        return folded, b if bias is None else b + bias

    def call(self, inputs, training=None, return_latents: bool = False):
        mu, logvar = self.encode(inputs)
        z = self.sample(mu, logvar, training)
        if self.kl_weight:
            self.add_loss(self.kl_weight * ops.mean(gaussian_kl(mu, logvar)))
        out = self.decode(z)
        return (out, mu, logvar) if return_latents else out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, head_dim=self.head_dim, vib_dim=self.vib_dim, kl_weight=self.kl_weight,
            logvar_init=self.logvar_init, logvar_clamp=list(self.logvar_clamp), seed=self.seed,
            vib_hidden=self.vib_hidden, small_init_dec=self.small_init_dec)
        return config


@_register
class VIBMultiHeadAttention(keras.layers.Layer):
    """Multi-head self-attention with a :class:`GaussianBottleneck` between each head's attention
    output softmax(q k^T / sqrt(head_dim)) v and the output projection.

    [batch, tokens, dim] -> [batch, tokens, dim]. The fused ``qkv`` Dense has timm's layout
    (q, k, v blocks, each head-major). ``vib_dim=None`` gives plain attention (timm's, no bottleneck).
    With a bottleneck, the encoder's first layer is folded into the value projection and the
    decoder's last layer into the output projection (as timm_vib does), so attention runs on the
    encoder width and no head_dim-wide intermediate is formed; the weights stay in timm's layout.
    ``call(x, return_latents=True)`` returns (out, mu, logvar), mu/logvar [batch, tokens, heads, r]
    (None without a bottleneck).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            vib_dim: Optional[int] = 32,
            qkv_bias: bool = True,
            kl_weight: float = 0.0,
            logvar_init: float = -6.0,
            seed: Optional[int] = None,
            vib_hidden: int = 0,
            small_init_dec: bool = False,
            **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.head_dim = dim // num_heads
        self.vib_dim = vib_dim
        self.qkv_bias = bool(qkv_bias)
        self.kl_weight = float(kl_weight)
        self.logvar_init = float(logvar_init)
        self.seed = seed
        self.vib_hidden = vib_hidden
        self.small_init_dec = bool(small_init_dec)
        dd = dict(dtype=self.dtype_policy, kernel_initializer=_dense_init())
        self.qkv = keras.layers.Dense(3 * dim, use_bias=qkv_bias, name='qkv', **dd)
        self.proj = keras.layers.Dense(dim, name='proj', **dd)
        self.vib = None
        if vib_dim is not None:
            self.vib = GaussianBottleneck(
                self.num_heads, self.head_dim, vib_dim, kl_weight=kl_weight, logvar_init=logvar_init, seed=seed,
                vib_hidden=vib_hidden, small_init_dec=small_init_dec, dtype=self.dtype_policy, name='vib')

    def build(self, input_shape) -> None:
        self.qkv.build(input_shape)
        if self.vib is not None:
            self.vib.build((None, None, self.num_heads, self.head_dim))
        self.proj.build(tuple(input_shape[:-1]) + (self.dim,))

    def call(self, x, training=None, return_latents: bool = False):
        H, D, C = self.num_heads, self.head_dim, self.dim
        n = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        vib = self.vib
        if vib is None:
            qkv = ops.reshape(self.qkv(x), (-1, n, 3, H, D))
            heads = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], D)  # [B, N, H, D]
            out = self.proj(ops.reshape(heads, (-1, n, C)))
            return (out, None, None) if return_latents else out
        # as timm_vib: the encoder's first layer folds into the value projection and the decoder's
        # last layer into the output projection, so attention runs on the narrower encoder width
        kernel = ops.cast(self.qkv.kernel, x.dtype)
        bias = ops.cast(self.qkv.bias, x.dtype) if self.qkv_bias else None
        w_v, b_v = vib.fold_value(kernel[:, 2 * C:], None if bias is None else bias[2 * C:])
        y = ops.matmul(x, ops.concatenate([kernel[:, :2 * C], w_v], axis=1))
        if bias is not None:
            y = y + ops.concatenate([bias[:2 * C], b_v])
        q = ops.reshape(y[..., :C], (-1, n, H, D))
        k = ops.reshape(y[..., C:2 * C], (-1, n, H, D))
        v = ops.reshape(y[..., 2 * C:], (-1, n, H, w_v.shape[-1] // H))
        mu, logvar = vib.encode_hidden(_attention(q, k, v, D))
        z = vib.sample(mu, logvar, training)
        if self.kl_weight:
            self.add_loss(self.kl_weight * ops.mean(gaussian_kl(mu, logvar)))
        h = vib.decode_hidden(z)
        w_o, b_o = vib.fold_output(ops.cast(self.proj.kernel, x.dtype), ops.cast(self.proj.bias, x.dtype))
        out = ops.matmul(ops.reshape(h, (-1, n, h.shape[-2] * h.shape[-1])), w_o) + b_o
        return (out, mu, logvar) if return_latents else out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            dim=self.dim, num_heads=self.num_heads, vib_dim=self.vib_dim, qkv_bias=self.qkv_bias,
            kl_weight=self.kl_weight, logvar_init=self.logvar_init, seed=self.seed, vib_hidden=self.vib_hidden,
            small_init_dec=self.small_init_dec)
        return config


def _attention(q, k, v, head_dim: int):
    """softmax(q k^T / sqrt(head_dim)) v per head: q, k [B, N, H, D], v [B, N, H, Dv] -> [B, N, H, Dv]."""
    if keras.backend.backend() == 'torch':  # F.scaled_dot_product_attention, timm's fused kernel
        return ops.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
    logits = ops.einsum('bqhd,bkhd->bhqk', q, k) * ops.cast(1.0 / math.sqrt(head_dim), q.dtype)
    return ops.einsum('bhqk,bkhd->bqhd', ops.softmax(logits, axis=-1), v)


class _Mlp(keras.layers.Layer):
    """fc1 -> exact (erf) GELU -> fc2, as timm's Mlp; shared by both blocks, not public."""

    def __init__(self, dim: int, hidden: int, **kwargs) -> None:
        super().__init__(**kwargs)
        dd = dict(dtype=self.dtype_policy, kernel_initializer=_dense_init())
        self.fc1 = keras.layers.Dense(hidden, name='fc1', **dd)
        self.fc2 = keras.layers.Dense(dim, name='fc2', **dd)

    def build(self, input_shape) -> None:
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.fc1.units,))

    def call(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate=False))


@_register
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); [batch, tokens, dim] -> same.

    The attention is a :class:`VIBMultiHeadAttention` (``vib_dim=None``: plain attention).
    ``call(x, return_latents=True)`` returns (x, mu, logvar) of the attention's bottleneck.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            vib_dim: Optional[int] = 32,
            qkv_bias: bool = True,
            kl_weight: float = 0.0,
            logvar_init: float = -6.0,
            layer_norm_epsilon: float = 1e-6,
            seed: Optional[int] = None,
            vib_hidden: int = 0,
            small_init_dec: bool = False,
            **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.vib_hidden = vib_hidden
        self.small_init_dec = bool(small_init_dec)
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.vib_dim, self.qkv_bias, self.kl_weight = vib_dim, bool(qkv_bias), float(kl_weight)
        self.logvar_init, self.layer_norm_epsilon, self.seed = float(logvar_init), float(layer_norm_epsilon), seed
        dt = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=dt, name='norm1')
        self.attn = VIBMultiHeadAttention(
            dim, num_heads, vib_dim=vib_dim, qkv_bias=qkv_bias, kl_weight=kl_weight, logvar_init=logvar_init,
            seed=seed, vib_hidden=vib_hidden, small_init_dec=small_init_dec, dtype=dt, name='attn')
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=dt, name='norm2')
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dtype=dt, name='mlp')

    def build(self, input_shape) -> None:
        for layer in (self.norm1, self.attn, self.norm2, self.mlp):
            layer.build(input_shape)

    def call(self, x, training=None, return_latents: bool = False):
        a, mu, logvar = self.attn(self.norm1(x), training=training, return_latents=True)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return (x, mu, logvar) if return_latents else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            dim=self.dim, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, vib_dim=self.vib_dim,
            qkv_bias=self.qkv_bias, kl_weight=self.kl_weight, logvar_init=self.logvar_init,
            layer_norm_epsilon=self.layer_norm_epsilon, seed=self.seed, vib_hidden=self.vib_hidden,
            small_init_dec=self.small_init_dec)
        return config


@_register
class MlpBlock(keras.layers.Layer):
    """Attention-free block x + mlp(norm2(x)): tokens never communicate. [batch, tokens, dim] -> same.

    Names follow timm_vib.MlpBlock (norm2, mlp.fc1, mlp.fc2), so its weights line up with a full block's.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, layer_norm_epsilon: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim, self.mlp_ratio, self.layer_norm_epsilon = int(dim), float(mlp_ratio), float(layer_norm_epsilon)
        dt = self.dtype_policy
        self.norm2 = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=dt, name='norm2')
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), dtype=dt, name='mlp')

    def build(self, input_shape) -> None:
        self.norm2.build(input_shape)
        self.mlp.build(input_shape)

    def call(self, x, training=None, return_latents: bool = False):
        x = x + self.mlp(self.norm2(x))
        return (x, None, None) if return_latents else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(dim=self.dim, mlp_ratio=self.mlp_ratio, layer_norm_epsilon=self.layer_norm_epsilon)
        return config


@_register
class PatchEmbedding(keras.layers.Layer):
    """Images [batch, height, width, channels] -> tokens [batch, (height/p) * (width/p), embed_dim].

    A stride-p convolution (timm's ``patch_embed.proj``), tokens in row-major patch order, plus a
    learned position embedding ``pos_embed`` [1, tokens, embed_dim] (no class token), started at timm's
    truncated normal (std 0.02) or, with ``pos_embed_init='sincos'``, at the 2-D sin-cos embedding
    (:func:`sincos_2d`, timm's ``build_sincos2d_pos_embed``).
    """

    def __init__(
            self,
            image_size: Union[int, Sequence[int]] = 224,
            patch_size: Union[int, Sequence[int]] = 16,
            embed_dim: int = 192,
            in_chans: int = 3,
            pos_embed_init: str = 'trunc_normal',
            **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f'pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}')
        if pos_embed_init == 'sincos' and embed_dim % 4:
            raise ValueError(f"pos_embed_init='sincos' needs embed_dim divisible by 4 (a sine and a cosine per "
                             f"axis), got {embed_dim}")
        self.pos_embed_init = pos_embed_init
        self.image_size = _as_pair(image_size, 'image_size')
        self.patch_size = _as_pair(patch_size, 'patch_size')
        if any(s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f'image_size {self.image_size} is not a multiple of patch_size {self.patch_size}')
        self.embed_dim = int(embed_dim)
        self.in_chans = int(in_chans)
        self.grid_size = tuple(s // p for s, p in zip(self.image_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = keras.layers.Conv2D(
            embed_dim, self.patch_size, strides=self.patch_size, padding='valid', data_format='channels_last',
            dtype=self.dtype_policy, name='proj', **_conv_inits(self.in_chans * self.patch_size[0] * self.patch_size[1]))

    def build(self, input_shape) -> None:
        check_images(input_shape, self.image_size, self.in_chans, self.name)
        self.proj.build((None,) + self.image_size + (self.in_chans,))
        init = _dense_init()  # timm's trunc_normal_(std=.02)
        if self.pos_embed_init == 'sincos':
            table = sincos_2d(self.grid_size, self.embed_dim)[None]
            init = lambda shape, dtype=None: ops.convert_to_tensor(table, dtype=dtype)  # noqa: E731
        self.pos_embed = self.add_weight(name='pos_embed', shape=(1, self.num_patches, self.embed_dim), initializer=init)

    def call(self, images):
        check_images(images.shape, self.image_size, self.in_chans, self.name, images.dtype)
        x = self.proj(images)  # [B, gh, gw, C]
        x = ops.reshape(x, (-1, self.num_patches, self.embed_dim))
        return x + self.pos_embed

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_patches, self.embed_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            image_size=list(self.image_size), patch_size=list(self.patch_size), embed_dim=self.embed_dim,
            in_chans=self.in_chans, pos_embed_init=self.pos_embed_init)
        return config


@_register
class PoolingHead(keras.layers.Layer):
    """Tokens [batch, tokens, dim] -> logits [batch, num_classes]: LayerNorm per token, mean over
    tokens, Dense. Image logits are therefore the mean of the per-patch logits
    (``call(x, return_patch_logits=True)`` gives those, [batch, tokens, num_classes]).
    ``num_classes=0``: no Dense, returns the pooled features [batch, dim].
    """

    def __init__(self, num_classes: int = 100, layer_norm_epsilon: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.norm = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name='norm')
        self.head = None
        if num_classes:
            self.head = keras.layers.Dense(
                num_classes, dtype=self.dtype_policy, kernel_initializer=_dense_init(), name='head')

    def build(self, input_shape) -> None:
        self.norm.build(input_shape)
        if self.head is not None:
            self.head.build((input_shape[0], input_shape[-1]))

    def call(self, x, return_patch_logits: bool = False):
        x = self.norm(x)
        if return_patch_logits:
            return self.head(x) if self.head is not None else x
        x = ops.mean(x, axis=1)
        return self.head(x) if self.head is not None else x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes or input_shape[-1])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(num_classes=self.num_classes, layer_norm_epsilon=self.layer_norm_epsilon)
        return config
