"""Data for training and analysing the spectrum: built-in sets that need no download, and image folders.

``--data`` takes one of:

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8 px, 16 grey levels, 10 classes), upsampled
  by the transforms to the model's image size (which its patch size must divide). Split 80 / 20
  (stratified, fixed seed 0: 1,437 train / 360 val, the same for every run). Training augmentation:
  RandomResizedCrop scale (0.7, 1), colour jitter 0.4 (brightness and contrast: timm's default), no flips (a
  flipped digit is another symbol or none), no RandAugment.
* ``fashion-mnist``: Fashion-MNIST read from its four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally
  ``.gz``) in Debian's ``dataset-fashion-mnist`` package or in the folder given as
  ``fashion-mnist:FOLDER``. 60,000 train / 10,000 val (the official test set), 28x28 grey, 10 classes.
  Augmentation: RandomResizedCrop scale (0.7, 1), colour jitter 0.4 and horizontal flips (clothes are
  mirror-symmetric).
* a folder in ImageNet layout (``FOLDER/train/<wnid>/*.JPEG``, ``FOLDER/val/<wnid>/*``; ``validation``
  also accepted), read through timm's dataset factory, optionally restricted with a class list
  (a file of WordNet ids, or ``imagenet100`` for the list of Tian et al. 2020). The reference code's recipe:
  RandomResizedCrop (0.08, 1), horizontal flip, torchvision's RandAugment (2 ops, magnitude 9), bicubic;
  validation resize + center crop (crop_pct 0.875), ImageNet mean / std.

Grey images are replicated to 3 channels, so every model takes RGB. Training augmentation draws its
randomness from a generator seeded by (seed, epoch, sample index), not from the process-wide RNGs:
runs are repeatable whatever the number of loader workers, and a resumed run sees exactly the
augmented images that an uninterrupted run would have.
"""
import gzip
import json
import os
import random
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform

from .files import atomic_write

__all__ = [
    'DataSpec', 'build_datasets', 'create_loaders', 'load_run_dataset', 'read_idx', 'write_idx',
    'read_class_list', 'find_fashion_mnist', 'check_data', 'denormalize', 'IMAGENET100_URL',
]

BUILTIN = ('digits', 'fashion-mnist')
GREY_MEAN, GREY_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# photographs (image folders, timm's named datasets): ImageNet statistics, crop and augmentation
_PHOTO_EVAL = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 0.875, 'bicubic')  # mean, std, crop_pct, interpolation
# The reference code's RandAugment is torchvision's (every image gets 2 of 14 ops at 9/30 of each op's range, e.g.
# rotations up to 9 degrees), not timm's 'rand-m9-n2' (15 ops with Invert and SolarizeAdd, each applied with
# probability 0.5, at 9/10 of the range: rotations up to 27 degrees), so the photo recipe puts torchvision's
# between timm's crop / flip and its tensor steps.
_PHOTO_AUG = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, auto_augment=None, color_jitter=None,
                  rand_augment=dict(implementation='torchvision', num_ops=2, magnitude=9))
# timm's create_transform default, which the built-in grey sets have always had (brightness, contrast, saturation)
_GREY_COLOR_JITTER = 0.4
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist', '/usr/share/dataset-fashion-mnist')
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
FASHION_MNIST_CLASSES = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot']
# The ImageNet-100 class list of Tian, Krishnan & Isola 2020 (Contrastive Multiview Coding), as published with their
# code at this address; a copy ships as timm_vib/imagenet100.txt.
IMAGENET100_URL = 'https://raw.githubusercontent.com/HobbitLong/CMC/master/imagenet100.txt'


@dataclass
class DataSpec:
    """What a run's data is: recorded in its config and used to rebuild its validation set."""
    name: str                      # 'digits', 'fashion-mnist' or the folder
    num_classes: int
    classes: List[str]
    img_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float
    interpolation: str
    num_train: int = 0
    num_val: int = 0
    class_list: Optional[str] = None
    augmentation: Dict[str, Any] = field(default_factory=dict)

    def data_config(self) -> Dict[str, Any]:
        """timm's data config (what ``save_model`` records with the weights)."""
        return dict(input_size=(3, self.img_size, self.img_size), mean=tuple(self.mean), std=tuple(self.std),
                    crop_pct=self.crop_pct, interpolation=self.interpolation)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- readers ------------------------------------------------------------------------------------

