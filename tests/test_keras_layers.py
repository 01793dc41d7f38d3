"""Each keras_vib layer through Keras's own layer test harness (serialization round trip, build,
symbolic and eager output shapes, a training step), plus the bottleneck's maths."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import numpy as np
import pytest
import keras
from keras import ops
from keras.src import testing

from keras_vib import (
    GaussianBottleneck, MlpBlock, PatchEmbedding, PoolingHead, TransformerBlock, VIBMultiHeadAttention, gaussian_kl)


class TestLayers(testing.TestCase):

    def test_gaussian_bottleneck(self):
        self.run_layer_test(
            GaussianBottleneck,
            init_kwargs=dict(num_heads=2, head_dim=8, vib_dim=4, kl_weight=0.5, logvar_init=-6.0,
                             logvar_clamp=[-10.0, 10.0], seed=1),
            input_shape=(2, 5, 2, 8),
            expected_output_shape=(2, 5, 2, 8),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=1,
            expected_num_losses=1,
        )

    def test_vib_attention(self):
        self.run_layer_test(
            VIBMultiHeadAttention,
            init_kwargs=dict(dim=16, num_heads=2, vib_dim=4, qkv_bias=True, kl_weight=0.1, logvar_init=-6.0, seed=3),
            input_shape=(2, 5, 16),
            expected_output_shape=(2, 5, 16),
            expected_num_trainable_weights=8,  # qkv 2, proj 2, bottleneck 4
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=1,
            expected_num_losses=1,
        )

    def test_plain_attention(self):
        self.run_layer_test(
            VIBMultiHeadAttention,
            init_kwargs=dict(dim=16, num_heads=2, vib_dim=None),
            input_shape=(2, 5, 16),
            expected_output_shape=(2, 5, 16),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
        )

    def test_transformer_block(self):
        self.run_layer_test(
            TransformerBlock,
            init_kwargs=dict(dim=16, num_heads=2, mlp_ratio=2.0, vib_dim=4, qkv_bias=True, kl_weight=0.5,
                             logvar_init=-6.0, layer_norm_epsilon=1e-6, seed=0),
            input_shape=(2, 5, 16),
            expected_output_shape=(2, 5, 16),
            expected_num_trainable_weights=16,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=1,
            expected_num_losses=1,
        )

    def test_mlp_block(self):
        self.run_layer_test(
            MlpBlock,
            init_kwargs=dict(dim=16, mlp_ratio=2.0, layer_norm_epsilon=1e-6),
            input_shape=(2, 5, 16),
            expected_output_shape=(2, 5, 16),
            expected_num_trainable_weights=6,
            expected_num_non_trainable_weights=0,
            expected_num_losses=0,
        )

    def test_patch_embedding(self):
        self.run_layer_test(
            PatchEmbedding,
            init_kwargs=dict(image_size=[8, 12], patch_size=[4, 4], embed_dim=16, in_chans=3),
            input_shape=(2, 8, 12, 3),
            expected_output_shape=(2, 6, 16),
            expected_num_trainable_weights=3,
            expected_num_non_trainable_weights=0,
        )

    def test_pooling_head(self):
        self.run_layer_test(
            PoolingHead,
            init_kwargs=dict(num_classes=5, layer_norm_epsilon=1e-6),
            input_shape=(2, 6, 16),
            expected_output_shape=(2, 5),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
        )


def test_bottleneck_maths():
    """mu in inference, mu + sigma * eps in training (fresh noise from the layer's seed generator),
    logvar clamped, KL closed form."""
    layer = GaussianBottleneck(3, 8, vib_dim=4, seed=0)
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype('float32')
    out, mu, logvar = (ops.convert_to_numpy(t) for t in layer(x, return_latents=True))
    w, b = ops.convert_to_numpy(layer.enc_weight), ops.convert_to_numpy(layer.enc_bias)
    stats = np.einsum('bnhd,hde->bnhe', x, w) + b
    np.testing.assert_allclose(mu, stats[..., :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, np.clip(stats[..., 4:], -10, 10), rtol=1e-5, atol=1e-6)
    dec = np.einsum('bnhr,hrd->bnhd', mu, ops.convert_to_numpy(layer.dec_weight)) + ops.convert_to_numpy(layer.dec_bias)
    np.testing.assert_allclose(out, dec, rtol=1e-5, atol=1e-6)
    # training samples: differs from the mean path, and between two calls
    t1, t2 = (ops.convert_to_numpy(layer(x, training=True)) for _ in range(2))
    assert not np.allclose(t1, out) and not np.allclose(t1, t2)
    # clamp: a huge log-variance bias is clipped at 10
    layer.enc_bias.assign(np.concatenate([np.zeros((3, 4)), np.full((3, 4), 50.0)], -1).astype('float32'))
    _, _, lv = layer(x, return_latents=True)
    assert float(ops.max(lv)) <= 10.0
    # KL: zero at the prior, hand value otherwise, float32
    assert float(gaussian_kl(np.zeros(4, 'float32'), np.zeros(4, 'float32'))) == 0.0
    m, lv = np.array([1.0, -2.0], 'float32'), np.array([0.0, np.log(4.0)], 'float32')
    assert float(gaussian_kl(m, lv)) == pytest.approx(0.5 * (1 + 4 + 4 - 1 - np.log(4.0)), rel=1e-6)


def test_bottleneck_adds_weighted_mean_kl_as_loss():
    layer = GaussianBottleneck(2, 8, vib_dim=4, kl_weight=0.25)
    x = np.random.default_rng(1).normal(size=(3, 5, 2, 8)).astype('float32')
    _, mu, logvar = layer(x, return_latents=True)
    assert len(layer.losses) == 1
    expected = 0.25 * float(ops.mean(gaussian_kl(mu, logvar)))
    assert float(layer.losses[0]) == pytest.approx(expected, rel=1e-6)
    assert GaussianBottleneck(2, 8, vib_dim=4)(x) is not None and not GaussianBottleneck(2, 8).losses


def test_layer_errors():
    with pytest.raises(ValueError, match='vib_dim'):
        GaussianBottleneck(2, 8, vib_dim=0)
    with pytest.raises(ValueError, match='not divisible'):
        VIBMultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match='multiple of patch_size'):
        PatchEmbedding(10, 4)
    pe = PatchEmbedding(8, 4, 16)
    with pytest.raises(ValueError, match='channels-first'):
        pe(np.zeros((1, 3, 8, 8), 'float32'))


def test_kl_of_nearly_collapsed_heads_is_nonnegative_and_accurate_in_float32():
    """Log-variances within 1e-3 of 0 and zero means: the float64 closed form is >= 0 and ~ lv^2 / 4 per
    dimension; exp(lv) - 1 - lv in float32 would cancel to negative values for many of them."""
    rng = np.random.default_rng(0)
    lv = (rng.standard_normal((4096, 8)) * 1e-3).astype('float32')
    mu = np.zeros_like(lv)
    expected = 0.5 * (np.expm1(lv.astype('float64')) - lv.astype('float64')).sum(-1)
    kl = ops.convert_to_numpy(gaussian_kl(mu, lv))
    assert (kl >= 0).all()
    np.testing.assert_allclose(kl, expected, rtol=1e-3, atol=1e-12)
