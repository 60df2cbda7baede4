"""An in-memory labelled image set: the CPU is the bottleneck here, so images stay
uint8 tensors and are converted a whole batch at a time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..distributed import Shard


@dataclass
class ArrayDataset:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    name: str = "dataset"
    classes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def subset(self, index: torch.Tensor | slice) -> "ArrayDataset":
        return ArrayDataset(self.images[index], self.labels[index], self.name, self.classes)

    def batches(self, batch_size: int, mean: Sequence[float], std: Sequence[float], *, shuffle: bool = False,
                augment: bool = False, seed: int = 0, drop_last: bool = False, shard: Shard = Shard()) -> Iterable:
        """Normalised ``(inputs, labels)`` batches; each ``iter()`` is one epoch.

        The interface every dataset gives the training engine (an image folder
        streams through DataLoader workers instead): ``shuffle`` and ``augment``
        for training, seeded by ``seed`` and the epoch; ``shard`` is this process's
        part under torchrun. Here the images are in memory and augmented a whole
        batch at a time (:class:`~pyprune.data.loader.BatchLoader`)."""
        from .loader import BatchLoader, Normalize

        return BatchLoader(self, batch_size, Normalize(mean, std), shuffle=shuffle, augment=augment, seed=seed,
                           drop_last=drop_last, shard=shard)