def _open(path: Path):
    return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` too) into an array of its shape and dtype."""
    path = Path(path)
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] not in dtypes:
            raise ValueError(f'{path} is not an IDX file (bad magic number {head!r})')
        ndim = head[3]
        shape = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
        dtype = np.dtype(dtypes[head[2]])
        data = f.read()
    n = int(np.prod(shape)) * dtype.itemsize
    if len(data) != n:
        raise ValueError(f'{path} is truncated or corrupt: header says {shape} ({n} bytes), found {len(data)} bytes')
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='))


def write_idx(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """Write an array of integers 0-255 as a uint8 IDX file (for tests and small custom sets), atomically.

    Raises ValueError for any other value (it would wrap or truncate silently in uint8)."""
    array = np.asarray(array)
    with np.errstate(invalid='ignore'):
        as_uint8 = np.ascontiguousarray(array, dtype=np.uint8)
    if not np.array_equal(array, as_uint8):
        raise ValueError(f'{path}: an IDX file of uint8 holds integers 0-255, got values in '
                         f'[{np.nanmin(array)}, {np.nanmax(array)}] of dtype {array.dtype}')
    with atomic_write(path, 'wb') as f:
        f.write(bytes([0, 0, 0x08, as_uint8.ndim]) + struct.pack(f'>{as_uint8.ndim}I', *as_uint8.shape)
                + as_uint8.tobytes())


def find_fashion_mnist(folder: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files (searched recursively below ``folder`` or
    Debian's install locations)."""
    roots = [Path(folder)] if folder else [Path(d) for d in FASHION_MNIST_DIRS]
    for root in roots:
        if not root.is_dir():
            continue
        for cand in [root, *sorted(p for p in root.rglob('*') if p.is_dir())]:
            if all(_idx_file(cand, n) for pair in FASHION_MNIST_FILES.values() for n in pair):
                return cand
    where = str(folder) if folder else ' or '.join(FASHION_MNIST_DIRS)
    files = ', '.join(n for pair in FASHION_MNIST_FILES.values() for n in pair)
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found in {where} (need {files}, optionally .gz): install Debian\'s '
        'package (apt-get install dataset-fashion-mnist) or pass --data fashion-mnist:FOLDER')


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    for cand in (folder / name, folder / f'{name}.gz', folder / name.replace('-idx', '.idx')):
        if cand.is_file():
            return cand
    return None


def read_class_list(spec: str) -> List[str]:
    """WordNet ids from a file (one per line, ``#`` comments), or ``'imagenet100'``: the published list
    of Tian et al. 2020 (``IMAGENET100_URL``), shipped with the package."""
    if spec == 'imagenet100':
        path = Path(__file__).with_name('imagenet100.txt')  # shipped: clusters are often offline
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f'class list {spec} does not exist (a file of WordNet ids, one per line, or "imagenet100")')
    ids = [ln.split('#')[0].strip().split()[0] for ln in path.read_text().splitlines() if ln.split('#')[0].strip()]
    if not ids:
        raise ValueError(f'class list {path} names no classes')
    if len(set(ids)) != len(ids):
        raise ValueError(f'class list {path} names some classes twice')
    return ids


# --- datasets -----------------------------------------------------------------------------------

class ArrayDataset(Dataset):
    """Grey images [N, H, W] uint8 and labels [N] -> (PIL RGB image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode='L').convert('RGB'), int(self.labels[i])


class TransformedDataset(Dataset):
    """Applies ``transform`` to the images of ``base``. With ``seed`` set, each sample's augmentation
    draws from RNGs seeded by (seed, epoch, index): call ``set_epoch`` each epoch (Accelerate's
    DataLoader does)."""

    def __init__(self, base: Dataset, transform: Callable, seed: Optional[int] = None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, target = self.base[i]
        if self.seed is None:
            return self.transform(img), target
        seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0])
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (and, before CUDA starts, record a
            # stack trace for) every GPU, 2 ms per image, and fork_rng restores only the CPU's state
            torch.default_generator.manual_seed(seed)
            random.seed(seed)  # RandAugment draws from Python's RNG
            try:
                return self.transform(img), target
            finally:
                random.setstate(py_state)


def _digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(d.target)), test_size=0.2, random_state=0, stratify=d.target)
    idx = idx_train if split == 'train' else idx_val
    return ArrayDataset(images[idx], d.target[idx], [str(c) for c in range(10)])


def _fashion_mnist(split: str, folder: Optional[str]) -> ArrayDataset:
    root = find_fashion_mnist(folder)
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    images, labels = read_idx(_idx_file(root, img_name)), read_idx(_idx_file(root, lbl_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f'{root}: {img_name} {images.shape} and {lbl_name} {labels.shape} do not match')
    return ArrayDataset(images, labels, FASHION_MNIST_CLASSES)


def _split_dir(root: Path, split: str) -> Path:
    names = ('train',) if split == 'train' else ('val', 'validation')
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f'data folder {root} has no {" or ".join(names)}/ subfolder (expected ImageNet layout: '
                            f'{root}/train/<class>/..., {root}/val/<class>/...)')


def _folder(root: Path, split: str, class_list: Optional[List[str]]):
    folder = _split_dir(root, split)
    present = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if class_list is not None:
        missing = [c for c in class_list if c not in present]
        if missing:
            shown = ', '.join(missing[:10]) + (f' ... ({len(missing)} in all)' if len(missing) > 10 else '')
            raise ValueError(f'{folder} lacks {len(missing)} class(es) of the class list: {shown}')
        classes = list(class_list)
    else:
        classes = present
    if not classes:
        raise ValueError(f'{folder} is empty: no class subfolders')
    try:
        ds = create_dataset('', root=str(folder), split=split, class_map={c: i for i, c in enumerate(classes)})
    except RuntimeError as e:  # timm: 'Found 0 images in subfolders of ...'
        if 'Found 0 images' not in str(e):
            raise
        ds = ()
    if len(ds) == 0:
        raise ValueError(f'split {split!r} in {folder} is empty: no images in the {len(classes)} class folders')
    return ds, classes


# timm's dataset factory names (``PREFIX/NAME[:ROOT]``) that give random-access datasets: the
# seeded augmentation, the seedable sampler and exact resumption work on them as on folders
TIMM_PREFIXES = ('torch', 'hfds')
# timm's streaming (iterable) names: no random access, so no exact resumption mid-epoch (yet)
TIMM_STREAMING = ('hfids', 'wds', 'tfds')


def _parse_data(data: str) -> Tuple[str, Optional[str]]:
    """'digits' / 'fashion-mnist' / 'fashion-mnist:FOLDER' / 'PREFIX/NAME[:ROOT]' (timm's dataset
    names) / FOLDER -> (kind, folder); kind 'timm' for timm's names."""
    if data == 'digits':
        return 'digits', None
    if data == 'fashion-mnist' or data.startswith('fashion-mnist:'):
        return 'fashion-mnist', (data.split(':', 1)[1] or None) if ':' in data else None
    prefix = data.split('/', 1)[0].lower() if '/' in data else ''
    if prefix in TIMM_STREAMING:
        raise ValueError(f'--data {data}: timm\'s streaming datasets ({", ".join(p + "/" for p in TIMM_STREAMING)}) '
                         f'are not supported yet (exact resumption needs random access); use '
                         f'{" or ".join(p + "/" for p in TIMM_PREFIXES)} names or an image folder')
    if prefix in TIMM_PREFIXES and not Path(data).exists():
        return 'timm', data
    return 'folder', data


def check_data(data: str, splits: Sequence[str] = ('train', 'val')) -> None:
    """Clear errors for a ``--data`` that cannot be read, from what can be checked without reading it:
    the name's form, a missing folder or split folder, missing Fashion-MNIST files (timm's named sets are
    checked when opened)."""
    kind, folder = _parse_data(data)
    if kind == 'folder':
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(
                f'data folder {root} does not exist (--data takes digits, fashion-mnist[:FOLDER] or an ImageNet-style folder)')
        for split in splits:
            _split_dir(root, split)
    elif kind == 'fashion-mnist':
        find_fashion_mnist(folder)


class _RGB(Dataset):
    """(image, label) of any dataset with the image converted to 3-channel PIL (grey sets included)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, target = self.base[i]
        return (img if img.mode == 'RGB' else img.convert('RGB')), int(target)


def _timm_dataset(data: str, split: str) -> Tuple[Dataset, List[str]]:
    """A split of one of timm's named datasets ('torch/cifar10:ROOT', 'hfds/NAME:CACHE'), never
    downloaded (tests and clusters read what is there), and its class names."""
    name, _, root = data.partition(':')
    errors = []
    for timm_split in (('train',) if split == 'train' else ('validation', 'test')):  # as the sets name it
        try:
            ds = create_dataset(name, root=root or None, split=timm_split, download=False)
            break
        except (RuntimeError, FileNotFoundError, ImportError, AssertionError, ValueError, KeyError) as e:
            errors.append(f'{timm_split!r}: {type(e).__name__}: {e}')
    else:
        raise ValueError(f'--data {data}: timm could not open its {split} split ({"; ".join(errors)}); '
                         f'name it as PREFIX/NAME:ROOT with the data already in ROOT (nothing is downloaded)')
    classes = getattr(ds, 'classes', None)
    if classes is None:
        mapping = getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or {}
        classes = [str(c) for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    if not classes:
        raise ValueError(f'--data {data}: cannot tell its classes (no .classes nor a class_to_idx)')
    return _RGB(ds), [str(c) for c in classes]


def build_datasets(
        data: str,
        img_size: int,
        class_list: Optional[str] = None,
        seed: Optional[int] = 0,
        max_train_samples: Optional[int] = None,
        max_val_samples: Optional[int] = None,
        normalize: bool = True,
        splits: Sequence[str] = ('train', 'val'),
) -> Tuple[Dict[str, Dataset], DataSpec]:
    """Datasets (with transforms) of ``splits`` and the :class:`DataSpec` of ``data``.

    Items are (image float32 [3, img_size, img_size], label); ``normalize=False`` leaves images in [0, 1].
    ``max_*_samples`` keep the first N samples of a split (in a fixed shuffled order) for short runs.
    Raises FileNotFoundError / ValueError naming the problem (missing folder, classes, empty split).
    """
    kind, folder = _parse_data(data)
    if img_size < 1:
        raise ValueError(f'img_size must be positive, got {img_size}')
    if kind == 'timm':
        if class_list:
            raise ValueError(f'--class-list applies to image folders, not to timm\'s named dataset {data!r}')
        bases, classes = {}, None
        for s in splits:
            bases[s], classes = _timm_dataset(data, s)
        (mean, std, crop_pct, interp), aug = _PHOTO_EVAL, dict(_PHOTO_AUG)
        name = data
    elif kind == 'folder':
        check_data(data, splits)
        root = Path(folder)
        ids = read_class_list(class_list) if class_list else None
        bases, classes = {}, None
        for s in splits:
            bases[s], classes = _folder(root, s, ids)
        (mean, std, crop_pct, interp), aug = _PHOTO_EVAL, dict(_PHOTO_AUG)
        name = str(root)
    else:
        if class_list:
            raise ValueError(f'--class-list applies to image folders, not to the built-in set {kind!r}')
        read = _digits if kind == 'digits' else (lambda s: _fashion_mnist(s, folder))
        bases = {s: read(s) for s in splits}
        classes = next(iter(bases.values())).classes
        mean, std, crop_pct, interp = GREY_MEAN, GREY_STD, 1.0, 'bilinear'
        aug = dict(scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.0 if kind == 'digits' else 0.5, auto_augment=None,
                   color_jitter=_GREY_COLOR_JITTER)
        name = kind if folder is None else f'{kind}:{folder}'
    limits = {'train': max_train_samples, 'val': max_val_samples}
    for s, n in limits.items():
        if s in bases and n is not None:
            if n < 1:
                raise ValueError(f'max_{s}_samples must be >= 1, got {n}')
            order = torch.randperm(len(bases[s]), generator=torch.Generator().manual_seed(1234))[:n].sort().values
            bases[s] = torch.utils.data.Subset(bases[s], order.tolist())
    for s, ds in bases.items():
        if len(ds) == 0:
            raise ValueError(f'split {s!r} of {name} is empty')
    norm_mean, norm_std = (mean, std) if normalize else ((0., 0., 0.), (1., 1., 1.))
    out = {}
    for s, base in bases.items():
        if s == 'train':
            out[s] = TransformedDataset(base, _train_transform(img_size, aug, interp, norm_mean, norm_std), seed=seed)
        else:
            tf = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interp,
                                  mean=norm_mean, std=norm_std)
            out[s] = TransformedDataset(base, tf)
    spec = DataSpec(
        name=name, num_classes=len(classes), classes=list(classes), img_size=img_size, mean=tuple(mean), std=tuple(std),
        crop_pct=crop_pct, interpolation=interp, num_train=len(out.get('train', ())), num_val=len(out.get('val', ())),
        class_list=class_list, augmentation=dict(aug, scale=list(aug['scale']), ratio=list(aug['ratio'])))
    return out, spec


def _train_transform(img_size: int, aug: Dict[str, Any], interpolation: str, mean, std) -> Callable:
    """timm's crop, flip and colour jitter, torchvision's RandAugment where ``aug`` asks for it, then timm's
    tensor conversion and normalisation (the reference code's order)."""
    kw = dict(scale=aug['scale'], ratio=aug['ratio'], hflip=aug['hflip'], auto_augment=aug['auto_augment'],
              color_jitter=aug['color_jitter'], interpolation=interpolation, mean=mean, std=std)
    if not aug.get('rand_augment'):
        return create_transform(img_size, is_training=True, **kw)
    from torchvision import transforms
    ra = aug['rand_augment']
    primary, secondary, final = create_transform(img_size, is_training=True, separate=True, **kw)
    rand_augment = transforms.RandAugment(num_ops=ra['num_ops'], magnitude=ra['magnitude'])
    return transforms.Compose([*primary.transforms, *secondary.transforms, rand_augment, *final.transforms])


def create_loaders(
        data: str,
        img_size: int,
        batch_size: int,
        class_list: Optional[str] = None,
        seed: int = 0,
        num_workers: int = 0,
        max_train_samples: Optional[int] = None,
        max_val_samples: Optional[int] = None,
        val_batch_size: Optional[int] = None,
) -> Tuple[DataLoader, DataLoader, DataSpec]:
    """(train loader shuffled and augmented, val loader in order, spec): plain PyTorch loaders, ready
    for ``accelerator.prepare``. Batches are (images [B, 3, img_size, img_size] normalised, labels [B])."""
    if batch_size < 1:
        raise ValueError(f'batch size must be >= 1, got {batch_size}')
    sets, spec = build_datasets(data, img_size, class_list, seed, max_train_samples, max_val_samples)
    # the loaders' own generators: creating an iterator then draws its worker seed from them, not from
    # torch's global RNG, so a resumed run's RNG stream (restored from the checkpoint) stays in step
    train = DataLoader(sets['train'], batch_size=batch_size, shuffle=True, drop_last=False, num_workers=num_workers,
                       generator=torch.Generator().manual_seed(seed), persistent_workers=False)
    val = DataLoader(sets['val'], batch_size=val_batch_size or batch_size, shuffle=False, num_workers=num_workers,
                     generator=torch.Generator().manual_seed(seed + 1))
    return train, val, spec


def load_run_dataset(run_dir: Union[str, os.PathLike], split: str = 'val', normalize: bool = True) -> Dataset:
    """The ``split`` of a run's data with its evaluation transform (resize + center crop).

    Items are (image float32 [3, H, W], label); ``normalize=False`` gives images in [0, 1] for display
    (``denormalize`` undoes the normalisation of a batch). ``dataset.classes`` names the labels.
    """
    cfg_path = Path(run_dir) / 'run_config.json'
    if not cfg_path.is_file():
        raise FileNotFoundError(f'{run_dir} has no run_config.json: not a training run folder')
    cfg = json.loads(cfg_path.read_text())
    d = cfg['data']
    sets, spec = build_datasets(d['name'], d['img_size'], d.get('class_list'), seed=None,
                                max_val_samples=cfg['args'].get('max_val_samples') if split == 'val' else None,
                                max_train_samples=cfg['args'].get('max_train_samples') if split == 'train' else None,
                                normalize=normalize, splits=(split,))
    ds = sets[split]
    if split == 'train':  # evaluation transform for analysis, not the augmentation
        tf = create_transform(spec.img_size, is_training=False, crop_pct=spec.crop_pct, interpolation=spec.interpolation,
                              mean=spec.mean if normalize else (0., 0., 0.), std=spec.std if normalize else (1., 1., 1.))
        ds = TransformedDataset(ds.base, tf)
    ds.classes = spec.classes
    ds.spec = spec
    return ds


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, 3, H, W] normalised images -> [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1)
