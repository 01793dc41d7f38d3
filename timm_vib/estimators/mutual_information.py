""" Mutual information and normalized mutual information between bottleneck heads (eq. 4-6)

Each head is a stochastic channel p(u|x) from the data point x (one of L patches) to its latent u,
given by the head's diagonal Gaussian posteriors (mu, logvar) [L, r]. Monte Carlo over the
aggregated posterior (eq. 4):

    I(X;U) = E_x E_{u~p(u|x)} [ log p(u|x) - log (1/L) sum_i p(u|x_i) ]

with the sample's own component inside the sum and log-sum-exp throughout. Samples are stratified
(n_samples spread evenly over a random permutation of the L points), which lowers the variance;
the reported standard error std(t) / sqrt(S) treats the terms as i.i.d. and so is conservative.

Speed: log N(u; m_i, s_i^2) summed over r dims is a dot product of the sample features
[u^2, u, 1] with per-point coefficients [-1/(2 s^2), m/s^2, -(sum m^2/s^2 + log s^2 + log 2pi)/2],
so the [samples x points] log-density block is one float64 matrix product. Float64 because
log-variances reach -10 (1/s^2 ~ 2e4), where u^2/s^2 - 2um/s^2 + m^2/s^2 cancels badly in float32;
means are centred per head first, which shrinks the cancelling terms further. The sample's own
log-density is folded into the product as one more feature, so the block already holds
log p(u|x_i) - log p(u|x) and only needs exp and a row sum (a log-sum-exp pass is used for the rare
rows that would overflow). Blocks are preallocated and reused. Memory is bounded by the chunk sizes whatever S and L are.

Joint channels (U, V) concatenate independent dims, so their log-density block is the SUM of the
heads' blocks: an NMI matrix over K heads costs 2K matrix products per chunk (two independent
draws per head, for I(U;U')) and K(K-1)/2 block additions.
"""
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = [
    'Estimate', 'NMIMatrix', 'mutual_information', 'joint_mutual_information', 'mutual_information_uv',
    'mutual_information_uu', 'normalized_mutual_information', 'nmi_matrix', 'log_density_matrix',
]

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class Estimate:
    """A Monte Carlo estimate in nats (NMI: unitless) and its standard error."""
    value: float
    stderr: float

    def __iter__(self):
        return iter((self.value, self.stderr))

    def __repr__(self) -> str:
        return f'Estimate({self.value:.6g} +- {self.stderr:.2g})'


@dataclass(frozen=True)
class NMIMatrix:
    """Pairwise NMI between K heads, with the single-head information it is built from.

    value, stderr: [K, K] NMI (diagonal exactly 1, stderr 0);
    mutual_information, mutual_information_stderr: [K, K] I(U;V) in nats (diagonal: I(U;U'));
    information, information_stderr: [K] I(X;U) in nats.
    """
    value: torch.Tensor
    stderr: torch.Tensor
    mutual_information: torch.Tensor
    mutual_information_stderr: torch.Tensor
    information: torch.Tensor
    information_stderr: torch.Tensor


Head = Tuple[torch.Tensor, torch.Tensor]


def _check_head(mu, logvar, name: str = 'mu') -> Head:
    mu, logvar = torch.as_tensor(mu), torch.as_tensor(logvar)
    if mu.shape != logvar.shape:
        raise ValueError(
            f'{name} and its log-variance must have the same shape [L, r], got {tuple(mu.shape)} and {tuple(logvar.shape)}')
    if mu.ndim != 2:
        raise ValueError(f'{name} must be [L, r] (one row per data point), got shape {tuple(mu.shape)}')
    if mu.shape[0] < 2:
        raise ValueError(f'mutual information over data points needs L >= 2 points, got L = {mu.shape[0]}')
    if mu.shape[1] < 1:
        raise ValueError(f'{name} has no latent dimensions (r = 0)')
    if mu.device != logvar.device:
        raise ValueError(f'{name} and its log-variance are on different devices ({mu.device}, {logvar.device})')
    if not (torch.isfinite(mu).all() and torch.isfinite(logvar).all()):
        raise ValueError(f'{name} or its log-variance has NaN or infinite entries')
    return mu.to(torch.float64), logvar.to(torch.float64)


