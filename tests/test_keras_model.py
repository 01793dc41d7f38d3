"""The keras_vib model: builders, KL as a loss (mean convention, beta), the KL read-out, dtype
policy, .keras round trip, bad input, and the backend default."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import keras
from keras import ops

from keras_vib import VisionTransformerVIB, create_model, kl_and_latents, vit_tiny_vib

SMALL = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5, vib_dim=8)
ROOT = Path(__file__).resolve().parents[1]


def images(b=2, size=16, c=3, seed=0):
    return np.random.default_rng(seed).normal(size=(b, size, size, c)).astype('float32')


def test_builders_mirror_the_timm_names():
    assert set(keras_vib.MODEL_NAMES) == {
        'vit_tiny_vib', 'vit_tiny_vib_b0', 'vit_tiny_vib_b0p01', 'vit_tiny_vib_b0p1', 'vit_tiny_vib_b1',
        'vit_tiny_vib_b4', 'vit_tiny_vib_b10', 'vit_tiny_noattn', 'vit_tiny_gap'}
    m = keras_vib.vit_tiny_vib_b4(num_classes=5, image_size=32, patch_size=8, depth=2)
    assert m.beta == 4.0 and m.attn_mode == 'vib' and m.name == 'vit_tiny_vib_b4' and m.num_patches == 16
    assert keras_vib.vit_tiny_vib_b0p01(**{**SMALL}).beta == 0.01
    assert keras_vib.vit_tiny_noattn(**SMALL).attn_mode == 'none'
    assert keras_vib.vit_tiny_gap(**SMALL).attn_mode == 'plain'
    assert vit_tiny_vib(beta=2.5, **SMALL).beta == 2.5
    full = vit_tiny_vib()  # ViT-Tiny/16 at 224 px: 5.5M-ish parameters as timm's
    assert (full.depth, full.embed_dim, full.num_heads, full.num_classes, full.num_patches) == (12, 192, 3, 100, 196)
    with pytest.raises(ValueError, match='beta=4'):
        keras_vib.vit_tiny_vib_b4(beta=1.0, **SMALL)
    with pytest.raises(ValueError, match='unknown model'):
        create_model('vit_huge_vib')
    with pytest.raises(ValueError, match='beta'):
        vit_tiny_vib(beta=-1, **SMALL)


def test_fit_loss_is_ce_plus_beta_times_mean_kl():
    m = vit_tiny_vib(beta=3.0, seed=0, **SMALL)
    x, y = images(4), np.array([0, 1, 2, 3])
    out = kl_and_latents(m, x)
    assert out['kl'].shape == (4, 2, 2, 16) and out['kl'].dtype == np.float32
    assert out['mu'].shape == out['logvar'].shape == (4, 2, 2, 16, 8)
    np.testing.assert_allclose(out['logits'], ops.convert_to_numpy(m(x)), rtol=1e-5, atol=1e-6)
    # the loss the model adds: beta * mean over batch, layers, heads, tokens
    m(x)
    np.testing.assert_allclose(float(sum(ops.convert_to_numpy(l) for l in m.losses)),
                               3.0 * out['kl'].mean(), rtol=1e-5)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    m.compile(optimizer='adam', loss=ce)
    total = m.evaluate(x, y, verbose=0)
    expected = float(ce(y, out['logits'])) + 3.0 * out['kl'].mean()
    assert total == pytest.approx(expected, rel=1e-4)
    # beta is live, also in the compiled step that evaluate already built (JAX, TensorFlow): a new
    # value changes the added loss, 0 zeroes it
    m.beta = 1.5
    assert m.evaluate(x, y, verbose=0) == pytest.approx(float(ce(y, out['logits'])) + 1.5 * out['kl'].mean(), rel=1e-4)
    m.beta = 0.0
    m(x)
    assert float(sum(ops.convert_to_numpy(l) for l in m.losses)) == 0.0
    assert m.evaluate(x, y, verbose=0) == pytest.approx(float(ce(y, out['logits'])), rel=1e-4)
    # information_loss conventions, as timm_vib's
    assert float(keras_vib.information_loss(out['kl'])) == pytest.approx(out['kl'].mean(), rel=1e-5)
    assert float(keras_vib.information_loss(out['kl'], 'sum')) == pytest.approx(
        out['kl'].sum((1, 2, 3)).mean(), rel=1e-5)
    # the reference code's --sqrt-kl: sqrt of each head's mean over tokens (+1e-8), mean over the rest
    assert float(keras_vib.information_loss(out['kl'], 'sqrt')) == pytest.approx(
        np.sqrt(np.maximum(out['kl'].mean(3), 0) + 1e-8).mean(), rel=1e-5)
    with pytest.raises(ValueError, match='batch of 0 images'):
        keras_vib.information_loss(np.zeros((0, 2, 2, 4), 'float32'))
    with pytest.raises(ValueError, match="'mean', 'sum' or 'sqrt'"):
        keras_vib.information_loss(out['kl'], 'max')
    with pytest.raises(ValueError, match='0 images'):
        keras_vib.kl_and_latents(m, np.zeros((0, 16, 16, 3), 'float32'))
    with pytest.raises(ValueError, match='batch_size must be an integer >= 1'):
        keras_vib.kl_and_latents(m, np.zeros((2, 16, 16, 3), 'float32'), batch_size=-1)
    as_list = keras_vib.kl_and_latents(m, np.asarray(x).tolist())  # a nested list is an array too
    np.testing.assert_allclose(as_list['kl'], keras_vib.kl_and_latents(m, np.asarray(x))['kl'], rtol=1e-6)
    for bad, match in ((dict(depth=0), 'depth must be an integer >= 1'),
                       (dict(num_heads=0), 'num_heads must be an integer >= 1')):
        with pytest.raises(ValueError, match=match):
            vit_tiny_vib(**{**SMALL, **bad})


def test_training_samples_inference_uses_mu():
    m = vit_tiny_vib(seed=0, **SMALL)
    x = images()
    a, b = (ops.convert_to_numpy(m(x)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    t = ops.convert_to_numpy(m(x, training=True))
    assert not np.allclose(t, a)
    # the first layer's posterior does not depend on sampling
    kt = kl_and_latents(m, x, training=True)['kl']
    np.testing.assert_allclose(kt[:, 0], kl_and_latents(m, x)['kl'][:, 0], rtol=1e-5)


def test_kl_of_the_two_ends():
    x = images()
    out = kl_and_latents(keras_vib.vit_tiny_noattn(**SMALL), x)
    assert out['kl'].shape == (2, 2, 2, 16) and not out['kl'].any() and out['mu'] is None
    with pytest.raises(ValueError, match='no information bottleneck'):
        kl_and_latents(keras_vib.vit_tiny_gap(**SMALL), x)
    # tensors instead of numpy, and chunked
    m = vit_tiny_vib(**SMALL)
    t = kl_and_latents(m, x, as_numpy=False)
    assert ops.is_tensor(t['kl'])
    np.testing.assert_allclose(kl_and_latents(m, x, batch_size=1)['kl'], ops.convert_to_numpy(t['kl']), rtol=1e-5)


def test_get_config_round_trip_and_dtype_policy():
    m = vit_tiny_vib(beta=0.5, seed=3, dtype='mixed_bfloat16', **SMALL)
    cfg = m.get_config()
    assert set(cfg) == {'name', 'trainable', 'dtype', 'image_size', 'patch_size', 'in_chans', 'num_classes',
                        'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'qkv_bias', 'attn_mode', 'vib_dim',
                        'beta', 'vib_logvar_init', 'layer_norm_epsilon', 'seed', 'vib_hidden', 'vib_small_init_dec',
                        'pos_embed_init'}
    again = VisionTransformerVIB.from_config(cfg)
    assert again.get_config() == cfg
    for layer in (m.patch_embed, m.blocks[0], m.blocks[0].attn.vib, m.blocks[1].mlp.fc1, m.head.head):
        assert layer.dtype_policy.name == 'mixed_bfloat16'
    assert m.blocks[0].attn.qkv.kernel.dtype == 'float32'
    out = kl_and_latents(m, images())
    assert out['kl'].dtype == np.float32 and np.isfinite(out['kl']).all()
    assert keras.backend.standardize_dtype(m(images()).dtype) == 'bfloat16'  # the policy's compute dtype, every backend


def test_init_options_as_timm_vib():
    """pos_embed_init='sincos': the position embedding starts at the 2-D sin-cos embedding, whose Gram matrix is
    the closed form of the patch offsets, sum_k cos(w_k dy) + cos(w_k dx) with w_k = 10000^(-k / (C / 4));
    vib_small_init_dec: the decoders' last layers start near zero. Both survive get_config and .keras files."""
    kw = dict(SMALL, image_size=(12, 20), embed_dim=32)  # a 3 x 5 grid
    m = vit_tiny_vib(pos_embed_init='sincos', vib_small_init_dec=True, **kw)
    pe = ops.convert_to_numpy(m.patch_embed.pos_embed)[0].astype('float64')  # [15, 32]
    y, x = np.divmod(np.arange(15), 5)
    w = 10000.0 ** (-np.arange(8) / 8)
    gram = (np.cos(w * (y[:, None, None] - y[None, :, None])) + np.cos(w * (x[:, None, None] - x[None, :, None]))).sum(-1)
    np.testing.assert_allclose(pe @ pe.T, gram, atol=1e-5)
    default = vit_tiny_vib(**kw)
    assert np.std(ops.convert_to_numpy(default.patch_embed.pos_embed)) < 0.05  # timm's: std 0.02
    assert np.abs(ops.convert_to_numpy(m.blocks[0].attn.vib.dec_weight)).max() < 1e-3
    assert np.abs(ops.convert_to_numpy(default.blocks[0].attn.vib.dec_weight)).max() > 0.05
    again = VisionTransformerVIB.from_config(m.get_config())
    assert again.pos_embed_init == 'sincos' and again.blocks[1].attn.vib.small_init_dec
    with pytest.raises(ValueError, match=r"pos_embed_init must be one of \('trunc_normal', 'sincos'\), got 'sin'"):
        vit_tiny_vib(pos_embed_init='sin', **SMALL)
    with pytest.raises(ValueError, match='embed_dim divisible by 4.*got 30'):
        vit_tiny_vib(pos_embed_init='sincos', **dict(SMALL, embed_dim=30, num_heads=2))


