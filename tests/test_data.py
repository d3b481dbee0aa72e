"""Datasets: the embedded MNIST-5k split, CIFAR and ImageFolder readers on files in the real formats."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune as vp
from vitprune.data import epoch_order
from vitprune.errors import DataError
from vitprune.params import DataParams


def test_mnist5k_is_a_fixed_stratified_split():
    b = vp.load_data(DataParams())
    x, y = b.train
    xt, yt = b.test
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert torch.bincount(yt).tolist() == [100] * 10 and torch.bincount(y).tolist() == [400] * 10
    assert 0 <= x.min() and x.max() <= 1
    again = vp.load_data(DataParams())
    assert torch.equal(again.test[0], xt)


def test_digits_and_synthetic_shapes(smoke_params):
    d = vp.load_data(smoke_params.data)
    assert d.train[0].shape[1:] == (1, 8, 8) and d.num_train() + d.num_test() == 1797
    s = vp.load_data(DataParams(name="synthetic", in_chans=3, image_size=32, num_classes=100, train_size=10))
    assert s.train[0].shape == (10, 3, 32, 32) and s.num_classes == 100


def test_loaders_are_seeded_and_ranks_partition_the_global_batch(digits_bundle):
    a = list(vp.train_batches(digits_bundle, 64, seed=1, epoch=3))
    b = list(vp.train_batches(digits_bundle, 64, seed=1, epoch=3))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    c = next(iter(vp.train_batches(digits_bundle, 64, seed=1, epoch=4)))
    assert not torch.equal(a[0][0], c[0])
    full = epoch_order(1000, 0, 0, 0, 1, 64)
    halves = [epoch_order(1000, 0, 0, r, 2, 64) for r in range(2)]
    assert sorted(torch.cat(halves).tolist()) == sorted(full.tolist())
    r0 = list(vp.train_batches(digits_bundle, 64, seed=1, epoch=3, rank=0, world=2))
    r1 = list(vp.train_batches(digits_bundle, 64, seed=1, epoch=3, rank=1, world=2))
    merged = sorted(torch.cat([r0[0][0], r1[0][0]]).flatten(1).tolist())
    assert merged == sorted(a[0][0].flatten(1).tolist())  # same samples, same augmentation


def write_cifar(root: Path, classes: int = 10, per_batch: int = 20) -> Path:
    """CIFAR in the real 'python version' format: pickled dicts of uint8 rows (N x 3072) and labels."""
    rng = np.random.default_rng(0)
    if classes == 10:
        folder, files, label_key, meta = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "labels", ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder, files, label_key, meta = root / "cifar-100-python", ["train", "test"], "fine_labels", (
            "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    folder.mkdir(parents=True)
    for name in files:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return root


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_loader_reads_the_real_format(tmp_path, classes):
    root = write_cifar(tmp_path, classes)
    p = DataParams(name=f"cifar{classes}", root=str(root), image_size=32, verify_checksum=False, shift=4,
                   hflip=True)
    b = vp.load_data(p)
    assert b.num_classes == classes and b.num_train() == (100 if classes == 10 else 20) and b.num_test() == 20
    x, y = next(iter(vp.train_batches(b, 8, seed=0, epoch=0)))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    acc = vp.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, classes)), vp.test_batches(b, 7))
    assert acc["samples"] == 20


def test_cifar_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"data.root '.*nothere' does not exist; expected .*cifar-10-batches-py"):
        vp.load_data(DataParams(name="cifar10", root=str(tmp_path / "nothere")))
    root = write_cifar(tmp_path / "c")
    with pytest.raises(DataError, match=r"CIFAR-10 at '.*c' is missing or corrupted"):  # MD5 sums do not match
        vp.load_data(DataParams(name="cifar10", root=str(root)))
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="cifar-10-batches-py/' with the pickled batches"):
        vp.load_data(DataParams(name="cifar10", root=str(root), verify_checksum=False))


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def test_imagefolder_loader_with_timm_transforms(tmp_path):
    root = write_imagefolder(tmp_path)
    b = vp.load_data(DataParams(name="imagefolder", root=str(root), image_size=32))
    assert b.num_classes == 2 and b.num_train() == 6 and b.in_chans == 3
    x, _ = next(iter(vp.train_batches(b, 4, seed=0, epoch=0)))
    assert x.shape == (4, 3, 32, 32)
    xt, _ = next(iter(vp.test_batches(b, 6)))
    assert xt.shape == (6, 3, 32, 32)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*/train' not found; expected '.*/train/<class>/<image>'"):
        vp.load_data(DataParams(name="imagefolder", root=str(tmp_path)))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"'.*/train' is malformed"):
        vp.load_data(DataParams(name="imagefolder", root=str(tmp_path)))
    root = write_imagefolder(tmp_path / "x")
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match="class folders of .* differ"):
        vp.load_data(DataParams(name="imagefolder", root=str(root)))
