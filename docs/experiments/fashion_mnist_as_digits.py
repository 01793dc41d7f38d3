"""Fashion-MNIST prepared as scikit-learn's digits are (docs/spectrum.md, 4i).

    python docs/experiments/fashion_mnist_as_digits.py OUT [--source FOLDER]
    python docs/experiments/fashion_mnist_as_digits.py OUT --digits

sklearn's digits are 32x32 bitmaps counted in 4x4 blocks: 8x8 images with 17 grey levels (0-16). This writes
Fashion-MNIST the same way (each 28x28 image box-averaged to 8x8, then rounded to 17 levels, stored as
``round(level * 255 / 16)`` as ``timm_vib.data`` stores the digits) as the four IDX files of a Fashion-MNIST folder,
so that ``--data fashion-mnist:OUT --img-size 16 --patch-size 2`` gives the demo's digits tokens (one source pixel
upsampled to 2x2) on Fashion-MNIST's images. ``--digits`` writes the digits themselves (the demo's split: 1,437
train as ``train-*``, 360 val as ``t10k-*``) into such a folder: read through ``--data fashion-mnist:OUT`` they are
the demo's images with Fashion-MNIST's augmentation, which adds horizontal flips.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from timm_vib.data import FASHION_MNIST_FILES, _digits, _idx_file, find_fashion_mnist, read_idx, write_idx


def as_digits(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] -> uint8 [N, 8, 8]: box averages on an 8x8 grid, 17 grey levels."""
    small = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BOX), dtype=np.float64) for im in images])
    return np.round(np.round(small / 255.0 * 16.0) * (255.0 / 16.0)).astype(np.uint8)


def refuse_existing(out: Path) -> None:
    """Stop before writing if ``out`` already holds any of the four IDX files (a Fashion-MNIST set, say)."""
    found = [str(f) for pair in FASHION_MNIST_FILES.values() for n in pair if (f := _idx_file(out, n))]
    if found:
        raise SystemExit(f'{out} already holds {", ".join(found)}: not overwriting; give an empty or new folder')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out', type=Path)
    p.add_argument('--source', default=None, help="Fashion-MNIST folder (default: Debian's install location)")
    p.add_argument('--digits', action='store_true', help="write sklearn's digits (the demo's split) instead")
    args = p.parse_args()
    refuse_existing(args.out)
    if args.digits:
        for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
            d = _digits(split)
            write_idx(args.out / img_name, d.images)
            write_idx(args.out / lbl_name, d.labels)
            print(f'digits {split}: {d.images.shape} -> {args.out / img_name}')
        return
    src = find_fashion_mnist(args.source)
    for img_name, lbl_name in FASHION_MNIST_FILES.values():
        images = read_idx(_idx_file(src, img_name))
        write_idx(args.out / img_name, as_digits(images))
        write_idx(args.out / lbl_name, read_idx(_idx_file(src, lbl_name)))
        print(f'{img_name}: {images.shape} -> {args.out / img_name} (8x8, 17 grey levels)')


if __name__ == '__main__':
    main()
