"""Mutual information and NMI between heads: independent references (closed forms, sklearn)."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from timm_vib.estimators import (
    joint_mutual_information, log_density_matrix, mutual_information, mutual_information_uu,
    mutual_information_uv, nmi_matrix, normalized_mutual_information)


def two_point_reference(m: float) -> float:
    """ln 2 - E_{z~N(0,1)}[softplus(-2m(m+z))] by Gauss-Hermite quadrature (independent of the estimator)."""
    z, w = np.polynomial.hermite_e.hermegauss(200)
    return math.log(2) - float((w * np.logaddexp(0, -2 * m * (m + z))).sum() / w.sum())


def test_two_point_reference_value():
    assert two_point_reference(1.0) == pytest.approx(0.336831, abs=1e-6)


@pytest.mark.parametrize('m', [0.3, 1.0, 2.0])
def test_two_point_channel_within_three_stderr(m):
    mu = torch.tensor([[m], [-m]])
    est = mutual_information(mu, torch.zeros(2, 1), n_samples=40_000, seed=1)
    assert est.stderr > 0
    assert abs(est.value - two_point_reference(m)) < 3 * est.stderr


def test_identical_posteriors_give_zero():
    mu = torch.randn(1, 4).expand(50, 4)
    est = mutual_information(mu, torch.full((50, 4), -3.0), n_samples=2000)
    assert abs(est.value) < 1e-9 and est.stderr < 1e-9


def test_well_separated_points_give_log_l():
    L = 37
    mu = torch.randn(L, 3, generator=torch.Generator().manual_seed(0)) * 100
    est = mutual_information(mu, torch.full((L, 3), -10.0), n_samples=3000, chunk_points=8)
    assert est.value == pytest.approx(math.log(L), abs=1e-6)  # means ~100 at logvar -10: float64 keeps ~1e-8


def test_matrix_product_density_matches_direct_difference_at_small_variance():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(30, 8, generator=g, dtype=torch.float64) * 5 + 20  # offset: centring must not matter
    logvar = torch.rand(30, 8, generator=g, dtype=torch.float64) * 12 - 10
    u = mu[:7] + 0.3 * torch.randn(7, 8, generator=g, dtype=torch.float64)
    direct = -0.5 * (((u[:, None] - mu[None]) ** 2 / logvar.exp()[None]) + logvar[None] + math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(log_density_matrix(u, mu, logvar), direct, rtol=1e-10, atol=1e-6)


def test_chunking_does_not_change_the_estimate_beyond_noise():
    g = torch.Generator().manual_seed(3)
    mu, lv = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g) - 1
    a = mutual_information(mu, lv, n_samples=4000, chunk_points=7, chunk_samples=4000)
    b = mutual_information(mu, lv, n_samples=4000, chunk_points=4096, chunk_samples=4000)
    assert a.value == pytest.approx(b.value, abs=1e-9)  # same draws, different point chunks
    assert 0 < a.value < math.log(40)


def test_seed_reproducible():
    mu, lv = torch.randn(20, 2), torch.zeros(20, 2)
    assert mutual_information(mu, lv, 500, seed=4) == mutual_information(mu, lv, 500, seed=4)
    assert mutual_information(mu, lv, 500, seed=4) != mutual_information(mu, lv, 500, seed=5)


def clusters(labels, sep=50.0, dims=2, seed=0):
    """Hard-clustering limit: every point at its cluster centre, tiny variance."""
    labels = torch.as_tensor(labels)
    centres = torch.randn(int(labels.max()) + 1, dims, generator=torch.Generator().manual_seed(seed)) * sep
    return centres[labels], torch.full((len(labels), dims), -10.0)


def test_hard_clustering_limit_matches_sklearn_geometric_nmi():
    rng = np.random.default_rng(0)
    lu = rng.integers(0, 4, 120)
    lv = np.where(rng.random(120) < 0.7, lu, rng.integers(0, 3, 120))  # correlated labelling
    mu_u, lv_u = clusters(lu, seed=1)
    mu_v, lv_v = clusters(lv, dims=3, seed=2)
    expected = normalized_mutual_info_score(lu, lv, average_method='geometric')
    est = normalized_mutual_information(mu_u, lv_u, mu_v, lv_v, n_samples=1200)
    assert est.value == pytest.approx(expected, abs=1e-6)
    # I(X;U) is the label entropy in nats there, and I(U;U') equals it
    p = np.bincount(lu) / len(lu)
    h = float(-(p * np.log(p)).sum())
    assert mutual_information(mu_u, lv_u, n_samples=1200).value == pytest.approx(h, abs=1e-6)
    assert mutual_information_uu(mu_u, lv_u, n_samples=1200).value == pytest.approx(h, abs=1e-6)


def test_independent_coordinates_give_nmi_near_zero():
    a, b = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing='ij')
    mu_u, mu_v = a.reshape(-1, 1), b.reshape(-1, 1)  # U encodes one coordinate, V the other
    lv = torch.full((64, 1), math.log(0.5 ** 2))
    est = normalized_mutual_information(mu_u, lv, mu_v, lv, n_samples=20_000, seed=2)
    assert abs(est.value) < 3 * est.stderr + 0.01
    assert mutual_information(mu_u, lv, n_samples=20_000).value > 1.0  # the heads themselves are informative
    same = normalized_mutual_information(mu_u, lv, mu_u.clone(), lv, n_samples=20_000, seed=2)
    assert same.value == pytest.approx(1.0, abs=3 * same.stderr + 0.02)


def test_uv_identity_and_joint_channel():
    g = torch.Generator().manual_seed(5)
    mu_u, mu_v = torch.randn(30, 2, generator=g), torch.randn(30, 3, generator=g)
    lv_u, lv_v = torch.zeros(30, 2), torch.full((30, 3), -1.0)
    n = 3000
    iu = mutual_information(mu_u, lv_u, n, seed=0).value
    iv = mutual_information(mu_v, lv_v, n, seed=0)
    iuv = joint_mutual_information([(mu_u, lv_u), (mu_v, lv_v)], n, seed=0).value
    # concatenated parameters are the same channel as the joint of the two heads
    cat = mutual_information(torch.cat([mu_u, mu_v], 1), torch.cat([lv_u, lv_v], 1), n, seed=0)
    assert abs(cat.value - iuv) < 4 * cat.stderr
    est = mutual_information_uv(mu_u, lv_u, mu_v, lv_v, n, seed=0)
    assert est.value == pytest.approx(iu + iv.value - iuv, abs=5 * est.stderr)


def test_nmi_matrix_agrees_with_pairwise_and_is_symmetric():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 2, generator=g)
    heads = [(base, torch.full((40, 2), -2.0)),
             (base[:, :1] * 2 + 0.1 * torch.randn(40, 1, generator=g), torch.full((40, 1), -1.0)),
             (torch.randn(40, 3, generator=g), torch.zeros(40, 3))]
    m = nmi_matrix(heads, n_samples=4000, seed=3, chunk_points=16)
    assert torch.equal(m.value, m.value.T) and torch.all(m.value.diagonal() == 1)
    for a in range(3):
        for b in range(a + 1, 3):
            pair = normalized_mutual_information(*heads[a], *heads[b], n_samples=4000, seed=3)
            tol = 4 * math.hypot(pair.stderr, float(m.stderr[a, b])) + 1e-3
            assert abs(float(m.value[a, b]) - pair.value) < tol
    assert m.value[0, 1] > m.value[0, 2]  # shared coordinate beats unrelated head
    assert m.information.shape == (3,) and torch.all(m.information_stderr > 0)


def test_bad_input():
    mu = torch.randn(10, 3)
    with pytest.raises(ValueError, match='same shape'):
        mutual_information(mu, torch.zeros(10, 2))
    with pytest.raises(ValueError, match='L >= 2'):
        mutual_information(mu[:1], torch.zeros(1, 3))
    with pytest.raises(ValueError, match='n_samples'):
        mutual_information(mu, torch.zeros(10, 3), n_samples=0)
    bad = mu.clone()
    bad[2, 1] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        mutual_information(bad, torch.zeros(10, 3))
    with pytest.raises(ValueError, match='same L'):
        normalized_mutual_information(mu, torch.zeros(10, 3), mu[:9], torch.zeros(9, 3))
    with pytest.raises(ValueError, match=r'\[L, r\]'):
        mutual_information(mu[None], torch.zeros(1, 10, 3))
    # a model or a list of tensors where the (mu, logvar) pairs belong
    with pytest.raises(TypeError, match=r'\(mu \[L, r\], logvar \[L, r\]\) pairs, got Linear'):
        nmi_matrix(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match='pairs, got list of Tensor'):
        nmi_matrix([mu, mu])


def test_nmi_of_a_head_without_information_is_nan_with_a_warning():
    """A head whose posterior ignores the input has I(X;U) = I(U;U') = 0: NMI = 0/0 is undefined, not a
    huge number from a clamped denominator. An informative pair next to it keeps a finite NMI."""
    L = 40
    g = torch.Generator().manual_seed(0)
    silent = (torch.randn(1, 2, generator=g).expand(L, 2), torch.zeros(L, 2))
    loud = (torch.randn(L, 2, generator=g) * 3, torch.full((L, 2), -2.0))
    loud2 = (loud[0] + 0.1 * torch.randn(L, 2, generator=g), loud[1])
    with pytest.warns(RuntimeWarning, match='undefined'):
        est = normalized_mutual_information(*silent, *loud, n_samples=2000)
    assert math.isnan(est.value)
    with pytest.warns(RuntimeWarning, match='undefined'):
        mat = nmi_matrix([silent, loud, loud2], n_samples=2000)
    assert torch.isnan(mat.value[0, 1]) and torch.isnan(mat.value[0, 2]) and torch.isnan(mat.value[1, 0])
    assert 0.5 < float(mat.value[1, 2]) <= 1.05
