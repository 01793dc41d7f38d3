"""Cost of the bottlenecks: vit_tiny_vib_b4 against vit_tiny_gap (same size, same run).

Median training-step (forward + backward + AdamW step, loss CE + beta * KL) and inference time at
224 px, batch 32, printed as ratios for both bottleneck layouts: linear encoders / decoders
(vib_hidden=0; target <= 1.05x) and the paper's MLPs of 64 (the registered default; target <= 1.10x
for training). Runs on GPU too when one exists.

Measured on a 2-core CPU (2026-11-23, median of 5): training 1.13x (linear) and 1.30x (MLPs of 64), inference
1.03x and 1.16x; one thread, 1.23x for the MLPs. The training targets are not met there. The matrix products are
the ViT's plus 3 % (folded) plus the MLPs' inner per-head products (hidden -> 2r, r -> hidden), which cannot
fold. The benchmark times the MLPs' unfoldable work alone on the model's shapes (those inner products, their
GELUs and the noise draw; 2026-11-24, median of 7, in a run where the MLPs took 1.28x): 1.09x, a lower bound
for any implementation. The other 0.19x are elementwise passes over [batch, heads, tokens, 64] (the biases, the sampling's arithmetic, the
clamp, the KL, their gradients, and the copies around the per-head products), which cost on a CPU what they
do not cost in FLOPs. One batched product with the bias in it (``torch.baddbmm`` over image x head pairs
instead of the einsum) saves 0.04x here and nothing at the demo's scale (``--scale demo``, where the step is
dispatch-bound); not adopted, as it would change the rounding the demo's tables were measured with.

Measured on an H100 (2026-11-24, torch 2.11, median of 20; docs/gpu.md): the targets are not met there either.
bf16 autocast (``--amp bf16``), batch 256: training 1.96x (linear) and 2.29x (MLPs), inference 1.20x and 1.44x.
float32, batch 256: training 1.10x and 1.70x. The eager step is bound by kernel launches at this size (batch 32
costs what 256 does), and the bottleneck doubles the kernels (932 for the ViT, 1,881 linear, 2,270 MLPs);
under torch.compile the MLPs still cost 1.93x.

``--scale demo`` measures the demo's models instead (16 px digits in 2x2 patches, depth 4, width 48,
heads of 16, vib_dim 8, MLPs of 64, batch 64): there the hidden layer is 4x a head, folding it into the
projections would widen the attention, and the models run the explicit path by default; both paths are
printed (``attn.fold_projections``).

    python benchmarks/overhead.py [--scale tiny|demo] [--batch-size 32] [--repeats 10] [--device cpu|cuda]
                                  [--amp no|bf16|fp16]
"""
import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_vib  # noqa: F401  (registers the models)
from train_step import AMP, autocast, make_train_step


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def train_step_time(model, x, y, amp='no'):
    step = make_train_step(model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4), amp)
    return lambda: step(x, y)


def infer_time(model, x, device, amp='no'):
    model.eval()

    @torch.no_grad()
    def step():
        with autocast(device, amp):
            model(x)
    return step


def mlp_floor(model, x, amp='no'):
    """The work the MLP bottlenecks cannot fold away, timed alone on the model's shapes: for each layer the
    two inner per-head products (hidden -> 2r and r -> hidden, forward and backward, weight gradients
    included), their two GELUs, and the noise draw. A lower bound on what the bottlenecks add to a
    training step, whatever else (biases, sampling, KL, copies) an implementation does."""
    vib = model.blocks[0].attn.vib
    B, N, depth = x.shape[0], model.patch_embed.num_patches, len(model.blocks)
    H, r, h = vib.num_heads, vib.vib_dim, vib.vib_hidden
    kw = dict(device=x.device, requires_grad=True)
    a, w1 = torch.randn(B, H, N, h, **kw), torch.randn(H, h, 2 * r, **kw)
    zz, w2 = torch.randn(B, H, N, r, **kw), torch.randn(H, r, h, **kw)
    g1, g2 = torch.randn(B, H, N, 2 * r, device=x.device), torch.randn(B, H, N, h, device=x.device)

    def step():
        for _ in range(depth):
            with autocast(x.device, amp):
                stats = torch.matmul(F.gelu(a), w1)  # the fastest of einsum, matmul and baddbmm here
                hidden = F.gelu(torch.matmul(zz, w2))
                torch.randn(B, H, N, r, device=x.device)
            torch.autograd.backward([stats, hidden], [g1.to(stats.dtype), g2.to(hidden.dtype)])
    return step


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--scale', choices=('tiny', 'demo'), default='tiny')
    p.add_argument('--amp', choices=tuple(AMP), default='no', help='autocast dtype (fp16 with a GradScaler)')
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.scale == 'tiny':
        size, chans, kw = 224, 3, {}
        variants = {'vib_hidden=0': dict(vib_hidden=0), 'vib_hidden=64': dict(vib_hidden=64)}
    else:
        size, chans = 16, 1
        kw = dict(img_size=16, patch_size=2, in_chans=1, num_classes=10, depth=4, embed_dim=48, num_heads=3)
        variants = {'explicit': dict(vib_dim=8, vib_hidden=64), 'folded': dict(vib_dim=8, vib_hidden=64, fold=True)}
    x = torch.randn(args.batch_size, chans, size, size, device=device)
    y = torch.randint(0, kw.get('num_classes', 100), (args.batch_size,), device=device)
    models = {}
    for name, v in variants.items():
        v = dict(v)
        fold = v.pop('fold', None)
        models[name] = m = timm.create_model('vit_tiny_vib_b4', **kw, **v).to(device)
        if fold is not None:  # else the layers' own choice
            for blk in m.blocks:
                blk.attn.fold_projections = fold
        print(f'{name}: folded projections {m.blocks[0].attn.can_fold}')
    models['gap'] = timm.create_model('vit_tiny_gap', **kw).to(device)
    results = {}
    for kind, make in (('train step', lambda m: train_step_time(m, x, y, args.amp)),
                       ('inference', lambda m: infer_time(m, x, device, args.amp))):
        fns = {n: make(m) for n, m in models.items()}
        if kind == 'train step':
            mlp = next(n for n, m in models.items() if m.vib_hidden)  # the variants share one MLP shape
            fns[f'{mlp} floor'] = mlp_floor(models[mlp], x, args.amp)
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        times = {n: [] for n in fns}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            for n, fn in fns.items():
                times[n].append(timed(fn, device))
        results[kind] = {n: statistics.median(t) for n, t in times.items()}
    print(f'device {device}, batch {args.batch_size}, {size} px, amp {args.amp}, {torch.get_num_threads()} threads, '
          f'median of {args.repeats}')
    for kind, r in results.items():
        gap = r['gap']
        for name in variants:
            print(f'{kind:>10}: vit_tiny_vib_b4 {name:<13} {r[name] * 1e3:8.1f} ms   vit_tiny_gap {gap * 1e3:8.1f} ms   '
                  f'ratio {r[name] / gap:.3f}x')
            if f'{name} floor' in r:
                floor = r[f'{name} floor']
                print(f'{"":>10}  the MLPs\' unfoldable work alone {floor * 1e3:8.1f} ms: no implementation of '
                      f'them goes below {1 + floor / gap:.3f}x')


if __name__ == '__main__':
    main()
