"""Images per second of the training loader, per worker, against the model's training throughput.

Writes an ImageNet-style folder of JPEGs with ImageNet-like sizes (sides drawn from 300-500 px, the
bulk of ImageNet's; quality 90), then reads it through ``timm_vib.data.create_loaders`` with the
paper's augmentation (RandomResizedCrop 0.08-1, flip, RandAugment m9 n2, 224 px) for each number of
workers. The model's rate is a forward + backward + AdamW step of ``--model`` on ``--device`` (bf16
autocast on a GPU) at ``--model-batch-size``. Printed: images/s per worker count, images/s per worker,
and the workers needed to keep the model fed (model rate / per-worker rate).

On an H100 machine with 16 cores (2026-11-24, docs/gpu.md): vit_tiny_vib_b1 trains at 2,735 images/s
(batch 256, eager bf16), a worker delivers 140-180 images/s in steady state, so 15-20 workers keep it fed.

    python benchmarks/data_throughput.py [--images 768] [--workers 0,1,2] [--device cpu|cuda] [--model-rate N]
                                         [--model-batch-size N]

``--model-rate`` replaces the measured model rate (e.g. a GPU's, measured elsewhere).
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import timm
import timm_vib  # noqa: F401  (registers the models)
from timm_vib.data import create_loaders
from train_step import make_train_step


def write_folder(root: Path, images: int, classes: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (('train', images), ('val', classes)):
        for i in range(n):
            c = root / split / f'n{i % classes:08d}'
            c.mkdir(parents=True, exist_ok=True)
            w, h = rng.integers(300, 501, 2)
            # smooth noise compresses like a photograph, not like white noise
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((int(w), int(h)), Image.BICUBIC)
            img.save(c / f'{i:06d}.JPEG', quality=90)


def loader_rate(folder: Path, workers: int, batch_size: int, batches: int) -> float:
    """Steady-state images/s: the batches the workers prepared while starting (prefetch_factor, 2, per
    worker) are taken untimed first, and at least 3 batches per worker are timed: with fewer, the timed
    batches are ones the workers had started before the clock did (measured 3,500 images/s from 14
    workers this way where 4 gave 700)."""
    loader, _, _ = create_loaders(str(folder), 224, batch_size, num_workers=workers)
    warm, batches = 1 + 2 * workers, max(batches, 3 * workers)
    if len(loader) < warm + batches:
        raise ValueError(f'{workers} worker(s) need {warm + batches} batches of {batch_size} in one epoch, the '
                         f'folder has {len(loader)}: pass --images {(warm + batches) * batch_size} or more')
    it = iter(loader)
    for _ in range(warm):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def model_rate(name: str, batch_size: int, device: torch.device, steps: int = 5) -> float:
    model = timm.create_model(name, num_classes=100).to(device).train()
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 100, (batch_size,), device=device)
    step = make_train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), 'bf16' if device.type == 'cuda' else 'no')
    step(x, y)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--images', type=int, default=768, help='JPEGs in the generated training folder')
    p.add_argument('--workers', default='0,1,2', help='comma-separated loader worker counts')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--batches', type=int, default=6, help='batches timed per worker count')
    p.add_argument('--model', default='vit_tiny_vib_b1')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--model-rate', type=float, default=None, help='images/s of the model (skips measuring it)')
    p.add_argument('--threads', type=int, default=1, help='torch threads of the main process (0: default)')
    p.add_argument('--model-batch-size', type=int, default=None,
                   help='batch of the model-rate step (default --batch-size; a GPU needs a larger one to be busy)')
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_folder(Path(tmp), a.images)
        print(f'{a.images} JPEGs (300-500 px sides) written in {time.perf_counter() - t0:.0f} s')
        rates = {}
        for w in (int(v) for v in a.workers.split(',')):
            rates[w] = loader_rate(Path(tmp), w, a.batch_size, a.batches)
            per = rates[w] / max(w, 1)
            print(f'{w} worker(s): {rates[w]:.0f} images/s ({per:.0f} per {"worker" if w else "main process"})')
    per_worker = max(r / max(w, 1) for w, r in rates.items())
    mb = a.model_batch_size or a.batch_size
    mr = a.model_rate or model_rate(a.model, mb, torch.device(a.device))
    src = 'given' if a.model_rate else f'measured on {a.device}, bf16 autocast on a GPU'
    print(f'{a.model} training step at 224 px, batch {mb}: {mr:.0f} images/s ({src})')
    print(f'loader: {per_worker:.0f} images/s per worker -> {math.ceil(mr / per_worker)} worker(s) keep the model fed '
          f'(model / per-worker rate = {mr / per_worker:.2f})')


if __name__ == '__main__':
    main()
