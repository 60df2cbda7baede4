"""Image folders in the standard ImageNet layout, streamed through DataLoader workers.

``--data imagefolder:PATH`` reads::

    PATH/train/<class>/<image>   (training images, one sub-folder per class)
    PATH/val/<class>/<image>     (held-out images, the same class folders)

``PATH`` is absolute or relative to the current directory (the data root is not
used). Classes are the sorted sub-folders of ``PATH/train`` (as torchvision's
``ImageFolder`` finds them); ``PATH/val`` must have the same ones. Files are found
with torchvision's ``make_dataset`` (its image extensions).

Splits mirror CIFAR-10 (:mod:`.cifar10`):

* ``val``: a fixed, seeded, class-balanced hold-out of ``PATH/train``: from each
  class, 2% of its images, rounded down, but at least 1 and at most 50 (ImageNet:
  14 to 26 per class, about 25,000 in all), so that searches never see ``test``;
* ``train``: ``PATH/train`` minus ``val``;
* ``test``: all of ``PATH/val``;
* ``test-search`` / ``test-report``: two fixed halves of ``PATH/val``, each class
  split in two (``test-search`` gets the smaller half of an odd class).

Within a split the files are in a fixed, seeded random order (like CIFAR's rows),
so ``limit`` (the first N) is a fair sample. The hold-out and the order depend only
on the file lists and the seed, so every run and every process cuts the same
splits.

Images are decoded with PIL and converted to RGB, then get the usual torchvision
transforms: for training ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``;
for evaluation ``Resize(round(size * 256 / 224))`` + ``CenterCrop(size)``; then
``ToTensor()`` + ``Normalize(mean, std)``. ``size`` is the model's input
resolution (``input_shape[-1]``; 224 when not given).

Determinism: the batch sampler draws, from a generator seeded with ``seed + epoch``,
the epoch's order and one seed per position in it; each image's augmentation runs
under its own seed (in a forked RNG state, so the caller's RNG is untouched). The
batches are thus the same for any number of workers, any number of processes
(``shard``) and any worker scheduling. The DataLoader's own generator is seeded with
``seed + epoch`` too (it seeds the workers' base seed, which nothing here uses).
Left over: PIL's decoding and resampling are deterministic for one PIL version, but
may differ between PIL versions or builds (e.g. libjpeg vs libjpeg-turbo).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..distributed import Shard
from .root import DatasetNotFoundError

PREFIX = "imagefolder:"
SPLITS = ("train", "val", "test", "test-search", "test-report")
HOLDOUT_FRACTION = 0.02
HOLDOUT_MIN = 1
HOLDOUT_MAX = 50
SEED = 0
DEFAULT_SIZE = 224
WORKERS_ENV = "PYPRUNE_WORKERS"


def default_workers() -> int:
    """``$PYPRUNE_WORKERS`` if set, else min(4, CPU count)."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        n = int(env)
        if n < 0:
            raise ValueError(f"${WORKERS_ENV} must be >= 0, got {n}")
        return n
    return min(4, os.cpu_count() or 1)


# --- file discovery and splits -------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _scan(directory: str, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(relative paths as bytes, labels) of every image under ``directory``, in
    make_dataset's order (class, then file name). Cached: train and val are cut
    from the same scan, and a scan of ImageNet's train folder takes a while."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    prefix = len(os.path.join(directory, ""))
    # Fixed-width bytes, not a list of str: compact, and no refcounts for forked
    # workers to touch (a list of 1.3M str would be copied page by page).
    files = np.array([os.fsencode(p[prefix:]) for p, _ in samples], dtype=np.bytes_)
    labels = np.array([c for _, c in samples], dtype=np.int64)
    return files, labels


def _find_classes(directory: Path) -> tuple[str, ...]:
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(directory))
    except FileNotFoundError:
        return ()
    return tuple(classes)


def _locate(root: Path) -> tuple[Path, Path, tuple[str, ...]]:
    """Check the layout under ``root``; return (train dir, val dir, classes)."""
    train_dir, val_dir = root / "train", root / "val"
    layout = (f"Expected the ImageNet layout: {train_dir}/<class>/<image> and {val_dir}/<class>/<image> "
              f"(PATH in imagefolder:PATH is absolute or relative to the current directory {Path.cwd()}).")
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder {root} not found.\n{layout}")
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DatasetNotFoundError(f"image folder {d} not found.\n{layout}")
    classes = _find_classes(train_dir)
    if not classes:
        raise DatasetNotFoundError(f"no class folders in {train_dir}.\n{layout}")
    val_classes = _find_classes(val_dir)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise ValueError(f"the class folders of {train_dir} and {val_dir} differ: "
                         f"only in train: {_names(only_train)}; only in val: {_names(only_val)}")
    return train_dir, val_dir, classes


