"""Two digits and a marker: a task that needs communication between patches (docs/spectrum.md, 4l).

    python docs/experiments/gated_pairs.py OUT [--source FOLDER] [--seed S] [--max-train N]

Writes the four IDX files of a Fashion-MNIST folder (read with ``--data fashion-mnist:OUT``) whose images are
16x16: two 8x8 images of a source set, one above the other (columns 4-11), and a marker, two 2x2 white squares
at the left and right edges of one half (rows 3-4 or 11-12, columns 0-1 and 14-15). The label is the class of
the image in the marked half. Every image of the source split is the labelled one exactly once, with a random
partner of the same split in the other half and a random side, so the labels are the source's.

A 2x2 patch sees at most one half (before the crops' resampling): which digit is the answer is known only to
the marker's patches. Without attention each patch votes alone, so the two digits' votes are summed and the model
can do no better than guess between them (about half of its accuracy on single images). The layout is symmetric
under the horizontal flips of Fashion-MNIST's augmentation. The training crops (scale 0.7-1) cut off both marker
squares in about 1.4 % of draws (torchvision's ``RandomResizedCrop.get_params``, 20,000 draws on 16x16), which
leaves those images without their answer. ``OUT`` must not hold IDX files already: nothing is overwritten.

``--source`` is a Fashion-MNIST folder of 8x8 images (``fashion_mnist_as_digits.py OUT``); by default the
source is scikit-learn's digits in the demo's split (1,437 train, 360 val).
"""
import argparse
from pathlib import Path

import numpy as np

from fashion_mnist_as_digits import refuse_existing
from timm_vib.data import FASHION_MNIST_FILES, _digits, _fashion_mnist, write_idx


def gated_pairs(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 8, 8] -> uint8 [N, 16, 16]: composite i has image i in its marked half, so keeps its label."""
    n = len(images)
    partner = (np.arange(n) + rng.integers(1, n, size=n)) % n  # never itself
    top_marked = rng.integers(0, 2, size=n).astype(bool)
    out = np.zeros((n, 16, 16), dtype=np.uint8)
    top = np.where(top_marked[:, None, None], images, images[partner])
    bottom = np.where(top_marked[:, None, None], images[partner], images)
    out[:, 0:8, 4:12], out[:, 8:16, 4:12] = top, bottom
    rows = np.where(top_marked, 3, 11)
    for dr in (0, 1):
        for c in (0, 1, 14, 15):
            out[np.arange(n), rows + dr, c] = 255
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out', type=Path)
    p.add_argument('--source', default=None, help='folder of 8x8 IDX images (default: the demo digits)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--max-train', type=int, default=None, help='keep the first N training images of the source')
    args = p.parse_args()
    refuse_existing(args.out)
    rng = np.random.default_rng(args.seed)
    splits = {}
    for split in FASHION_MNIST_FILES:  # read every split first: a bad --source leaves no empty OUT behind
        d = _digits(split) if args.source is None else _fashion_mnist(split, args.source)
        images, labels = d.images, d.labels
        if split == 'train' and args.max_train:
            images, labels = images[:args.max_train], labels[:args.max_train]
        if images.shape[1:] != (8, 8):
            raise ValueError(f'{split} images of {args.source}: expected 8x8, got {images.shape[1:]}')
        splits[split] = images, labels
    args.out.mkdir(parents=True, exist_ok=True)
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        images, labels = splits[split]
        pairs = gated_pairs(images, rng)
        write_idx(args.out / img_name, pairs)
        write_idx(args.out / lbl_name, labels)
        print(f'{split}: {pairs.shape} -> {args.out / img_name}')

if __name__ == '__main__':
    main()
