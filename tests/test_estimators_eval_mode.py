"""Estimators run the model deterministically (eval mode, posterior means) whatever mode it is in, give
the answer of the same weights in eval mode, and hand every module's mode and sampling flag back as
they found them, also when the forward pass raises."""
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_vib import HeadBottleneck
from timm_vib.estimators import (
    active_dims, capture, compare_models, eval_mode, iterate_records, max_kl, mean_information,
    optimal_attention_images, patch_voting, qk_maps, qk_svd, repetition_probe, survival_function, top_patches)

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5, vib_dim=4)


def noisy(seed=0):
    """Posteriors at unit variance and dropout in the MLPs: z sampled in train mode is far from mu."""
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_vib', vib_logvar_init=0.0, proj_drop_rate=0.3, **SMALL).eval()


def flags(model):
    return ([(name, m.training) for name, m in model.named_modules()],
            [b.sample_in_eval for b in model.modules() if isinstance(b, HeadBottleneck)])


def unsettle(model):
    """Train mode but block 1 in eval; block 0's bottleneck samples in eval too: a mixed state to restore."""
    model.train()
    model.blocks[1].eval()
    model.blocks[0].attn.vib.sample_in_eval = True
    return flags(model)


def deterministic_calls(model):
    """List that gets, per forward pass of ``model``, whether it ran in eval mode without sampling."""
    seen = []

    def check(module, args):
        seen.append(not any(m.training for m in model.modules())
                    and not any(b.sample_in_eval for b in model.modules() if isinstance(b, HeadBottleneck)))
    return seen, model.register_forward_pre_hook(check)


def images(n=5, chans=3):
    return torch.randn(n, chans, 32, 32, generator=torch.Generator().manual_seed(2))


def loader(x):
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=2)


def bad_loader():
    # a batch that reaches the model and fails its input check inside the estimator's loop
    return [images(2, chans=1)]


def tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for k in sorted(result) for t in tensors(result[k])]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in tensors(r)]
    if hasattr(result, '__dataclass_fields__'):
        return [t for k in result.__dataclass_fields__ for t in tensors(getattr(result, k))]
    return [torch.tensor(result)]


def test_eval_mode_is_deterministic_inside_and_restores_every_flag():
    m, ref = noisy(), noisy()
    before = unsettle(m)
    x = images(2)
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))  # the unsettled model is noisy
        with eval_mode(m) as same:
            assert same is m
            assert not any(mod.training for mod in m.modules()) and not m.stochastic_eval
            assert torch.equal(m(x), ref(x))
    assert flags(m) == before
    with pytest.raises(RuntimeError, match='inside'):
        with eval_mode(m):
            with eval_mode(m):  # nested: the inner exit does not end the outer context
                raise RuntimeError('raised inside')
    assert flags(m) == before


def test_iterate_records_restores_the_modes_when_closed_early():
    m = noisy()
    before = unsettle(m)
    it = iterate_records(m, loader(images()))
    next(it)
    assert not m.training and not m.stochastic_eval
    it.close()
    assert flags(m) == before


ESTIMATORS = {
    'survival_function': lambda m, data: survival_function(m, data),
    'max_kl': lambda m, data: max_kl(m, data),
    'active_dims': lambda m, data: active_dims(m, data),
    'mean_information': lambda m, data: mean_information(m, data),
    'top_patches': lambda m, data: top_patches(m, data, layer=1, head=0, k=4, attention=True),
    'top_patches_latent': lambda m, data: top_patches(m, data, layer=1, head=2, k=3, by='latent', dim=1),
    'patch_voting': lambda m, data: patch_voting(m, data),
    'optimal_attention_images': lambda m, data: optimal_attention_images(m, data, 1, 0, 0, k=2, svd=qk_svd(m)),
    'qk_maps': lambda m, data: qk_maps(m, torch.cat([b if torch.is_tensor(b) else b[0] for b in data]), 1, 0, 0),
}


@pytest.mark.parametrize('name', list(ESTIMATORS))
def test_dataset_estimators_give_the_eval_answer_from_any_mode(name):
    fn = ESTIMATORS[name]
    m, ref = noisy(), noisy()
    expected = tensors(fn(ref, loader(images())))
    before = unsettle(m)
    seen, handle = deterministic_calls(m)
    got = tensors(fn(m, loader(images())))
    handle.remove()
    assert seen and all(seen)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert flags(m) == before
    with pytest.raises(ValueError, match='input channels'):
        fn(m, bad_loader())
    assert flags(m) == before


def test_compare_models_gives_the_eval_answer_from_any_mode():
    a, b = noisy(0), noisy(1)
    expected = compare_models(noisy(0), noisy(1), loader(images()))
    before_a = unsettle(a)
    b.train()
    before_b = flags(b)
    seen_a, ha = deterministic_calls(a)
    seen_b, hb = deterministic_calls(b)
    assert torch.equal(compare_models(a, b, loader(images())), expected)
    assert torch.all(compare_models(a, a, loader(images())) == 0)  # one model, no noise: identical distributions
    ha.remove()
    hb.remove()
    assert seen_a and all(seen_a) and seen_b and all(seen_b)
    assert flags(a) == before_a and flags(b) == before_b
    with pytest.raises(ValueError, match='input channels'):
        compare_models(a, b, bad_loader())
    assert flags(a) == before_a and flags(b) == before_b


def test_repetition_probe_gives_the_eval_answer_from_any_mode_and_returns_mu0():
    m, ref = noisy(), noisy()
    x, p, lh = images(3), torch.tensor([2, 7, 9]), [(1, 0), (0, 2)]
    expected = repetition_probe(ref, x, p, lh, n_copies=(0, 4, 15), seed=3)
    before = unsettle(m)
    got = repetition_probe(m, x, p, lh, n_copies=(0, 4, 15), seed=3)
    assert torch.equal(got.shift, expected.shift)
    assert torch.all(got.shift[:, 0] == 0)  # no copies, no shift, even for the layer-1 head downstream of noise
    # mu_0: the posterior mean at the source patch of the original image, as capture reads it in eval mode
    with torch.no_grad(), capture(ref) as rec:
        ref(x)
    layers, heads = torch.tensor([1, 0]), torch.tensor([0, 2])
    mu0 = rec.mu[torch.arange(3)[:, None], layers, heads, p[:, None]]  # [P, pairs, r]
    assert got.mu0.shape == (3, 2, 4)
    assert torch.equal(got.mu0, mu0)
    shift, mu0_unpacked = got
    assert shift is got.shift and mu0_unpacked is got.mu0
    assert flags(m) == before
    with pytest.raises(ValueError, match='input channels'):
        repetition_probe(m, x[:, :1], p, lh, n_copies=(4,))
    assert flags(m) == before
