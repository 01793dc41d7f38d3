"""Inference time of keras_vib (torch backend) against timm_vib, same weights, same run.

vit_tiny_vib_b4 at 224 px (ViT-Tiny/16, 36 bottlenecked heads), converted with keras_vib.from_timm;
median wall time of a forward pass in inference mode (no grad) for each, interleaved so that
load from other processes hits both alike. Target: Keras within 1.5x of timm.

    python benchmarks/keras_vs_timm.py [--batch-size 8] [--repeats 7] [--image-size 224] [--threads N]
"""
import argparse
import os
import statistics
import time

os.environ.setdefault('KERAS_BACKEND', 'torch')  # the comparison is on the torch backend

import keras_vib  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import timm_vib  # noqa: E402,F401


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_tiny_vib_b4')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=None)
    args = p.parse_args(argv)
    if keras.backend.backend() != 'torch':
        raise SystemExit(f'this benchmark compares on the torch backend, not {keras.backend.backend()}')
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tm = timm.create_model(args.model, img_size=args.image_size).eval()
    km = keras_vib.from_timm(tm)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    xk = x.permute(0, 2, 3, 1).contiguous()

    def run_timm():
        with torch.inference_mode():
            return tm(x)

    def run_keras():
        with torch.inference_mode():
            return km(xk, training=False)

    with torch.inference_mode():
        err = (keras.ops.convert_to_numpy(run_keras()) - run_timm().numpy())
    times = {'timm': [], 'keras': []}
    for f in (run_timm, run_keras):  # warm-up
        f()
    for _ in range(args.repeats):
        for name, f in (('timm', run_timm), ('keras', run_keras)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med['keras'] / med['timm']
    print(f"{args.model} {args.image_size}px batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats: timm {med['timm'] * 1e3:.1f} ms, keras {med['keras'] * 1e3:.1f} ms, "
          f"ratio {ratio:.2f}x (target <= 1.5x); max |logit diff| {np.abs(err).max():.2e}")
    return dict(median_s=med, ratio=ratio)


if __name__ == '__main__':
    main()