def test_keras_save_load_round_trip(tmp_path):
    for name in ('vit_tiny_vib', 'vit_tiny_noattn', 'vit_tiny_gap'):
        m = create_model(name, beta=0.3 if name == 'vit_tiny_vib' else 0.0, seed=1, **SMALL)
        x = images(3)
        path = tmp_path / f'{name}.keras'
        m.save(path)
        loaded = keras.saving.load_model(path)
        assert type(loaded) is VisionTransformerVIB and loaded.get_config() == m.get_config()
        np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(m(x)))
        if name != 'vit_tiny_gap':
            np.testing.assert_array_equal(kl_and_latents(loaded, x)['kl'], kl_and_latents(m, x)['kl'])


def test_bad_input_errors():
    m = vit_tiny_vib(**SMALL)
    with pytest.raises(ValueError, match=r'channels-first input\? transpose to NHWC'):
        m(np.zeros((2, 3, 16, 16), 'float32'))
    with pytest.raises(ValueError, match='built for 16x16 images'):
        m(np.zeros((2, 32, 32, 3), 'float32'))
    with pytest.raises(ValueError, match=r'expects images \[batch, 16, 16, 3\]'):
        m(np.zeros((16, 16, 3), 'float32'))
    with pytest.raises(ValueError, match='channels last'):
        m(np.zeros((2, 16, 16, 1), 'float32'))
    # integer pixels: JAX would cast them silently, torch and TensorFlow fail inside Conv2D
    with pytest.raises(ValueError, match='floating-point images, got uint8'):
        m(np.zeros((2, 16, 16, 3), 'uint8'))
    with pytest.raises(ValueError, match=r'within the clamp \[-10, 10\]'):
        VisionTransformerVIB(**{**SMALL, 'vib_logvar_init': 12.0})
    with pytest.raises(ValueError, match=r'within the clamp'):
        VisionTransformerVIB(**{**SMALL, 'vib_logvar_init': float('nan')})
    with pytest.raises(ValueError, match='attn_mode'):
        VisionTransformerVIB(attn_mode='sparse', **SMALL)
    with pytest.raises(ValueError, match='vib_dim'):
        VisionTransformerVIB(**{**SMALL, 'vib_dim': 0})


