"""Fashion-MNIST prepared as scikit-learn's digits are (docs/spectrum.md, 4i).

    python docs/experiments/fashion_mnist_as_digits.py OUT [--source FOLDER]

sklearn's digits are 32x32 bitmaps counted in 4x4 blocks: 8x8 images with 17 grey levels (0-16). This writes
Fashion-MNIST the same way (each 28x28 image box-averaged to 8x8, then rounded to 17 levels, stored as
``round(level * 255 / 16)`` as ``timm_vib.data`` stores the digits) as the four IDX files of a Fashion-MNIST folder,
so that ``--data fashion-mnist:OUT --img-size 16 --patch-size 2`` gives the demo's digits tokens (one source pixel
upsampled to 2x2) on Fashion-MNIST's images.
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from timm_vib.data import FASHION_MNIST_FILES, _idx_file, find_fashion_mnist, read_idx, write_idx


def as_digits(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] -> uint8 [N, 8, 8]: box averages on an 8x8 grid, 17 grey levels."""
    small = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BOX), dtype=np.float64) for im in images])
    return np.round(np.round(small / 255.0 * 16.0) * (255.0 / 16.0)).astype(np.uint8)


def _write_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    os.close(fd)
    try:
        write_idx(tmp, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out', type=Path)
    p.add_argument('--source', default=None, help="Fashion-MNIST folder (default: Debian's install location)")
    args = p.parse_args()
    src = find_fashion_mnist(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    for img_name, lbl_name in FASHION_MNIST_FILES.values():
        images = read_idx(_idx_file(src, img_name))
        _write_atomic(args.out / img_name, as_digits(images))
        _write_atomic(args.out / lbl_name, read_idx(_idx_file(src, lbl_name)))
        print(f'{img_name}: {images.shape} -> {args.out / img_name} (8x8, 17 grey levels)')


if __name__ == '__main__':
    main()