def _names(names: list[str], most: int = 10) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _scan_checked(directory: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files, labels = _scan(str(directory), classes)
    if len(files) == 0:
        raise DatasetNotFoundError(f"no images in {directory}/<class>/ (looked for {', '.join(IMG_EXTENSIONS)}) "
                                   f"in the class folders {_names(list(classes))}")
    return files, labels


def holdout_sizes(counts: np.ndarray) -> np.ndarray:
    """Images held out of each class for ``val``: 2% rounded down, clamped to [1, 50]."""
    return np.clip(np.floor(counts * HOLDOUT_FRACTION).astype(np.int64), HOLDOUT_MIN, HOLDOUT_MAX)


def per_class_holdout(labels: np.ndarray, sizes: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held_out), holding out ``sizes[c]`` random images
    of class ``c`` (all of them when it has fewer). Both sorted."""
    rng = np.random.default_rng(seed)
    held = []
    for c, size in enumerate(sizes):
        members = np.flatnonzero(labels == c)
        held.append(rng.choice(members, size=min(int(size), len(members)), replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept, held_out


def split_index(split: str, labels: np.ndarray, num_classes: int, seed: int = SEED) -> np.ndarray:
    """Indices into the scanned files (train's for train/val, val's for the rest)
    that make ``split``, in the split's fixed random order."""
    counts = np.bincount(labels, minlength=num_classes)
    if split == "test":
        index = np.arange(len(labels))
    elif split in ("train", "val"):
        kept, held_out = per_class_holdout(labels, holdout_sizes(counts), seed)
        index = held_out if split == "val" else kept
    else:
        kept, held_out = per_class_holdout(labels, counts // 2, seed)
        index = held_out if split == "test-search" else kept
    return index[np.random.default_rng(seed).permutation(len(index))]


def load_imagefolder(path: str | os.PathLike, split: str, limit: int | None = None,
                     input_shape: Sequence[int] | None = None, seed: int = SEED,
                     num_workers: int | None = None) -> "FolderDataset":
    """Split ``split`` of the image folder at ``path`` (see the module docstring).
    ``input_shape`` is the model's (C, H, W): images are cropped to ``input_shape[-1]``
    square (224 when None). ``num_workers``: DataLoader workers (None:
    :func:`default_workers`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    root = Path(path).expanduser().absolute()
    train_dir, val_dir, classes = _locate(root)
    directory = train_dir if split in ("train", "val") else val_dir
    files, labels = _scan_checked(directory, classes)
    index = split_index(split, labels, len(classes), seed)[:limit]
    size = int(input_shape[-1]) if input_shape else DEFAULT_SIZE
    return FolderDataset(directory, files[index], torch.from_numpy(labels[index]), classes, size,
                         name=f"{PREFIX}{root}/{split}", num_workers=num_workers)


# --- the dataset ---------------------------------------------------------------------------------


class FolderDataset:
    """Labelled image files, decoded on demand: the engine's dataset interface
    (``name``, ``classes``, ``num_classes``, ``len``, ``subset``, ``batches``) for
    images that do not fit in memory."""

    def __init__(self, directory: str | os.PathLike, files: np.ndarray, labels: torch.Tensor,
                 classes: Sequence[str], size: int = DEFAULT_SIZE, name: str = "imagefolder",
                 num_workers: int | None = None) -> None:
        if labels.shape != (len(files),):
            raise ValueError(f"{len(files)} files but labels of shape {tuple(labels.shape)}")
        self.directory = Path(directory)
        self.files = files
        self.labels = labels.long()
        self.classes = tuple(classes)
        self.size = size
        self.name = name
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> Path:
        return self.directory / os.fsdecode(self.files[i])

    def subset(self, index: torch.Tensor | slice | list[int]) -> "FolderDataset":
        """The files at ``index``, in that order (a view of the same folder)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
            files = self.files[index.numpy()]
        else:
            files = self.files[index]
        return FolderDataset(self.directory, files, self.labels[index], self.classes, self.size, self.name,
                             self.num_workers)

    def transform(self, mean: Sequence[float], std: Sequence[float], augment: bool):
        from torchvision import transforms as T

        if augment:
            geometry = [T.RandomResizedCrop(self.size), T.RandomHorizontalFlip()]
        else:
            geometry = [T.Resize(round(self.size * 256 / 224)), T.CenterCrop(self.size)]
        return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean, std)])

    def batches(self, batch_size: int, mean: Sequence[float], std: Sequence[float], *, shuffle: bool = False,
                augment: bool = False, seed: int = 0, drop_last: bool = False,
                shard: Shard = Shard()) -> "FolderBatches":
        """Normalised ``(inputs, labels)`` batches; each ``iter()`` is one epoch,
        seeded by ``seed + epoch``; with ``shard``, this process's contiguous part
        of every global batch (as :class:`~pyprune.data.loader.BatchLoader`)."""
        workers = default_workers() if self.num_workers is None else self.num_workers
        return FolderBatches(self, batch_size, self.transform(mean, std, augment), shuffle=shuffle,
                             augment=augment, seed=seed, drop_last=drop_last, shard=shard, num_workers=workers)


