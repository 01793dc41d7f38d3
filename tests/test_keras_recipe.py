"""The paper's recipe for fit: which weights AdamW decays (against timm's own param groups for the
timm_vib model), the cosine schedule with warm-up (closed form), and the beta warm-up in force in the
compiled train step (the loss of each step against beta_at x KL), on every backend."""
import keras_vib  # noqa: F401  (sets the Keras backend default before keras is imported)

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_vib import BetaWarmup, beta_at, cosine_schedule, no_weight_decay_variables, paper_optimizer, vit_tiny_vib

SMALL = dict(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5, vib_dim=4, vib_hidden=8)


def test_no_weight_decay_is_timm_vibs():
    """The same weights escape decay as in the timm_vib trainer (timm's param_groups_weight_decay with
    the model's no_weight_decay): biases, 1-D weights, every bottleneck weight; pos_embed is decayed."""
    pytest.importorskip('timm')
    import timm
    from timm.optim._param_groups import param_groups_weight_decay
    import timm_vib  # noqa: F401
    from keras_vib.convert import _weight_table

    km = vit_tiny_vib(**SMALL)
    tm = timm.create_model('vit_tiny_vib', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                           num_classes=5, vib_dim=4, vib_hidden=8)
    groups = param_groups_weight_decay(tm, 0.05, no_weight_decay_list=tm.no_weight_decay())
    names = {id(p): n for n, p in tm.named_parameters()}
    timm_no_decay = {names[id(p)] for g in groups if g['weight_decay'] == 0.0 for p in g['params']}
    keras_names = {id(var): name for name, var, _ in _weight_table(km)}
    ours = {keras_names[id(v)] for v in no_weight_decay_variables(km)}
    assert ours == timm_no_decay
    assert 'pos_embed' not in ours and 'blocks.0.attn.vib.enc_weight' in ours


def test_paper_optimizer_decays_only_the_others():
    m = vit_tiny_vib(**SMALL)
    opt = paper_optimizer(m, learning_rate=0.1, weight_decay=0.5)
    before = [ops.convert_to_numpy(v) for v in m.trainable_variables]
    # zero gradients: Adam's step is zero, so only the decoupled decay (w -= lr * wd * w) moves weights
    opt.apply([ops.zeros(v.shape) for v in m.trainable_variables], m.trainable_variables)
    excluded = {id(v) for v in no_weight_decay_variables(m)}
    assert 0 < len(excluded) < len(m.trainable_variables)
    for v, b in zip(m.trainable_variables, before):
        expected = b if id(v) in excluded else b * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(ops.convert_to_numpy(v), expected, rtol=1e-6, atol=1e-8, err_msg=v.path)


def test_paper_optimizer_keeps_its_exclusions_through_save_and_load(tmp_path):
    """Keras saves no exclusion of AdamW's (a plain AdamW reloads decaying everything): the same zero-gradient
    step on the reloaded model and optimizer decays exactly the same weights."""
    m = vit_tiny_vib(**SMALL)
    m.compile(paper_optimizer(m, learning_rate=0.1, weight_decay=0.5),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert m.optimizer.epsilon == 1e-8  # torch's AdamW's, as the timm trainer's
    m.save(tmp_path / 'm.keras')
    loaded = keras.saving.load_model(tmp_path / 'm.keras')
    assert type(loaded.optimizer).__name__ == 'PaperAdamW'
    excluded = {id(v) for v in no_weight_decay_variables(loaded)}
    before = [ops.convert_to_numpy(v) for v in loaded.trainable_variables]
    lr = float(ops.convert_to_numpy(loaded.optimizer.learning_rate))
    loaded.optimizer.apply([ops.zeros(v.shape) for v in loaded.trainable_variables], loaded.trainable_variables)
    for v, b in zip(loaded.trainable_variables, before):
        expected = b if id(v) in excluded else b * (1 - lr * 0.5)
        np.testing.assert_allclose(ops.convert_to_numpy(v), expected, rtol=1e-5, atol=1e-7, err_msg=v.path)


def test_cosine_schedule_closed_form():
    peak, low, total, warm = 6e-4, 1e-6, 110, 10
    s = cosine_schedule(peak, total, warm, low)
    lr = np.array([float(s(t)) for t in range(total + 1)])
    expected = [low + (peak - low) * t / warm if t < warm else
                low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) for t in range(total + 1)]
    np.testing.assert_allclose(lr, expected, rtol=1e-5)
    assert lr[warm] == pytest.approx(peak) and lr[-1] == pytest.approx(low)
    assert float(cosine_schedule(1.0, 10)(0)) == pytest.approx(1.0)  # no warm-up: starts at the peak
    with pytest.raises(ValueError, match='warmup_steps'):
        cosine_schedule(1e-3, 10, 10)


def test_beta_at_is_timm_vibs():
    pytest.importorskip('timm')
    from timm_vib.training import beta_at as timm_beta_at
    for schedule in ('linear', 'log'):
        for beta in (0.0, 0.01, 4.0):
            for t in (0, 1, 7, 9, 10, 50):
                assert beta_at(beta, t, 10, schedule) == timm_beta_at(beta, t, 10, schedule)
    for bad in ((-1.0, 0, 5), (1.0, -1, 5), (1.0, 0, -5)):
        for f in (beta_at, timm_beta_at):
            with pytest.raises(ValueError, match='>= 0'):
                f(*bad)
    with pytest.raises(ValueError, match='schedule'):
        BetaWarmup(5, schedule='cosine')