BACKENDS = ('torch', 'jax', 'tensorflow')


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def _run_python(code, tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != 'KERAS_BACKEND'}
    env.update(KERAS_HOME=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', **env_extra)
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_keras_file_loads_on_another_backend(tmp_path):
    """A .keras file saved on this backend loads on the next installed one (torch -> jax ->
    tensorflow -> torch over the three CI runs) with the same logits, KL and beta."""
    here = keras.backend.backend()
    others = [b for b in BACKENDS[BACKENDS.index(here) + 1:] + BACKENDS[:BACKENDS.index(here)] if _installed(b)]
    if not others:
        pytest.skip(f'no Keras backend besides {here} installed')
    m = vit_tiny_vib(beta=0.7, seed=2, **{**SMALL, 'vib_hidden': 6})
    x = images(3, seed=4)
    m.save(tmp_path / 'model.keras')
    np.save(tmp_path / 'x.npy', x)
    code = f"""
import keras_vib, keras, numpy as np
assert keras.backend.backend() == {others[0]!r}
m = keras.saving.load_model({str(tmp_path / 'model.keras')!r})
out = keras_vib.kl_and_latents(m, np.load({str(tmp_path / 'x.npy')!r}))
np.savez({str(tmp_path / 'out.npz')!r}, logits=out['logits'], kl=out['kl'], beta=m.beta)
print('ok')"""
    assert _run_python(code, tmp_path, KERAS_BACKEND=others[0]) == 'ok'
    theirs, ours = np.load(tmp_path / 'out.npz'), kl_and_latents(m, x)
    assert float(theirs['beta']) == 0.7
    np.testing.assert_allclose(theirs['logits'], ours['logits'], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(theirs['kl'], ours['kl'], rtol=1e-4, atol=1e-6)


def test_backend_default_and_never_override(tmp_path, monkeypatch):
    # a fresh interpreter without KERAS_BACKEND (and a keras.json that Keras wrote itself) gets Keras's
    # own default where TensorFlow is installed, else torch, else JAX
    expected = next(b for b in ('tensorflow', 'torch', 'jax') if _installed(b))
    (tmp_path / 'keras.json').write_text('{"backend": "tensorflow"}')
    assert _run_python('import keras_vib, keras; print(keras.backend.backend())', tmp_path) == expected
    # a user's choice stays: the variable, or a non-TensorFlow backend in keras.json
    monkeypatch.setenv('KERAS_BACKEND', 'jax')
    monkeypatch.delitem(sys.modules, 'keras')  # restored afterwards; only the check reads it
    keras_vib._default_backend()
    assert os.environ['KERAS_BACKEND'] == 'jax'
    monkeypatch.delenv('KERAS_BACKEND')
    monkeypatch.setenv('KERAS_HOME', str(tmp_path))
    (tmp_path / 'keras.json').write_text('{"backend": "jax"}')
    assert keras_vib._keras_json_backend()
    keras_vib._default_backend()
    assert 'KERAS_BACKEND' not in os.environ
    (tmp_path / 'keras.json').write_text('{"backend": "tensorflow"}')
    assert not keras_vib._keras_json_backend()


def test_numpy_integers_are_integers_and_flags_are_not_betas():
    """vib_dim from a numpy array (np.int64) is an integer like timm's; beta=True or '2' is a mistake."""
    m = vit_tiny_vib(**dict(SMALL, vib_dim=np.int64(8), vib_hidden=np.int32(4)))
    cfg = m.get_config()
    assert cfg['vib_dim'] == 8 and type(cfg['vib_dim']) is int and type(cfg['vib_hidden']) is int
    assert ops.convert_to_numpy(m(images())).shape == (2, 5)
    for bad in (True, '2', np.bool_(True)):
        with pytest.raises(ValueError, match='beta must be a number'):
            vit_tiny_vib(**dict(SMALL, beta=bad))
    assert vit_tiny_vib(**dict(SMALL, beta=np.float32(0.5))).beta == 0.5