def _check_heads(heads: Sequence[Head]) -> List[Head]:
    if isinstance(heads, (torch.Tensor, torch.nn.Module)) or not isinstance(heads, Sequence) \
            or not all(isinstance(h, Sequence) and len(h) == 2 for h in heads):
        raise TypeError(f'heads must be a sequence of (mu [L, r], logvar [L, r]) pairs, got {type(heads).__name__}'
                        + (' of ' + ', '.join(sorted({type(h).__name__ for h in heads})) if isinstance(heads, Sequence) else ''))
    if len(heads) == 0:
        raise ValueError('no heads given')
    out = [_check_head(mu, lv, f'head {i} mu') for i, (mu, lv) in enumerate(heads)]
    sizes = {mu.shape[0] for mu, _ in out}
    if len(sizes) > 1:
        raise ValueError(
            f'all heads must describe the same L data points (same rows), got L = {[mu.shape[0] for mu, _ in out]}')
    devices = {mu.device for mu, _ in out}
    if len(devices) > 1:
        raise ValueError(f'all heads must be on one device, got {sorted(map(str, devices))}')
    return out


def _check_samples(n_samples: int) -> int:
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f'n_samples must be an integer >= 1, got {n_samples!r}')
    return int(n_samples)


class _Channel:
    """Per-head constants: centred means, precisions and the [2r+2, L] coefficient matrix."""

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor):
        self.center = mu.mean(0)
        self.mu = mu - self.center  # densities are translation invariant; smaller terms cancel less
        self.logvar = logvar
        self.prec = torch.exp(-logvar)
        self.std = torch.exp(0.5 * logvar)
        r = mu.shape[1]
        const = -0.5 * ((self.mu ** 2 * self.prec).sum(1) + logvar.sum(1) + r * _LOG_2PI)
        # rows: u^2, u, 1, own log-density (subtracted, so blocks hold log-ratios to the own component)
        self.coef = torch.cat([
            -0.5 * self.prec.T, (self.mu * self.prec).T, const[None], -torch.ones_like(const)[None]]).contiguous()
        # the expanded square u^2 prec - 2 u mu prec + mu^2 prec loses about eps * |u|^2 * prec nats to
        # cancellation: fine for the usual posteriors, wrong (then NaN) for near-deterministic ones (logvar
        # around -40 and below), which get the direct (u - mu)^2 prec instead, one latent dimension at a time
        reach = self.mu.abs().amax() + 10 * self.std.amax()
        self.direct = bool(torch.finfo(torch.float64).eps * r * reach ** 2 * self.prec.amax() > 1e-6)
        self.const_direct = -0.5 * (logvar.sum(1) + r * _LOG_2PI)

    def log_ratios(self, feats: torch.Tensor, p0: int, p1: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(u_s|x_i) - log p(u_s|x_s) for samples ``feats`` [S, 2r+2] and points p0..p1: [S, p1 - p0]."""
        if not self.direct:
            return torch.mm(feats, self.coef[:, p0:p1], out=out)
        r = self.mu.shape[1]
        u, own = feats[:, r:2 * r], feats[:, -1]
        out = torch.empty(feats.shape[0], p1 - p0, dtype=feats.dtype, device=feats.device) if out is None else out
        out.copy_((self.const_direct[None, p0:p1] - own[:, None]).expand_as(out))
        for d in range(r):  # [S, P] at a time: [S, P, r] would not fit for large chunks
            diff = u[:, d, None] - self.mu[None, p0:p1, d]
            out.addcmul_(diff.square_(), self.prec[None, p0:p1, d], value=-0.5)
        return out

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Samples u ~ p(u|x_idx) as features [S, 2r+2] and their own log-density [S]."""
        eps = torch.randn(idx.shape[0], self.mu.shape[1], generator=generator, dtype=torch.float64, device=idx.device)
        m, lv = self.mu[idx], self.logvar[idx]
        u = m + self.std[idx] * eps
        # direct difference for the own component: exact, and the numerator of every term
        own = -0.5 * (((u - m) ** 2 * self.prec[idx]).sum(1) + lv.sum(1) + lv.shape[1] * _LOG_2PI)
        feats = torch.cat([u * u, u, torch.ones_like(own)[:, None], own[:, None]], 1)
        return feats, own


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _run(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    # exp of far-away points lands in the subnormal range, where CPU arithmetic is ~100x slower;
    # flushing them to zero changes terms by < 1e-300 relative to the own component (which is 1)
    flushed = torch.set_flush_denormal(True)
    try:
        return _run_chunks(*args)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _run_chunks(
        heads: List[Head],
        channels: List[Tuple[Tuple[int, int], ...]],
        n_samples: int,
        seed: int,
        chunk_samples: int,
        chunk_points: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms of I(X; channel) for channels made of (head, draw) members, all on shared
    samples (one x per sample, draws independent). Returns means [C] and covariance [C, C] of terms."""
    device = heads[0][0].device
    L = heads[0][0].shape[0]
    gen = torch.Generator(device=device).manual_seed(int(seed))
    perm = torch.randperm(L, generator=gen, device=device)
    chans = [_Channel(mu, lv) for mu, lv in heads]
    members = sorted({m for c in channels for m in c})
    C = len(channels)
    log_l = math.log(L)
    total = torch.zeros(C, dtype=torch.float64, device=device)
    outer = torch.zeros(C, C, dtype=torch.float64, device=device)
    shift = None
    multi = [c for c, mem in enumerate(channels) if len(mem) > 1]
    # single-member channels last: their exp runs in place on the member's block, which joints still need
    order = multi + [c for c, mem in enumerate(channels) if len(mem) == 1]
    buf = {}  # preallocated blocks: fresh allocations page-fault and double the cost of the product
    for s0, s1 in _chunks(n_samples, chunk_samples):
        # stratified: sample j sits on point perm[j mod L]
        idx = perm[torch.arange(s0, s1, device=device) % L]
        feats = {m: chans[m[0]].draw(idx, gen)[0] for m in members}
        lse = torch.full((s1 - s0, C), -math.inf, dtype=torch.float64, device=device)
        for p0, p1 in _chunks(L, chunk_points):
            shape = (s1 - s0, p1 - p0)
            blocks = {}
            for m in members + ['work']:
                if m not in buf or buf[m].shape != shape:
                    buf[m] = torch.empty(shape, dtype=torch.float64, device=device)
                blocks[m] = buf[m]
            for m in members:
                # log p(u|x_i) - log p(u|x) for every sample and point of the chunk, in one product
                chans[m[0]].log_ratios(feats[m], p0, p1, out=blocks[m])
            for c in order:
                mem = channels[c]
                if len(mem) == 1:
                    b = blocks[mem[0]]
                else:
                    b = torch.add(blocks[mem[0]], blocks[mem[1]], out=blocks['work'])
                    for m in mem[2:]:
                        b += blocks[m]
                s = b.exp_().sum(1)
                bad = ~torch.isfinite(s)
                s = s.log_()
                if bad.any():
                    # a point far likelier than the sample's own one overflowed exp: redo those rows in log space
                    rows = sum(chans[m[0]].log_ratios(feats[m][bad], p0, p1) for m in mem)
                    s[bad] = torch.logsumexp(rows, 1)
                lse[:, c] = torch.logaddexp(lse[:, c], s)
        t = log_l - lse  # log p(u|x) - log mean_i p(u|x_i): the block holds the ratio to the own term
        if shift is None:
            shift = t.mean(0)  # accumulate shifted moments: no cancellation in the variance
        t = t - shift
        total += t.sum(0)
        outer += t.T @ t
    mean = total / n_samples
    cov = outer / n_samples - mean[:, None] * mean[None]
    if n_samples > 1:
        cov = cov * n_samples / (n_samples - 1)
    return mean + shift, cov


def _estimate(mean: torch.Tensor, cov: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, n: int) -> Estimate:
    var = (grad @ cov @ grad).clamp_min(0) / n
    return Estimate(float(value), float(var.sqrt()))


def mutual_information(
        mu: torch.Tensor,
        logvar: torch.Tensor,
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: int = 2048,
) -> Estimate:
    """I(X;U) in nats between the data point index X (uniform over L rows) and the latent U of a
    diagonal Gaussian channel (eq. 4).

    Args:
        mu, logvar: [L, r] posterior means and log-variances, one row per data point.
        n_samples: Monte Carlo samples S (stratified over the L points).
        seed: seed of the permutation and the noise (same seed, same chunks: same result).
        chunk_samples, chunk_points: block sizes; memory ~ chunk_samples * chunk_points float64.

    Returns:
        Estimate(value, stderr) in nats; 0 <= I <= log L up to Monte Carlo error.
    """
    heads = _check_heads([(mu, logvar)])
    n = _check_samples(n_samples)
    mean, cov = _run(heads, [((0, 0),)], n, seed, chunk_samples, chunk_points)
    return _estimate(mean, cov, torch.ones(1, dtype=torch.float64, device=mean.device), mean[0], n)


def joint_mutual_information(
        heads: Sequence[Head],
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: int = 2048,
) -> Estimate:
    """I(X; U_1, ..., U_n) in nats for the joint channel formed by concatenating the heads'
    parameters (independent noise per head), each head given as (mu [L, r_i], logvar [L, r_i])."""
    heads = _check_heads(heads)
    n = _check_samples(n_samples)
    mean, cov = _run(heads, [tuple((i, 0) for i in range(len(heads)))], n, seed, chunk_samples, chunk_points)
    return _estimate(mean, cov, torch.ones(1, dtype=torch.float64, device=mean.device), mean[0], n)


def _pair_terms(mu_u, logvar_u, mu_v, logvar_v, n_samples, seed, chunk_samples, chunk_points):
    heads = _check_heads([(mu_u, logvar_u), (mu_v, logvar_v)])
    n = _check_samples(n_samples)
    # I(X;U), I(X;V), I(X;U,V), I(X;U,U'), I(X;V,V') on the same samples
    channels = [((0, 0),), ((1, 0),), ((0, 0), (1, 0)), ((0, 0), (0, 1)), ((1, 0), (1, 1))]
    mean, cov = _run(heads, channels, n, seed, chunk_samples, chunk_points)
    return mean, cov, n


def mutual_information_uv(
        mu_u: torch.Tensor,
        logvar_u: torch.Tensor,
        mu_v: torch.Tensor,
        logvar_v: torch.Tensor,
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: int = 2048,
) -> Estimate:
    """I(U;V) = I(X;U) + I(X;V) - I(X;U,V) in nats between two heads' latents over the same L data
    points (eq. 5), on shared samples; stderr from the covariance of the per-sample terms."""
    heads = _check_heads([(mu_u, logvar_u), (mu_v, logvar_v)])
    n = _check_samples(n_samples)
    mean, cov = _run(heads, [((0, 0),), ((1, 0),), ((0, 0), (1, 0))], n, seed, chunk_samples, chunk_points)
    g = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64, device=mean.device)
    return _estimate(mean, cov, g, g @ mean, n)


def mutual_information_uu(
        mu: torch.Tensor,
        logvar: torch.Tensor,
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: int = 2048,
) -> Estimate:
    """I(U;U') = 2 I(X;U) - I(X;U,U') in nats, U' an independent second draw from the same posterior:
    the information the head's channel can share with itself (the NMI normaliser)."""
    heads = _check_heads([(mu, logvar)])
    n = _check_samples(n_samples)
    mean, cov = _run(heads, [((0, 0),), ((0, 0), (0, 1))], n, seed, chunk_samples, chunk_points)
    g = torch.tensor([2.0, -1.0], dtype=torch.float64, device=mean.device)
    return _estimate(mean, cov, g, g @ mean, n)


def _nmi_and_grad(ia, ib, iab, iaa, ibb):
    """NMI = (Ia + Ib - Iab) / sqrt((2Ia - Iaa')(2Ib - Ibb')) and its gradient w.r.t. the five terms."""
    num = ia + ib - iab
    a, b = 2 * ia - iaa, 2 * ib - ibb
    # a head that carries (next to) no information can get I(U;U') <= 0 from Monte Carlo noise: its NMI
    # is undefined, not the huge ratio a clamped denominator would give
    undefined = (a <= 0) | (b <= 0)
    if bool(undefined.any()):
        warnings.warn(
            f'{int(undefined.sum())} head pair(s) have a self-information I(U;U\') <= 0 (a head carrying no '
            'information, within Monte Carlo noise): their NMI is undefined and returned as NaN', RuntimeWarning)
    den = torch.sqrt(torch.where(undefined, torch.ones_like(a), a * b))
    nmi = torch.where(undefined, torch.full_like(num, float('nan')), num / den)
    g_num = torch.stack([torch.ones_like(ia), torch.ones_like(ia), -torch.ones_like(ia), 0 * ia, 0 * ia], -1)
    g_a = torch.stack([2 * torch.ones_like(ia), 0 * ia, 0 * ia, -torch.ones_like(ia), 0 * ia], -1)
    g_b = torch.stack([0 * ia, 2 * torch.ones_like(ia), 0 * ia, 0 * ia, -torch.ones_like(ia)], -1)
    grad = g_num / den[..., None] - 0.5 * nmi[..., None] * (g_a / a[..., None] + g_b / b[..., None])
    return nmi, grad


def normalized_mutual_information(
        mu_u: torch.Tensor,
        logvar_u: torch.Tensor,
        mu_v: torch.Tensor,
        logvar_v: torch.Tensor,
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: int = 2048,
) -> Estimate:
    """NMI(U,V) = I(U;V) / sqrt(I(U;U') I(V;V')) (eq. 6) between two heads over the same L points.

    All five informations come from the same samples; the standard error is the delta method with
    the covariance of their per-sample terms. Unitless; 0 for independent heads, 1 for heads that
    treat the data identically; in the hard-clustering limit it equals scikit-learn's
    ``normalized_mutual_info_score(average_method='geometric')``.
    """
    mean, cov, n = _pair_terms(mu_u, logvar_u, mu_v, logvar_v, n_samples, seed, chunk_samples, chunk_points)
    nmi, grad = _nmi_and_grad(*mean)
    return _estimate(mean, cov, grad, nmi, n)


def nmi_matrix(
        heads: Sequence[Head],
        n_samples: int = 100_000,
        seed: int = 0,
        chunk_samples: int = 256,
        chunk_points: Optional[int] = None,
        max_block_bytes: int = 256 * 2 ** 20,
) -> NMIMatrix:
    """NMI between all pairs of a list of heads (within and across models), on shared samples.

    Each head's [chunk_samples, chunk_points] log-density block is computed once per chunk for two
    independent draws and reused: joint channels are sums of blocks, so K heads cost 2K matrix
    products and K(K-1)/2 block additions per chunk instead of recomputing anything.

    Args:
        heads: K pairs (mu [L, r_k], logvar [L, r_k]) over the same L data points (r_k may differ).
        n_samples: Monte Carlo samples, shared by all heads.
        chunk_points: points per block; default: the largest with 2K blocks in ``max_block_bytes``.

    Returns:
        :class:`NMIMatrix` ([K, K] NMI and I(U;V) in nats, [K] I(X;U) in nats, with stderrs).
    """
    heads = _check_heads(heads)
    n = _check_samples(n_samples)
    K = len(heads)
    L = heads[0][0].shape[0]
    if chunk_points is None:
        chunk_points = max(64, min(L, max_block_bytes // (8 * chunk_samples * 2 * K)))
    single = [((k, 0),) for k in range(K)]
    selfs = [((k, 0), (k, 1)) for k in range(K)]
    pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
    joint = [((a, 0), (b, 0)) for a, b in pairs]
    mean, cov = _run(heads, single + selfs + joint, n, seed, chunk_samples, chunk_points)
    dev = mean.device
    info, info_var = mean[:K], cov.diagonal()[:K] / n
    # I(U;U') = 2 I(X;U) - I(X;U,U')
    g_self = torch.zeros(K, 2 * K + len(pairs), dtype=torch.float64, device=dev)
    g_self[torch.arange(K), torch.arange(K)] = 2.0
    g_self[torch.arange(K), K + torch.arange(K)] = -1.0
    mi = torch.zeros(K, K, dtype=torch.float64, device=dev)
    mi_se = torch.zeros(K, K, dtype=torch.float64, device=dev)
    nmi = torch.eye(K, dtype=torch.float64, device=dev)
    nmi_se = torch.zeros(K, K, dtype=torch.float64, device=dev)
    ar = torch.arange(K, device=dev)
    mi[ar, ar] = g_self @ mean
    mi_se[ar, ar] = ((g_self @ cov * g_self).sum(1).clamp_min(0) / n).sqrt()
    if pairs:
        a = torch.tensor([p[0] for p in pairs], device=dev)
        b = torch.tensor([p[1] for p in pairs], device=dev)
        j = 2 * K + torch.arange(len(pairs), device=dev)
        sel = torch.stack([a, b, j, K + a, K + b], 1)  # [P, 5] term indices
        terms = mean[sel]
        sub_cov = cov[sel[:, :, None], sel[:, None, :]]  # [P, 5, 5]
        g_mi = torch.tensor([1.0, 1.0, -1.0, 0.0, 0.0], dtype=torch.float64, device=dev)
        mi_ab = terms @ g_mi
        mi_ab_se = (torch.einsum('i,pij,j->p', g_mi, sub_cov, g_mi).clamp_min(0) / n).sqrt()
        v, grad = _nmi_and_grad(*terms.unbind(1))
        v_se = (torch.einsum('pi,pij,pj->p', grad, sub_cov, grad).clamp_min(0) / n).sqrt()
        for dst, src in ((mi, mi_ab), (mi_se, mi_ab_se), (nmi, v), (nmi_se, v_se)):
            dst[a, b] = src
            dst[b, a] = src
    return NMIMatrix(nmi, nmi_se, mi, mi_se, info, info_var.clamp_min(0).sqrt())


def log_density_matrix(u: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(u_s; mu_i, diag exp(logvar_i)) in nats for all samples s and points i: [S, L] (float64),
    as one matrix product of [u^2, u, 1] with per-point coefficients. Unchunked: for inspection."""
    mu, logvar = _check_head(mu, logvar)
    u = torch.as_tensor(u).to(torch.float64)
    if u.ndim != 2 or u.shape[1] != mu.shape[1]:
        raise ValueError(f'u must be [S, {mu.shape[1]}], got shape {tuple(u.shape)}')
    ch = _Channel(mu, logvar)
    u = u - ch.center
    feats = torch.cat([u * u, u, torch.ones_like(u[:, :1])], 1)
    return feats @ ch.coef[:-1]
