"""KL maps, survival function, active heads and dims, information totals, top patches: brute force references."""
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_vib.estimators import (
    active_dims, active_heads, capture, information_per_image, information_per_patch, kl_map, max_kl,
    mean_information, survival_function, top_patches)
from timm_vib.information import gaussian_kl

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def small(**kw):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_vib', **dict(SMALL, **kw)).eval()


def data(n=5):
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return x, DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=2)


def silence(model, layer, head, dims=None):
    """Posterior = prior for (some dims of) one head: mu = 0, logvar = 0, so their KL is exactly 0."""
    vib = model.blocks[layer].attn.vib
    r = vib.vib_dim
    dims = list(range(r)) if dims is None else dims
    weight = vib.enc_out_weight if vib.vib_hidden else vib.enc_weight  # the layer that outputs (mu, logvar)
    with torch.no_grad():
        for d in dims:
            for c in (d, r + d):
                weight[head, :, c] = 0
                vib.stats_bias[head, c] = 0


def test_kl_map_and_totals():
    kl = torch.rand(2, 3, 4, 1 + 6)
    grid = kl_map(kl, (2, 3), num_prefix_tokens=1)
    assert grid.shape == (2, 2, 3)
    assert grid[1, 1, 2] == pytest.approx(float(kl[1, :, :, 1 + 5].sum()), rel=1e-6)
    assert kl_map(kl, (2, 3), 1, reduce=False).shape == (2, 3, 4, 2, 3)
    torch.testing.assert_close(information_per_image(kl), kl.sum((1, 2, 3)))
    torch.testing.assert_close(information_per_patch(kl), kl.sum((1, 2)))
    # a class token is not a patch: left out when its count is given, as mean_information leaves it out
    torch.testing.assert_close(information_per_image(kl, 1), kl[..., 1:].sum((1, 2, 3)))
    torch.testing.assert_close(information_per_patch(kl, 1), kl[..., 1:].sum((1, 2)))
    with pytest.raises(ValueError, match='num_prefix_tokens'):
        information_per_image(kl, 7)
    with pytest.raises(ValueError, match='tokens'):
        kl_map(kl, (3, 3), 1)
    square = torch.rand(2, 3, 4, 9)
    torch.testing.assert_close(kl_map(square, 3), kl_map(square, (3, 3)))  # one int: a square grid, as timm's img_size
    with pytest.raises(ValueError, match='batch, depth, heads, tokens'):
        information_per_image(kl[0])
    for bad, what in ((kl - 0.5, 'negative'), (kl.masked_fill(kl > 0.9, float('nan')), 'NaN')):
        for f in (information_per_image, information_per_patch, lambda k: kl_map(k, (2, 3), 1)):
            with pytest.raises(ValueError, match=what):
                f(bad)
    near_prior = gaussian_kl(1e-4 * torch.randn(2, 3, 4, 7, 8), 1e-4 * torch.randn(2, 3, 4, 7, 8))
    torch.testing.assert_close(information_per_image(near_prior), near_prior.sum((1, 2, 3)))  # rounding is not refused


def all_kl(m, x):
    with torch.no_grad():
        return m(x, return_kl=True)[1]


def test_survival_function_matches_brute_force():
    m = small(vib_dim=4)
    x, loader = data()
    kl = all_kl(m, x)  # [5, 2, 3, 16]
    thr = torch.tensor([0.0, 1.0, 10.0, float(kl.median()), 1e3]).sort().values
    t, sf = survival_function(m, loader, thr)
    expected = (kl.permute(1, 2, 0, 3).reshape(2, 3, -1, 1).double() >= thr).double().mean(2)
    torch.testing.assert_close(sf, expected)
    assert torch.all(sf[..., 0] == 1)
    with pytest.raises(ValueError, match='increasing'):
        survival_function(m, loader, torch.tensor([1.0, 0.5]))


