"""Datasets held in memory or streamed from image folders, and batched loading with augmentation."""

from .cifar10 import load_cifar10
from .dataset import ArrayDataset
from .imagefolder import FolderDataset, load_imagefolder
from .loader import BatchLoader, Normalize, random_crop_flip
from .root import DataRoot, DatasetNotFoundError, resolve_data_root
from .spec import DATASETS, DataSpec, load_dataset

__all__ = ["ArrayDataset", "BatchLoader", "DATASETS", "DataRoot", "DataSpec", "DatasetNotFoundError", "FolderDataset",
           "Normalize", "load_cifar10", "load_dataset", "load_imagefolder", "random_crop_flip", "resolve_data_root"]
