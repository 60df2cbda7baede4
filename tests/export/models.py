"""Small models for the export tests, importable by the CLI as
``--arch tests.export.models:NAME`` (input 3x32x32, 10 classes)."""

import torch
from torch import nn

from ..search.tiny import TinyNet


@torch.library.custom_op("pyprune_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    """An operator ONNX has never heard of."""
    return x * 1.5


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class Wobbly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(wobble(self.conv(x)).mean((2, 3)))


class Diverging(TinyNet):
    """Adds 1 to every logit while being exported (torch.compiler.is_exporting()),
    not when run eagerly: an export-only code path, so the ONNX file honestly
    disagrees with the PyTorch model by exactly 1.0 on every logit."""

    def forward(self, x):
        y = super().forward(x)
        if torch.compiler.is_exporting():
            y = y + 1.0
        return y


def tiny(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(num_classes)


def wobbly() -> nn.Module:
    torch.manual_seed(0)
    return Wobbly()


def diverging() -> nn.Module:
    torch.manual_seed(0)
    return Diverging(10)
