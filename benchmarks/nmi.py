"""Speed of the Monte Carlo mutual-information estimator (timm_vib.estimators.mutual_information).

Log-density evaluations per second (one evaluation = one sample against one data point over r dims,
including the log-sum-exp) for S samples x L points x r dims, in the same run:
  * the estimator (float64 matrix product [u^2, u, 1, own] x per-point coefficients, chunked);
  * a direct-difference implementation (((u - m)^2 / s^2).sum(-1), chunked, float64, same maths);
  * the machine's float64 matrix-product rate, measured here; the estimator's rate is reported as a
    fraction of it counting 2 (2r + 2) flops per evaluation (the product it issues).
Targets: >= 30x the direct implementation and >= 50% of the measured float64 matmul rate.

    python benchmarks/nmi.py [--samples 16384] [--points 8192] [--dims 32] [--threads N]
"""
import argparse
import math
import time

import torch

from timm_vib.estimators import mutual_information


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def direct_mi(mu, logvar, n_samples, seed=0, chunk_samples=256, chunk_points=1024):
    """Reference: same estimator with the log-density computed by direct differences."""
    L, r = mu.shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(L, generator=g)[torch.arange(n_samples) % L]
    var = logvar.exp()
    norm = -0.5 * (logvar.sum(1) + r * math.log(2 * math.pi))
    terms = []
    for s0 in range(0, n_samples, chunk_samples):
        i = idx[s0:s0 + chunk_samples]
        u = mu[i] + var[i].sqrt() * torch.randn(len(i), r, generator=g, dtype=mu.dtype)
        own = -0.5 * ((u - mu[i]) ** 2 / var[i]).sum(1) + norm[i]
        lse = torch.full((len(i),), -math.inf, dtype=mu.dtype)
        for p0 in range(0, L, chunk_points):
            d = -0.5 * ((u[:, None, :] - mu[None, p0:p0 + chunk_points]) ** 2 / var[None, p0:p0 + chunk_points]).sum(-1)
            lse = torch.logaddexp(lse, (d + norm[None, p0:p0 + chunk_points]).logsumexp(1))
        terms.append(own - lse + math.log(L))
    t = torch.cat(terms)
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


def matmul_rate(n=1024, repeats=5):
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    t, _ = best_of(lambda: a @ b, repeats)
    return 2 * n ** 3 / t


def shaped_matmul_rate(k, m=1024, n=4096, repeats=5):
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    out = torch.empty(m, n, dtype=torch.float64)
    t, _ = best_of(lambda: torch.mm(a, b, out=out), repeats)
    return 2 * m * n * k / t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--samples', type=int, default=16384)
    ap.add_argument('--points', type=int, default=8192)
    ap.add_argument('--dims', type=int, default=32)
    ap.add_argument('--direct-samples', type=int, default=1024, help='samples for the (slow) direct reference')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    S, L, r = args.samples, args.points, args.dims
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(L, r, generator=g, dtype=torch.float64)
    logvar = torch.rand(L, r, generator=g, dtype=torch.float64) * 4 - 3  # variances e^-3..e^1 around unit-scale means (well separated in 32 dims: I near log L)

    t_fast, est = best_of(lambda: mutual_information(mu, logvar, n_samples=S, seed=0), args.repeats)
    t_direct, ref = best_of(lambda: direct_mi(mu, logvar, args.direct_samples), args.repeats)
    fast_rate = S * L / t_fast
    direct_rate = args.direct_samples * L / t_direct
    peak = matmul_rate()
    shaped = shaped_matmul_rate(2 * r + 2)
    flops = 2 * (2 * r + 2)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, S={S} L={L} r={r} (float64)')
    print(f'estimator : {fast_rate:.3e} evals/s  ({t_fast:.3f} s)  I = {est.value:.4f} +- {est.stderr:.4f} nats')
    print(f'direct    : {direct_rate:.3e} evals/s  ({t_direct:.3f} s for S={args.direct_samples})'
          f'  I = {ref[0]:.4f} +- {ref[1]:.4f} nats')
    print(f'matmul    : {peak / 1e9:.2f} GFLOP/s float64 (1024^3), {shaped / 1e9:.2f} GFLOP/s at inner size {2 * r + 2}')
    print(f'speed-up over direct             : {fast_rate / direct_rate:.1f}x   (target >= 30x)')
    print(f'fraction of measured matmul rate : {fast_rate * flops / peak:.1%} of 1024^3 GEMM, '
          f'{fast_rate * flops / shaped:.1%} of same-shape GEMM   (target >= 50%)')


if __name__ == '__main__':
    main()