def _ramp_model():
    """A one-layer model with a KL well above zero, 8 images, and each batch of 4's mean KL."""
    keras.utils.set_random_seed(0)
    m = vit_tiny_vib(beta=2.0, seed=0, **{**SMALL, 'depth': 1})
    for b in (m.blocks[0].attn.vib.enc_bias, m.blocks[0].attn.vib.enc_out_bias):  # a KL well above zero
        b.assign(np.random.default_rng(0).normal(0, 1.0, b.shape).astype('float32'))
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype('float32')
    kl = [float(keras_vib.kl_and_latents(m, x[i:i + 4])['kl'].mean()) for i in (0, 4)]  # per batch of 4
    return m, x, kl


@pytest.mark.parametrize('schedule', ['linear', 'log'])
def test_beta_warmup_is_in_force_in_each_compiled_step(schedule):
    """With lr 0 and one fixed batch, each step's loss is beta(step) x the first layer's mean KL (a
    one-layer model's KL does not depend on the sampled z): the compiled step (JAX, TensorFlow) must
    read the new beta every update."""
    m, x, kl = _ramp_model()
    assert min(kl) > 0.1
    m.compile(keras.optimizers.SGD(0.0))  # no loss but the model's own: beta * mean KL
    warm = BetaWarmup(warmup_steps=4, schedule=schedule)
    # two updates per epoch: fit re-reads the variables at each epoch start on its own, not between updates
    hist = m.fit(x, epochs=3, batch_size=4, shuffle=False, verbose=0, callbacks=[warm])
    expected = [np.mean([beta_at(2.0, 2 * e + j, 4, schedule) * kl[j] for j in (0, 1)]) for e in range(3)]
    np.testing.assert_allclose(hist.history['loss'], expected, rtol=1e-4)
    assert m.beta == 2.0 and warm.step == 5
    # a second fit goes on from update 6: beta stays at its target
    hist = m.fit(x, epochs=1, batch_size=4, shuffle=False, verbose=0, callbacks=[warm])
    assert hist.history['loss'][0] == pytest.approx(2.0 * np.mean(kl), rel=1e-4)
    with pytest.raises(ValueError, match='attn_mode="vib"'):
        g = keras_vib.vit_tiny_gap(**SMALL)
        g.compile('sgd', keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        g.fit(x, np.zeros(8, 'int32'), verbose=0, callbacks=[BetaWarmup(2)])


def test_beta_warmup_goes_on_from_a_model_saved_mid_ramp(tmp_path):
    """The ramp's position is the optimizer's update count, and model.beta (what the config saves) stays the
    target: a model saved after 2 of 6 ramp updates and reloaded goes on at update 2, towards beta 2."""
    m, x, kl = _ramp_model()
    m.compile(keras.optimizers.SGD(0.0))
    m.fit(x, epochs=1, batch_size=4, shuffle=False, verbose=0, callbacks=[BetaWarmup(warmup_steps=6)])
    assert m.beta == 2.0 and float(ops.convert_to_numpy(m.beta_variable)) == pytest.approx(beta_at(2.0, 1, 6))
    m.save(tmp_path / 'mid.keras')
    loaded = keras.saving.load_model(tmp_path / 'mid.keras')
    assert loaded.beta == 2.0
    warm = BetaWarmup(warmup_steps=6)
    hist = loaded.fit(x, epochs=2, batch_size=4, shuffle=False, verbose=0, callbacks=[warm])
    expected = [np.mean([beta_at(2.0, 2 * e + j, 6) * kl[j] for j in (0, 1)]) for e in (1, 2)]
    np.testing.assert_allclose(hist.history['loss'], expected, rtol=1e-4)
    assert warm.step == 5


def test_beta_warmup_counts_updates_with_steps_per_execution():
    """Two updates per compiled call: beta moves once per call and does not fall behind the update count."""
    if keras.backend.backend() == 'torch':
        pytest.skip('Keras runs steps_per_execution > 1 on JAX and TensorFlow only')
    m, x, kl = _ramp_model()
    m.compile(keras.optimizers.SGD(0.0), steps_per_execution=2)
    warm = BetaWarmup(warmup_steps=4)
    hist = m.fit(x, epochs=3, batch_size=4, shuffle=False, verbose=0, callbacks=[warm])
    expected = [np.mean([beta_at(2.0, 2 * e, 4) * kl[j] for j in (0, 1)]) for e in range(3)]
    np.testing.assert_allclose(hist.history['loss'], expected, rtol=1e-4)
    assert warm.step == 4 and int(ops.convert_to_numpy(m.optimizer.iterations)) == 6


def test_beta_warmup_checks_its_beta_at_once():
    with pytest.raises(ValueError, match='>= 0'):
        BetaWarmup(4, beta=-1.0)
    assert BetaWarmup(np.int64(4)).warmup_steps == 4