class _Images(torch.utils.data.Dataset):
    """What the DataLoader workers index: ``(file index, augmentation seed)`` ->
    (CHW float tensor, label)."""

    def __init__(self, dataset: FolderDataset, transform, augment: bool) -> None:
        self.dataset = dataset
        self.transform = transform
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        i, seed = key
        with Image.open(self.dataset.path(i)) as f:
            image = f.convert("RGB")
        if self.augment:
            # torchvision's random transforms draw from torch's global RNG: give each
            # image its own seed, in a forked state, so that the result does not
            # depend on which worker (or process) decodes it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
        else:
            x = self.transform(image)
        return x, int(self.dataset.labels[i])


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Lists of ``(file index, seed)``: global batches of ``batch_size`` over the
    epoch's order (shuffled when ``shuffle``, else file order), each cut with
    ``tensor_split`` into ``shard.world`` contiguous parts of which this sampler
    yields part ``shard.rank``. Every process draws the same order and seeds from a
    generator seeded with ``seed + epoch``."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool, shard: Shard) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.drop_last, self.shard = seed, drop_last, shard
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator)
        for i in range(len(self)):
            part = slice(i * self.batch_size, (i + 1) * self.batch_size)
            index, seed = order[part], seeds[part]
            if self.shard.distributed:
                index = index.tensor_split(self.shard.world)[self.shard.rank]
                seed = seed.tensor_split(self.shard.world)[self.shard.rank]
            yield list(zip(index.tolist(), seed.tolist()))


def _collate(items: list[tuple[torch.Tensor, int]], shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:  # this process's part of a global batch smaller than the world
        return torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


class FolderBatches:
    """The batches of a :class:`FolderDataset` for one kind of pass (see
    :meth:`FolderDataset.batches`): ``len()`` batches per epoch for this process;
    each ``iter()`` is the next epoch."""

    def __init__(self, dataset: FolderDataset, batch_size: int, transform, *, shuffle: bool, augment: bool,
                 seed: int, drop_last: bool, shard: Shard, num_workers: int) -> None:
        self.dataset = dataset
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle, seed, drop_last, shard)
        self.images = _Images(dataset, transform, augment)
        self.seed = seed
        self.num_workers = num_workers
        self.epoch = 0
        self._loader: torch.utils.data.DataLoader | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch = self.epoch
        self.epoch += 1
        yield from self._data_loader()

    def _data_loader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for every epoch, its workers kept between them: a loader
        made per epoch forked and joined its workers every epoch, and under
        ``--nproc`` a CI run hung in one of those (as pytorch/pytorch#82077
        reports). Forking a process whose gloo threads are running is not safe
        either, so distributed processes start workers from a fork server. The
        sampler draws each epoch's order in this process, and every image carries
        its own augmentation seed, so kept workers change no result."""
        if self._loader is None:
            workers = min(self.num_workers, len(self))  # no idle processes for a few batches
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            self._loader = torch.utils.data.DataLoader(
                self.images, batch_sampler=self.sampler, num_workers=workers,
                collate_fn=functools.partial(_collate, shape=(3, self.dataset.size, self.dataset.size)),
                persistent_workers=workers > 0,
                multiprocessing_context="forkserver" if workers > 0 and distributed else None,
                generator=torch.Generator().manual_seed(self.seed))
        return self._loader
