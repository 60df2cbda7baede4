"""Which dataset a command reads, and from where: :class:`DataSpec`, one value in
place of the ``(name, data_root, download)`` arguments every command used to pass
along, and :func:`load_dataset`, the dispatch from a dataset's name to its loader."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cifar10 import load_cifar10
from .dataset import ArrayDataset
from .imagefolder import PREFIX as IMAGEFOLDER_PREFIX
from .imagefolder import FolderDataset, load_imagefolder

# Named datasets for ``--data``; each loader takes (split, data_root, download, limit),
# and ``input_shape`` when its signature has it. ``imagefolder:PATH`` is handled apart.
DATASETS: dict[str, Callable[..., ArrayDataset]] = {"cifar10": load_cifar10}


def load_dataset(name: str, split: str, data_root: str | Path | None = None,
                 download: bool = False, limit: int | None = None,
                 input_shape: tuple[int, ...] | None = None, model: str = "the model") -> ArrayDataset | FolderDataset:
    """Load split ``split`` of the dataset called ``name`` (see :data:`DATASETS`), or
    of the image folder PATH when ``name`` is ``imagefolder:PATH`` (see
    :mod:`.imagefolder`; PATH is absolute or relative to the current directory,
    ``data_root`` and ``download`` do not apply). ``input_shape`` is the model's
    (C, H, W), for datasets that resize their images to it; ``model`` names the
    model in the error for a dataset of another fixed size."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = name[len(IMAGEFOLDER_PREFIX):]
        if not path:
            raise ValueError(f"{name!r}: give the folder, as imagefolder:PATH")
        return load_imagefolder(path, split, limit=limit, input_shape=input_shape)
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}, "
                         f"or {IMAGEFOLDER_PREFIX}PATH") from None
    kwargs = {}
    if input_shape is not None and "input_shape" in inspect.signature(loader).parameters:
        kwargs["input_shape"] = input_shape
    dataset = loader(split, data_root=data_root, download=download, limit=limit, **kwargs)
    if input_shape is not None and isinstance(dataset, ArrayDataset) and \
            tuple(dataset.images.shape[1:]) != tuple(input_shape):
        have, want = "x".join(map(str, dataset.images.shape[1:])), "x".join(map(str, input_shape))
        raise ValueError(f"{name} images are {have} (C x H x W), but {model} takes {want}: {name} has one "
                         f"fixed size, so nothing is resized. Use a model made for {have} inputs (--input-size "
                         f"{dataset.images.shape[-1]} when building one with --arch), or --data imagefolder:PATH, "
                         "whose images are resized to the model's")
    return dataset


@dataclass(frozen=True)
class DataSpec:
    """``name``: a dataset name (``cifar10``) or ``imagefolder:PATH``; ``root``: the
    data folder (None: ``$PYPRUNE_DATA``, else ``./data``); ``download``: fetch what
    is missing (CIFAR-10 through torchvision). How many images of a split a command
    uses stays with the command (``--limit``, ``--val-limit``...): it differs by the
    role a split plays, and a compile's fingerprint records each."""

    name: str = "cifar10"
    root: str | None = None
    download: bool = False

    @classmethod
    def of(cls, data: "DataSpec | str") -> "DataSpec":
        """``data`` as a DataSpec; a plain string names the dataset."""
        return data if isinstance(data, DataSpec) else cls(str(data))

    def load(self, split: str, limit: int | None = None, input_shape: tuple[int, ...] | None = None,
             model: str = "the model") -> ArrayDataset | FolderDataset:
        """Split ``split`` (its first ``limit`` images), for a model of ``input_shape``
        (``model`` names it in errors)."""
        return load_dataset(self.name, split, self.root, self.download, limit, input_shape=input_shape, model=model)
