"""`timm-vib train` on a built-in set whose images sit at a random offset on a larger blank canvas
(docs/spectrum.md, section 4d): a task where a patch's position says nothing by itself, so a model
without attention cannot fall back on "ink at pixel (i, j)".

    CANVAS=12 python docs/experiments/translated.py --model vit_tiny_gap --model-kwargs img_size=12 \
        patch_size=2 depth=4 embed_dim=48 num_heads=3 --data digits --epochs 45 --batch-size 64 --lr 3e-3 \
        --warmup-epochs 2 --output runs/translated/gap

Every argument goes to `timm-vib train`. Training images get a new offset at every draw, validation
images a fixed one per image; the canvas is CANVAS source pixels wide (digits are 8, Fashion-MNIST 28).
An experiment, not a feature: the loaders are patched for this process only.
"""
import os
import random
import sys

import numpy as np
from PIL import Image

import timm_vib.data as data


class Translated(data.ArrayDataset):
    def __init__(self, base: data.ArrayDataset, canvas: int, train: bool):
        super().__init__(base.images, base.labels, base.classes)
        h, w = base.images.shape[1:]
        if canvas < max(h, w):
            raise ValueError(f'CANVAS={canvas} is smaller than the images ({h}x{w})')
        self.canvas, self.train = canvas, train

    def __getitem__(self, i: int):
        img = self.images[i]
        h, w = img.shape
        if self.train:  # Python's global RNG: offsets differ from run to run
            dy, dx = random.randint(0, self.canvas - h), random.randint(0, self.canvas - w)
        else:
            rng = np.random.default_rng(1000 + i)
            dy, dx = int(rng.integers(0, self.canvas - h + 1)), int(rng.integers(0, self.canvas - w + 1))
        out = np.zeros((self.canvas, self.canvas), np.uint8)
        out[dy:dy + h, dx:dx + w] = img
        return Image.fromarray(out, mode='L').convert('RGB'), int(self.labels[i])


if __name__ == '__main__':
    canvas = int(os.environ.get('CANVAS', '12'))
    digits, fashion = data._digits, data._fashion_mnist
    data._digits = lambda split: Translated(digits(split), canvas, split == 'train')
    data._fashion_mnist = lambda split, folder: Translated(fashion(split, folder), canvas, split == 'train')
    from timm_vib.cli import main
    sys.exit(main(sys.argv[1:]))
