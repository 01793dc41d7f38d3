"""Speed of keras_vib against timm_vib, same weights, one run: Keras on the torch backend / timm and
Keras on JAX (jit) / timm, for inference and for a training step.

vit_tiny_vib_b4 at 224 px (ViT-Tiny/16, 36 bottlenecked heads with the paper's MLP encoders / decoders),
converted with keras_vib.from_timm. Median wall time over --repeats. Inference: a forward pass without
gradients (timm under torch.inference_mode, Keras torch-backend the same, Keras JAX predict_on_batch,
jit-compiled). Training step: forward, CE + beta * mean KL, backward, AdamW update (timm: a plain torch
loop; Keras: train_on_batch after compile). timm and Keras-torch are interleaved in this process so load
from other jobs hits both alike; Keras-JAX runs in a subprocess (one backend per process) between two
timm measurements, and its ratio uses their mean. Target: Keras (torch) <= 1.15x timm.

    python benchmarks/keras_vs_timm.py [--batch-size 8] [--repeats 7] [--image-size 224] [--threads N] [--no-jax]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == '__main__' and '--jax-worker' not in sys.argv:
    os.environ['KERAS_BACKEND'] = 'torch'  # this process compares on the torch backend

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_worker(folder: str, batch_size: int, image_size: int, repeats: int) -> None:
    """In a KERAS_BACKEND=jax process: time predict_on_batch and train_on_batch, print JSON."""
    import keras_vib
    import keras
    import numpy as np
    assert keras.backend.backend() == 'jax'
    km = keras_vib.from_timm(folder)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, image_size, image_size, 3)).astype('float32')
    y = rng.integers(0, km.num_classes, batch_size).astype('int32')
    km.predict_on_batch(x)  # compiles
    infer = _median_time(lambda: np.asarray(km.predict_on_batch(x)), repeats)
    km.compile(keras_vib.paper_optimizer(km, 1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    km.train_on_batch(x, y)  # compiles
    train = _median_time(lambda: float(km.train_on_batch(x, y)), max(repeats // 2, 3))
    print(json.dumps({'infer': infer, 'train': train}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_tiny_vib_b4')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--no-jax', action='store_true', help='skip the JAX measurement')
    args = p.parse_args(argv)

    import keras_vib
    import keras
    import numpy as np
    import timm
    import torch
    from timm.optim import create_optimizer_v2
    import timm_vib
    from timm_vib.checkpoints import save_model
    if keras.backend.backend() != 'torch':
        raise SystemExit(f'run this benchmark with KERAS_BACKEND unset or torch, not {keras.backend.backend()}')
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tm = timm.create_model(args.model, img_size=args.image_size).eval()
    with torch.no_grad():  # timm starts the classifier at zero: give the logits something to compare
        tm.head.weight.normal_(0, 0.02)
    km = keras_vib.from_timm(tm)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    xk = x.permute(0, 2, 3, 1).contiguous()
    y = torch.randint(0, tm.num_classes, (args.batch_size,))

    def timm_infer():
        with torch.inference_mode():
            return tm(x)

    def keras_infer():
        with torch.inference_mode():
            return km(xk, training=False)

    with torch.inference_mode():
        ref = timm_infer().numpy()
        err = np.abs(keras.ops.convert_to_numpy(keras_infer()) - ref).max() / np.abs(ref).max()

    # training steps: the same loss and optimizer on both sides
    opt = create_optimizer_v2(tm, 'adamw', lr=1e-4, weight_decay=0.05)  # paper_optimizer's twin

    def timm_train():
        tm.train()
        logits, kl = tm(x, return_kl=True)
        loss = torch.nn.functional.cross_entropy(logits, y) + tm.beta * timm_vib.information_loss(kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    km.compile(keras_vib.paper_optimizer(km, 1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    yk = y.numpy().astype('int32')

    def keras_train():
        return float(km.train_on_batch(xk, yk))

    times = {k: [] for k in ('timm', 'keras', 'timm_train', 'keras_train')}
    for f in (timm_infer, keras_infer, timm_train, keras_train):  # warm-up
        f()
    for _ in range(args.repeats):
        for name, f in (('timm', timm_infer), ('keras', keras_infer)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    for _ in range(max(args.repeats // 2, 3)):
        for name, f in (('timm_train', timm_train), ('keras_train', keras_train)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {'keras_torch_infer': med['keras'] / med['timm'], 'keras_torch_train': med['keras_train'] / med['timm_train']}

    if not args.no_jax:
        with tempfile.TemporaryDirectory() as tmp:
            tm.eval()
            save_model(tm, tmp, model_args=dict(img_size=args.image_size))
            env = {**os.environ, 'KERAS_BACKEND': 'jax', 'PYTHONPATH': os.pathsep.join(
                [str(ROOT)] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else []))}
            r = subprocess.run([sys.executable, __file__, '--jax-worker', tmp, str(args.batch_size),
                                str(args.image_size), str(args.repeats)], env=env, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f'the JAX measurement failed:\n{r.stderr[-3000:]}')
            jax_med = json.loads(r.stdout.strip().splitlines()[-1])
        timm_after = _median_time(timm_infer, args.repeats)
        timm_train_after = _median_time(timm_train, max(args.repeats // 2, 3))
        ratios['keras_jax_infer'] = jax_med['infer'] / ((med['timm'] + timm_after) / 2)
        ratios['keras_jax_train'] = jax_med['train'] / ((med['timm_train'] + timm_train_after) / 2)
        med.update(jax=jax_med['infer'], jax_train=jax_med['train'], timm_after=timm_after,
                   timm_train_after=timm_train_after)

    print(f"{args.model} {args.image_size}px batch {args.batch_size}, {torch.get_num_threads()} torch threads, "
          f"{args.repeats} repeats; max |logit diff| keras-torch vs timm {err:.1e} of the largest logit")
    print(f"inference: timm {med['timm'] * 1e3:.1f} ms, keras-torch {med['keras'] * 1e3:.1f} ms -> "
          f"{ratios['keras_torch_infer']:.2f}x (target <= 1.15x)")
    print(f"train step: timm {med['timm_train'] * 1e3:.1f} ms, keras-torch {med['keras_train'] * 1e3:.1f} ms -> "
          f"{ratios['keras_torch_train']:.2f}x")
    if 'jax' in med:
        print(f"JAX (jit): inference {med['jax'] * 1e3:.1f} ms -> {ratios['keras_jax_infer']:.2f}x timm "
              f"(timm {med['timm_after'] * 1e3:.1f} ms after it); train step {med['jax_train'] * 1e3:.1f} ms -> "
              f"{ratios['keras_jax_train']:.2f}x timm")
    return dict(median_s=med, ratios=ratios)


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--jax-worker':
        jax_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
