"""Datasets held in memory, and batched loading with augmentation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .cifar10 import load_cifar10
from .dataset import ArrayDataset
from .loader import BatchLoader, Normalize, random_crop_flip
from .root import DataRoot, DatasetNotFoundError, resolve_data_root

# Named datasets for ``--data``; each loader takes (split, data_root, download, limit).
DATASETS: dict[str, Callable[..., ArrayDataset]] = {"cifar10": load_cifar10}


def load_dataset(name: str, split: str, data_root: str | Path | None = None,
                 download: bool = False, limit: int | None = None) -> ArrayDataset:
    """Load split ``split`` of the dataset called ``name`` (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None
    return loader(split, data_root=data_root, download=download, limit=limit)


__all__ = ["ArrayDataset", "BatchLoader", "DATASETS", "DataRoot", "DatasetNotFoundError",
           "Normalize", "load_cifar10", "load_dataset", "random_crop_flip", "resolve_data_root"]