def test_active_heads_and_dims():
    m = small(vib_dim=4)
    silence(m, 1, 2)
    silence(m, 0, 1, dims=[0, 3])
    x, loader = data()
    kl = all_kl(m, x)
    torch.testing.assert_close(max_kl(m, loader), kl.amax((0, 3)))
    act = active_heads(m, loader)
    expected = torch.ones(2, 3, dtype=torch.bool)
    expected[1, 2] = False
    assert torch.equal(act, expected)
    assert torch.equal(active_heads(m, loader, threshold=1e9), torch.zeros(2, 3, dtype=torch.bool))
    dims = active_dims(m, loader)
    assert dims.shape == (2, 3, 4)
    counts = torch.full((2, 3), 4)
    counts[1, 2], counts[0, 1] = 0, 2
    assert torch.equal(dims.sum(-1), counts)
    per_image, per_patch = mean_information(m, loader)
    assert per_image == pytest.approx(float(kl.double().sum()) / 5, rel=1e-9)
    assert per_patch == pytest.approx(per_image / 16, rel=1e-9)


@pytest.mark.parametrize('by,sign', [('kl', 1), ('latent', 1), ('latent', -1)])
def test_top_patches_match_brute_force(by, sign):
    m = small(vib_dim=4)
    x, loader = data()
    with torch.no_grad(), capture(m, attention=True) as rec:
        m(x)
    score = rec.kl[:, 1, 0] if by == 'kl' else rec.mu[:, 1, 0, :, 2]
    flat = (sign * score).reshape(-1)
    order = flat.argsort(descending=True)[:4]
    top = top_patches(m, loader, layer=1, head=0, k=4, by=by, dim=2, sign=sign)
    torch.testing.assert_close(top.score, score.reshape(-1)[order])
    assert torch.equal(top.image, order // 16) and torch.equal(top.token, order % 16)
    assert torch.equal(top.row * 4 + top.col, top.token)
    expected_attn = rec.attention[top.image, 1, 0, top.token].reshape(4, 4, 4)
    torch.testing.assert_close(top.attention, expected_attn)


def test_bad_indices():
    m = small(vib_dim=4)
    _, loader = data()
    with pytest.raises(IndexError, match='layer 2'):
        top_patches(m, loader, layer=2, head=0)
    with pytest.raises(IndexError, match='head 3'):
        top_patches(m, loader, layer=0, head=3)
    with pytest.raises(IndexError, match='latent dim'):
        top_patches(m, loader, layer=0, head=0, by='latent', dim=4)
    gap = timm.create_model('vit_tiny_gap', **SMALL)
    with pytest.raises(ValueError, match='no information bottleneck'):
        active_heads(gap, loader)


def test_bad_thresholds_and_loaders():
    """A KL is never negative, so a negative threshold would count every head active; a tensor of images or a
    Dataset where the loader belongs yields single images: both are named."""
    m = small(vib_dim=4)
    x, loader = data()
    for bad in (-1e-3, float('nan'), float('inf'), None):
        with pytest.raises(ValueError, match='threshold'):
            active_heads(m, loader, threshold=bad)
        with pytest.raises(ValueError, match='threshold'):
            active_dims(m, loader, threshold=bad)
    assert torch.equal(active_heads(m, loader, threshold=0), max_kl(m, loader) > 0)
    for not_a_loader in (x, loader.dataset):
        with pytest.raises(TypeError, match=r'got one image \[3, 32, 32\]: pass a DataLoader'):
            max_kl(m, not_a_loader)
    torch.testing.assert_close(max_kl(m, [x]), max_kl(m, loader))


def test_information_per_image_agrees_with_mean_information_on_a_class_token_model():
    """A vibify'd timm ViT has a class token: per-image information over the patch tokens is what
    mean_information reports (it had counted the class token's KL too: 1021 against 961 nats)."""
    import timm
    from timm_vib import vibify
    from timm_vib.estimators import mean_information
    from timm_vib.estimators.capture import num_prefix_tokens
    torch.manual_seed(0)
    m = vibify(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=4), vib_dim=8)
    with torch.no_grad():
        for b in m.bottlenecks():
            b.stats_bias.normal_(0, 1.0)
    x = torch.randn(3, 3, 32, 32)
    per_image, _ = mean_information(m, [x])
    with torch.no_grad(), capture(m) as rec:
        m.eval()(x)
    assert num_prefix_tokens(m) == 1
    assert float(information_per_image(rec.kl, num_prefix_tokens(m)).mean()) == pytest.approx(per_image, rel=1e-5)
    assert float(information_per_image(rec.kl).mean()) > per_image * 1.01  # the class token carries KL too
