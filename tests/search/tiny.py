"""A tiny CNN and a synthetic, learnable image set for fast search tests."""

import torch
from torch import nn

from pyprune.data import ArrayDataset
from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.search.candidates import State
from pyprune.search.evaluator import Budget, EvalSettings, Evaluator, SearchData
from pyprune.search.journal import Journal
from pyprune.search.progress import Progress
from pyprune.train import TrainConfig

MEAN, STD, SHAPE = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 8, 8)


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def synthetic(n: int, seed: int) -> ArrayDataset:
    """Class = the brightest colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randint(0, 120, (n, *SHAPE), generator=g, dtype=torch.int64)
    images[torch.arange(n), labels] += 100
    return ArrayDataset(images.to(torch.uint8), labels, f"synthetic{seed}")


def tiny_base() -> State:
    torch.manual_seed(0)
    gm = propagate_shapes(trace(TinyNet()), example_input(SHAPE))
    return State(gm, val_accuracy=0.5)  # screens estimate val accuracy relative to the parent's


def tiny_evaluator(target: float = 0.0, finetune_epochs: float = 0.5, journal: Journal | None = None,
                   lr: float = 0.05, minutes: float | None = None, gradual_mask: bool = False,
                   screen_steps: int = 0) -> Evaluator:
    val = synthetic(200, 1)
    data = SearchData(synthetic(256, 0), val, val.subset(slice(0, 100)), MEAN, STD, SHAPE)
    journal = journal if journal is not None else Journal()
    settings = EvalSettings(finetune_epochs, TrainConfig(lr=lr, batch_size=32, progress=False), recal_images=64,
                            gradual_mask=gradual_mask, screen_steps=screen_steps)
    return Evaluator(data, settings, target, journal, Budget(minutes, journal), Progress(quiet=True),
                     {"arch": "tiny"})
