"""Patch voting and model comparison against scipy and hand-made cases."""
import math

import numpy as np
import pytest
import timm
import torch
from scipy.spatial.distance import jensenshannon
from torch.utils.data import DataLoader, TensorDataset

from timm_vib.estimators import (
    capture, compare_models, inverse_simpson, js_distance, js_divergence, logit_range, patch_voting, top_fraction,
    vote_fractions)

SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=5)


def test_js_matches_scipy_including_zero_probabilities():
    rng = np.random.default_rng(0)
    p, q = rng.random((6, 7)), rng.random((6, 7))
    p[0, :3] = 0
    q[1, 4:] = 0
    q[2] = p[2]
    expected = np.array([jensenshannon(a, b) for a, b in zip(p, q)])
    got = js_distance(torch.tensor(p), torch.tensor(q)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(js_divergence(torch.tensor(p), torch.tensor(q)).numpy(), expected ** 2, atol=1e-12)
    # disjoint supports reach ln 2 nats
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match='same shape'):
        js_divergence(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match='non-negative'):
        js_divergence(torch.tensor([float('nan'), 1.0]), torch.ones(2))
    with pytest.raises(ValueError, match='all-zero'):
        js_divergence(torch.tensor([[0.5, 0.5], [0.0, 0.0]]), torch.ones(2, 2))


def test_votes_inverse_simpson_and_logit_range():
    logits = torch.zeros(2, 4, 3)
    logits[0, :, 1] = 1  # all four patches vote for class 1
    logits[1, torch.arange(4), torch.tensor([0, 1, 2, 2])] = torch.tensor([1.0, 2.0, 3.0, -0.5])
    logits[1, 3, 1] = 0.5  # patch 3 votes for class 1; image 1 logits span -0.5 .. 3
    logits[1, 3, 0] = -2.0  # ... and now -2 .. 3
    f = vote_fractions(logits)
    torch.testing.assert_close(f, torch.tensor([[0, 1, 0], [0.25, 0.5, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(inverse_simpson(f), torch.tensor([1.0, 1 / (0.0625 + 0.25 + 0.0625)], dtype=torch.float64))
    torch.testing.assert_close(logit_range(logits), torch.tensor([1.0, 5.0]))
    uniform = torch.full((1, 5), 0.2, dtype=torch.float64)
    assert inverse_simpson(uniform).item() == pytest.approx(5.0)
    # not distributions: no effective number of classes (an all-zero row would be inf, a negative entry anything)
    for bad in (torch.zeros(1, 3), torch.tensor([[0.6, -0.1, 0.5]]), torch.tensor([[0.5, 0.2, 0.2]]),
                torch.tensor([[float('nan'), 0.5, 0.5]])):
        with pytest.raises(ValueError, match='non-negative and sum to one'):
            inverse_simpson(bad)
    # a NaN patch has no top class (argmax would pick one anyway)
    logits[1, 2, 0] = float('nan')
    for f in (vote_fractions, logit_range):
        with pytest.raises(ValueError, match='NaN'):
            f(logits)


def test_top_fraction():
    s = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.8, 0.0, 0.2, 0.4, 0.6, 0.7, 0.05, 0.95, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85])
    assert top_fraction(s).tolist() == [11, 1]
    assert len(top_fraction(s[:5])) == 1
    with pytest.raises(ValueError, match='fraction'):
        top_fraction(s, 0)


def test_model_level_functions_stream_a_loader():
    torch.manual_seed(0)
    a = timm.create_model('vit_tiny_vib', **SMALL).eval()
    b = timm.create_model('vit_tiny_gap', **SMALL).eval()
    x = torch.randn(5, 3, 32, 32)
    loader = DataLoader(TensorDataset(x), batch_size=2)
    assert torch.all(compare_models(a, a, loader) < 1e-12)
    with torch.no_grad():
        expected = torch.tensor(np.array([jensenshannon(p, q) for p, q in zip(a(x).softmax(-1).numpy(), b(x).softmax(-1).numpy())]))
    torch.testing.assert_close(compare_models(a, b, loader).sqrt(), expected.double(), rtol=1e-4, atol=1e-6)
    simpson, ranges = patch_voting(a, loader)
    with torch.no_grad(), capture(a) as rec:
        a(x)
    torch.testing.assert_close(simpson, inverse_simpson(vote_fractions(rec.logits)))
    torch.testing.assert_close(ranges, logit_range(rec.logits))
    assert torch.all((simpson >= 1) & (simpson <= 5))
    other = timm.create_model('vit_tiny_gap', **dict(SMALL, num_classes=7)).eval()
    with pytest.raises(ValueError, match='same classes: 5 and 7'):
        compare_models(a, other, loader)
