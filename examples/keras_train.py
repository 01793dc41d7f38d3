"""Train a keras_vib model with model.fit (CE + beta * mean KL) and report accuracy and information.

The paper's recipe, as the timm_vib trainer: AdamW (weight decay 0.05, none on biases, 1-D and bottleneck
weights), cosine learning-rate decay after a linear warm-up, beta ramped up over the first 10% of the
epochs (per update); at the end the KL per head (nats per patch, mean over the validation images).

Default: scikit-learn's digits (8x8 grey images upsampled to 16x16, patch 4 -> 16 tokens), a small
bottlenecked ViT, a few epochs on CPU; the torch backend is chosen by keras_vib unless
KERAS_BACKEND is set.

    python examples/keras_train.py --beta 0.01 --epochs 10
    python examples/keras_train.py --model vit_tiny_noattn
    python examples/keras_train.py --from-timm path/to/timm_folder   # fine-tune converted timm weights

For the full ViT-Tiny (224 px, 3 channels) pass --model vit_tiny_vib_b4 --image-size 224 --patch-size 16
--embed-dim 192 --depth 12 --num-heads 3 with your own data pipeline in place of load_digits.
"""
import argparse
import time

import keras_vib  # before keras: picks the backend default

import keras
import numpy as np

ACTIVE_KL = 1e-2  # nats: a head is active if it sends more than this to at least one validation patch (paper)


def load_digits(size: int = 16, seed: int = 0, val_fraction: float = 0.2):
    """Digits as channels-last float32 images [N, size, size, 1] in about [-1, 1], split train / val."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = d.images.astype('float32') / 8.0 - 1.0  # 0..16 -> -1..1
    f = size // 8
    x = np.kron(x, np.ones((1, f, f), 'float32'))[..., None]  # nearest-neighbour upsampling
    y = d.target.astype('int32')
    idx = np.random.default_rng(seed).permutation(len(x))
    n_val = int(len(x) * val_fraction)
    return (x[idx[n_val:]], y[idx[n_val:]]), (x[idx[:n_val]], y[idx[:n_val]])


def build(args) -> keras_vib.VisionTransformerVIB:
    kw = dict(image_size=args.image_size, patch_size=args.patch_size, in_chans=1, num_classes=10,
              embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, seed=args.seed)
    if args.model.startswith('vit_tiny_vib'):
        kw['vib_dim'] = args.vib_dim
    if args.model == 'vit_tiny_vib':
        kw['beta'] = args.beta
    return keras_vib.create_model(args.model, **kw)


def train(args) -> dict:
    keras.utils.set_random_seed(args.seed)
    (xt, yt), (xv, yv) = load_digits(args.image_size, args.seed)
    model = keras_vib.from_timm(args.from_timm) if args.from_timm else build(args)
    steps_per_epoch = -(-len(xt) // args.batch_size)
    total = steps_per_epoch * args.epochs
    schedule = keras_vib.cosine_schedule(args.lr, total, round(args.warmup_epochs * steps_per_epoch), args.min_lr)
    model.compile(optimizer=keras_vib.paper_optimizer(model, schedule, weight_decay=args.weight_decay),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=['accuracy'])
    callbacks = []
    if model.attn_mode == 'vib':
        beta_warmup_epochs = 0.1 * args.epochs if args.beta_warmup_epochs is None else args.beta_warmup_epochs
        callbacks.append(keras_vib.BetaWarmup(round(beta_warmup_epochs * steps_per_epoch), schedule=args.beta_schedule))
    t0 = time.perf_counter()
    hist = model.fit(xt, yt, batch_size=args.batch_size, epochs=args.epochs, validation_data=(xv, yv),
                     callbacks=callbacks, verbose=args.verbose)
    seconds = time.perf_counter() - t0
    _, acc = model.evaluate(xv, yv, verbose=0)
    result = dict(model=model.name, beta=model.beta, val_accuracy=float(acc), loss=hist.history['loss'],
                  seconds=seconds)
    if model.attn_mode != 'plain':
        kl = keras_vib.kl_and_latents(model, xv, batch_size=256)['kl']  # [B, depth, heads, tokens] nats
        result['mean_kl'] = float(kl.mean())
        result['nats_per_image'] = float(kl.sum((1, 2, 3)).mean())
        result['head_kl'] = kl.mean((0, 3))  # [depth, heads], nats per patch
        result['active'] = kl.max(axis=(0, 3)) > ACTIVE_KL
        result['active_heads'] = int(result['active'].sum())
    return result


def print_head_kl(head_kl: np.ndarray, active: np.ndarray) -> None:
    """Layers x heads table of the mean KL per patch (nats); * marks an active head (> 0.01 nats on some patch)."""
    print('KL per head (nats per patch, * active):')
    print('layer ' + ''.join(f'{"head " + str(h):>11}' for h in range(head_kl.shape[1])))
    for layer, (row, act) in enumerate(zip(head_kl, active)):
        print(f'{layer:>5} ' + ''.join(f'{v:>10.4f}{"*" if a else " "}' for v, a in zip(row, act)))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_tiny_vib', choices=keras_vib.MODEL_NAMES)
    p.add_argument('--beta', type=float, default=0.01)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=2e-3, help='peak learning rate')
    p.add_argument('--min-lr', type=float, default=1e-6, help='start of the warm-up and end of the cosine')
    p.add_argument('--warmup-epochs', type=float, default=1.0, help='linear learning-rate warm-up')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--beta-warmup-epochs', type=float, default=None, help='beta ramp; default 10%% of the epochs')
    p.add_argument('--beta-schedule', choices=keras_vib.recipe.BETA_SCHEDULES, default='linear')
    p.add_argument('--image-size', type=int, default=16)
    p.add_argument('--patch-size', type=int, default=4)
    p.add_argument('--embed-dim', type=int, default=64)
    p.add_argument('--depth', type=int, default=2)
    p.add_argument('--num-heads', type=int, default=2)
    p.add_argument('--vib-dim', type=int, default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--from-timm', default=None, help='timm_vib folder, .safetensors or Hub id to start from')
    p.add_argument('--verbose', type=int, default=2)
    args = p.parse_args(argv)
    r = train(args)
    print(f"{r['model']} beta={r['beta']:g}: val accuracy {r['val_accuracy']:.3f}, loss "
          f"{r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}, {r['seconds']:.1f} s"
          + (f", KL {r['mean_kl']:.4f} nats per head-token ({r['nats_per_image']:.1f} nats per image, "
             f"{r['active_heads']} active heads)" if 'mean_kl' in r else ''))
    if 'head_kl' in r:
        print_head_kl(r['head_kl'], r['active'])
    return r


if __name__ == '__main__':
    main()
