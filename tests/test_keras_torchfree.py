"""keras_vib where torch is not installed (CI runs this module in an environment without torch, on
JAX): build, train, save and load a model, read a timm-format folder with numpy + safetensors and get
timm's logits and KL (timm's answer is committed in tests/data, checked against timm where torch is).
In an environment with torch the same tests run too, minus the check that torch is absent."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import importlib.util
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

FIXTURE = Path(__file__).resolve().parent / 'data' / 'timm_vit_tiny_vib'
TORCH_FREE = importlib.util.find_spec('torch') is None


@pytest.mark.skipif(not TORCH_FREE, reason='torch is installed here')
def test_nothing_loads_torch():
    m = keras_vib.from_timm(FIXTURE)
    keras_vib.kl_and_latents(m, np.zeros((1, 16, 16, 3), 'float32'))
    assert 'torch' not in sys.modules and keras.backend.backend() != 'torch'
    # the timm side says what it needs instead of failing deep inside an import
    with pytest.raises(ImportError, match=r'timm-vib\[torch\]'):
        import timm_vib  # noqa: F401


def test_timm_folder_gives_timms_logits_and_kl():
    ref = np.load(FIXTURE / 'expected.npz')
    m = keras_vib.from_timm(FIXTURE)  # config.json: architecture, image size, heads, beta
    assert (m.name, m.beta, m.num_heads, m.vib_hidden, m.image_size) == ('vit_tiny_vib', 0.5, 2, 8, (16, 16))
    out = keras_vib.kl_and_latents(m, np.transpose(ref['images'], (0, 2, 3, 1)))
    np.testing.assert_allclose(out['logits'], ref['logits'], rtol=1e-4, atol=1e-5 * np.abs(ref['logits']).max())
    np.testing.assert_allclose(out['kl'], ref['kl'], rtol=1e-4, atol=1e-5 * np.abs(ref['kl']).max())
    # and back: the timm names and layouts of the weights read
    from safetensors.numpy import load_file
    theirs = load_file(str(FIXTURE / 'model.safetensors'))
    ours = keras_vib.to_timm_state_dict(m)
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_fit_save_load(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    # two classes told apart by the mean brightness of the image: learnable in a few steps
    y = rng.integers(0, 2, 64).astype('int32')
    x = (rng.normal(size=(64, 16, 16, 3)) + (2 * y - 1)[:, None, None, None]).astype('float32')
    m = keras_vib.vit_tiny_vib(beta=0.01, num_classes=2, image_size=16, patch_size=4, embed_dim=32, depth=2,
                               num_heads=2, vib_dim=4, vib_hidden=8, seed=0)
    m.compile(keras.optimizers.AdamW(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=['accuracy'])
    hist = m.fit(x, y, batch_size=16, epochs=4, verbose=0)
    assert hist.history['loss'][-1] < 0.5 * hist.history['loss'][0], hist.history['loss']
    assert hist.history['accuracy'][-1] > 0.9
    m.save(tmp_path / 'm.keras')
    again = keras.saving.load_model(tmp_path / 'm.keras')
    np.testing.assert_array_equal(ops.convert_to_numpy(again(x[:4])), ops.convert_to_numpy(m(x[:4])))
    assert again.beta == 0.01
