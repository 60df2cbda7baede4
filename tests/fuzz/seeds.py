"""The valid files every mutant starts from: a small CIFAR-shaped network with the
structures a graph document can hold (a residual add, a concatenation, a flatten, a
method call), saved as a graph file and as ``.ppz`` files with every encoding."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from pyprune.cli.app import main as cli


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(12 * 8 * 8, num_classes))

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)) + a)
        x = self.pool(self.conv3(torch.cat([a, b], dim=1)))
        return self.head(x.flatten(1))


def small_net(num_classes: int = 10) -> SmallNet:
    torch.manual_seed(0)
    return SmallNet(num_classes)


# name -> the passes that make it; the suffix decides the file kind
SEEDS = {
    "graph.pt": "slim(ratio=0.25)",
    "quantized.ppz": "mask(sparsity=0.6),quant(bits=4)",
    "plain.ppz": "slim(ratio=0.25)",
}


def kind_of(name: str) -> str:
    return "ppz" if name.endswith(".ppz") else "graph"


def make_seeds(folder: Path) -> dict[str, Path]:
    """Write every seed file into ``folder`` (deterministic: the same bytes each time)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, passes in SEEDS.items():
        path = folder / name
        argv = ["opt", "--arch", f"{__name__}:small_net", "--passes", passes, "--eval-split", "none",
                "--no-progress", "--threads", "1", "--force", "-o", str(path)]
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli(argv)
        if code != 0:
            raise RuntimeError(f"could not write the fuzz seed {path}: pyprune {' '.join(argv)} exited {code}")
        out[name] = path
    return out
