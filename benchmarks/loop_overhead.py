"""Cost of the trainer around the model: ``timm_vib.training.train`` against a bare loop.

Both read the same batches from the same loaders (``timm_vib.data.create_loaders``, same seed) and
train the same tiny model (forward, CE + beta * KL, backward, AdamW step); the trainer adds
Accelerate's wrappers, the lr and beta schedules, the metric sums on the device and the progress
bookkeeping. Printed: samples/s of each and their ratio (target: bare / trainer <= 1.05 on CPU). The
trainer's time is its own ``train_seconds`` (training only, not validation or checkpoints); the bare
loop is timed over the same epochs. Runs alternate, best of ``--repeats`` each. ``--mixed-precision`` runs both
under the same autocast. On an H100 (2026-11-24): 1.03x in bf16, 1.01x in float32 (docs/gpu.md).

    python benchmarks/loop_overhead.py [--samples 1024] [--epochs 2] [--repeats 3] [--threads 1] [--cpu]
                                       [--mixed-precision no|bf16|fp16]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import timm
from timm.optim import create_optimizer_v2
from timm_vib.data import create_loaders
from timm_vib.training import parse_args, train
from train_step import make_train_step

KWARGS = dict(depth=2, img_size=16, patch_size=4, embed_dim=48, num_heads=3)


def trainer_rate(a: argparse.Namespace, folder: Path) -> float:
    argv = ['--model', a.model, '--model-kwargs', *(f'{k}={v}' for k, v in KWARGS.items()),
            '--batch-size', str(a.batch_size), '--epochs', str(a.epochs), '--max-train-samples', str(a.samples),
            '--max-val-samples', '32', '--warmup-epochs', '1', '--no-progress', '--output', str(folder),
            '--mixed-precision', a.mixed_precision]
    if a.cpu:
        argv.append('--cpu')
    s = json.loads((train(parse_args(argv)) / 'summary.json').read_text())
    return s['train_samples_per_second']


def bare_rate(a: argparse.Namespace, device: torch.device) -> float:
    train_loader, _, spec = create_loaders('digits', KWARGS['img_size'], a.batch_size, seed=0,
                                           max_train_samples=a.samples, max_val_samples=32)
    torch.manual_seed(0)
    model = timm.create_model(a.model, num_classes=spec.num_classes, **KWARGS).to(device)
    opt = create_optimizer_v2(model, 'adamw', lr=6e-4, weight_decay=0.05)
    step = make_train_step(model, opt, a.mixed_precision)
    model.train()
    n, t = 0, 0.0
    for epoch in range(a.epochs):
        train_loader.dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            step(x, y)
            n += x.shape[0]
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t += time.perf_counter() - t0
    return n / t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_tiny_vib_b1')
    p.add_argument('--samples', type=int, default=1024, help='training images per epoch')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (0: torch default)')
    p.add_argument('--cpu', action='store_true', help='on the CPU even if a GPU is present')
    p.add_argument('--mixed-precision', choices=('no', 'bf16', 'fp16'), default='no',
                   help="both loops' autocast (the trainer's flag of that name)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device('cuda' if torch.cuda.is_available() and not a.cpu else 'cpu')
    trainer, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            bare.append(bare_rate(a, device))
            trainer.append(trainer_rate(a, Path(tmp) / f'run{i}'))
            print(f'repeat {i + 1}: bare {bare[-1]:.0f} samples/s, trainer {trainer[-1]:.0f} samples/s')
    b, t = max(bare), max(trainer)
    print(f'{a.model} {KWARGS} batch {a.batch_size} on {device}, mixed precision {a.mixed_precision}, '
          f'{a.threads or torch.get_num_threads()} thread(s)')
    print(f'bare loop {b:.0f} samples/s | trainer {t:.0f} samples/s | bare / trainer = {b / t:.3f}x (target <= 1.05x)')


if __name__ == '__main__':
    main()
