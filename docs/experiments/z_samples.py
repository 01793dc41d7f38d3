"""`timm-vib train` with every training image repeated K times in its batch (env K, default 4): K independent
z samples per image per optimizer step, i.e. the same objective's gradient with K times less sampling noise
from the bottlenecks, at K times the compute (docs/spectrum.md, section 4c).

    K=4 python docs/experiments/z_samples.py train --model vit_tiny_vib_b0p01 --model-kwargs img_size=16 \
        patch_size=2 depth=4 embed_dim=48 num_heads=3 vib_dim=8 vib_logvar_init=0 vib_small_init_dec=True \
        --data digits --epochs 15 --batch-size 64 --lr 3e-3 --warmup-epochs 2 --beta-warmup-epochs 1.5 \
        --stochastic-eval 3 --seed 0 --output runs/z_samples/k4_seed0

Every argument goes to `timm-vib`; with K=1 the run is the demo's run of the same seed with timm's position
init (`timm-vib demo --pos-embed-init trunc_normal`; checked: the same top-1 to the last digit). Validation is unchanged (one z per image per pass). An experiment, not a feature:
the training loader is patched for this process only.
"""
import os
import sys

import timm_vib.data as data

K = int(os.environ.get('K', '4'))
if K < 1:
    raise SystemExit(f'K={K}: the number of z samples per image must be at least 1')
_create_loaders = data.create_loaders


def create_loaders(*args, **kwargs):
    train, val, spec = _create_loaders(*args, **kwargs)
    collate = train.collate_fn

    def repeat(items):  # each image K times in a row: KL identical, z drawn K times
        x, y = collate(items)
        return x.repeat_interleave(K, 0), y.repeat_interleave(K, 0)

    train.collate_fn = repeat
    return train, val, spec


if __name__ == '__main__':
    data.create_loaders = create_loaders  # train() imports it at call time
    from timm_vib.cli import main
    sys.exit(main(sys.argv[1:]))
