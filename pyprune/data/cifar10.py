"""CIFAR-10 in memory, from either of two on-disk layouts.

Layouts looked for under the data root:

* ``<root>/cifar10/{train,test}.npz`` with arrays ``x`` (N, 32, 32, 3) uint8 RGB and
  ``y`` (N,) class indices (the project's shared copy);
* ``<root>/cifar-10-batches-py/`` as written by ``torchvision.datasets.CIFAR10``, which
  can also download it (``download=True``).

Splits: ``train`` is the training set minus ``val``; ``val`` is a fixed, seeded,
class-balanced hold-out of 5,000 training images that searches use so that they
never see ``test``; ``test`` is the official test set. ``test-search`` and
``test-report`` are two fixed, class-balanced halves of ``test``, for checkpoints
that were trained on all of train (so ``val`` flatters them): a search measures on
the first half, and the final report on the second.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .dataset import ArrayDataset
from .root import DataRoot, DatasetNotFoundError, resolve_data_root

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "val", "test", "test-search", "test-report")
VAL_SIZE = 5000
VAL_SEED = 0


def npz_dir(root: Path) -> Path:
    return root / "cifar10"


def torchvision_dir(root: Path) -> Path:
    return root / "cifar-10-batches-py"


def _has_npz(root: Path) -> bool:
    return all((npz_dir(root) / f"{part}.npz").is_file() for part in ("train", "test"))


def _has_torchvision(root: Path) -> bool:
    return (torchvision_dir(root) / "batches.meta").is_file()


@functools.lru_cache(maxsize=4)
def _read_arrays(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Raw (images NHWC uint8, labels int64) of the official train or test part.
    Cached because train and val are cut from the same array."""
    if _has_npz(root):
        with np.load(npz_dir(root) / ("train.npz" if train else "test.npz")) as f:
            x, y = f["x"], f["y"]
    else:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(root), train=train, download=False)
        x, y = ds.data, np.asarray(ds.targets)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise ValueError(f"CIFAR-10 under {root} is malformed: images {x.shape} {x.dtype}, labels {y.shape}; "
                         "expected (N, 32, 32, 3) uint8 images and (N,) labels")
    return x, y.astype(np.int64)


def locate(root: DataRoot, download: bool = False) -> Path:
    """Return the root that holds CIFAR-10, downloading it with torchvision if asked."""
    if _has_npz(root.path) or _has_torchvision(root.path):
        return root.path
    if download:
        from torchvision.datasets import CIFAR10

        root.path.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(root.path), train=True, download=True)
        CIFAR10(str(root.path), train=False, download=True)
        return root.path
    raise DatasetNotFoundError(
        "CIFAR-10 not found. Looked for:\n"
        f"  {npz_dir(root.path) / 'train.npz'} and test.npz (npz layout)\n"
        f"  {torchvision_dir(root.path)} (torchvision layout)\n"
        f"under the data root {root.describe()}.\n"
        "Point --data-root or $PYPRUNE_DATA at a folder holding one of these layouts, "
        "or pass --download to fetch CIFAR-10 with torchvision into that root.")


def class_balanced_holdout(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out) with ``size // classes`` held out per class.

    The choice depends only on the labels and the seed, so every run and every
    process cuts the same split."""
    classes = np.unique(labels)
    if size % len(classes):
        raise ValueError(f"hold-out size {size} is not a multiple of the {len(classes)} classes")
    per_class = size // len(classes)
    rng = np.random.default_rng(seed)
    held = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than the {per_class} to hold out")
        held.append(rng.choice(members, size=per_class, replace=False))
    held_out = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept, held_out


def load_cifar10(split: str, data_root: str | Path | None = None, download: bool = False,
                 limit: int | None = None, val_size: int = VAL_SIZE,
                 val_seed: int = VAL_SEED) -> ArrayDataset:
    """Load one split of CIFAR-10 into memory as uint8 NCHW images and int64 labels.

    ``limit`` keeps the first N images of the split; rows are in a fixed random
    order, so a prefix is a fair sample."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = locate(resolve_data_root(data_root), download=download)
    from_train = split in ("train", "val")
    x, y = _read_arrays(root, train=from_train)
    if split != "test":
        size = val_size if from_train else len(y) // 2 // NUM_CLASSES * NUM_CLASSES
        kept, held_out = class_balanced_holdout(y, size, val_seed)
        index = held_out if split in ("val", "test-search") else kept
        x, y = x[index], y[index]
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ArrayDataset(images, torch.from_numpy(np.ascontiguousarray(y)), name=f"cifar10/{split}",
                        classes=CLASSES)
