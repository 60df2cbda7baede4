"""Batches from an :class:`ArrayDataset`, with augmentation done on whole batches.

Augmentation is the standard CIFAR recipe (4-pixel zero pad, random 32x32 crop,
horizontal flip), applied to the uint8 batch with tensor indexing rather than one
PIL image at a time. Every random choice comes from one ``torch.Generator``
seeded per epoch, so a seed fixes the whole stream of batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..distributed import Shard
from .dataset import ArrayDataset


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each image by ``pad`` zeros, crop back to its size at a random offset,
    and flip half of them horizontally. Works on a (B, C, H, W) batch of any dtype."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    # Flipping is a reversed column index, so crop and flip are one gather.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b)[:, None, None]
    # Advanced indices separated by a slice move to the front: result is (B, H, W, C).
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class Normalize:
    """uint8 [0, 255] -> float32, scaled to [0, 1], then per-channel (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # Fold the /255 into the affine map so a batch is one multiply-add.
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self._scale).add_(self._shift)


class BatchLoader:
    """Iterate (inputs, labels) batches of an in-memory dataset.

    ``shuffle`` and ``augment`` are for training; evaluation keeps the order. Each
    ``iter()`` is one epoch; epoch ``e`` draws from a generator seeded with
    ``seed + e``, so restarting with the same seed replays the same batches.

    With ``shard`` (rank r of w processes) every process draws the same global
    batches and the same augmentation, and yields its own contiguous r-th part of
    each: together the processes see exactly the batches one process would."""

    def __init__(self, dataset: ArrayDataset, batch_size: int, normalize: Normalize,
                 shuffle: bool = False, augment: bool = False, seed: int = 0,
                 drop_last: bool = False, pad: int = 4, shard: Shard = Shard()) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.normalize = normalize
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.pad = pad
        self.shard = shard
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else None
        for i in range(len(self)):
            if order is None:
                images = self.dataset.images[i * self.batch_size:(i + 1) * self.batch_size]
                labels = self.dataset.labels[i * self.batch_size:(i + 1) * self.batch_size]
            else:
                index = order[i * self.batch_size:(i + 1) * self.batch_size]
                images, labels = self.dataset.images[index], self.dataset.labels[index]
            if self.augment:
                images = random_crop_flip(images, self.pad, generator)
            if self.shard.distributed:
                images = images.tensor_split(self.shard.world)[self.shard.rank]
                labels = labels.tensor_split(self.shard.world)[self.shard.rank]
            yield self.normalize(images), labels
