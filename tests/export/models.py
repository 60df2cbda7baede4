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


def images(n: int, seed: int = 0, shape=(3, 32, 32)) -> torch.Tensor:
    """Normalised-looking random images whose channel means differ per image (so a
    small model's top-1 class differs between them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, shape[0], 1, 1, generator=g) * 1.5 + torch.randn(n, *shape, generator=g)


def tiny(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(num_classes)


def wobbly() -> nn.Module:
    torch.manual_seed(0)
    return Wobbly()


def diverging() -> nn.Module:
    torch.manual_seed(0)
    return Diverging(10)


class Probe(nn.Module):
    """Small, quick to export, and its top-1 class varies from image to image on
    random inputs (a random-init TinyNet's does not: its bias decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 10)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # BatchNorm as if trained, so folding it is not a no-op
            self.bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            self.bn.bias.copy_(0.1 * torch.randn(8, generator=g))
            self.bn.running_mean.copy_(0.1 * torch.randn(8, generator=g))
            self.bn.running_var.copy_(torch.rand(8, generator=g) * 0.1 + 0.05)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def probe() -> nn.Module:
    torch.manual_seed(0)
    return Probe()


def preresnet29() -> nn.Module:
    """ResNet-164's pre-activation bottleneck blocks, three per stage instead of 18."""
    from pyprune.models.preresnet import preresnet

    return preresnet(29)


def densenet_bc_shallow() -> nn.Module:
    """DenseNet-BC-100's bottleneck layers and 0.5 transitions, six per block instead of 16."""
    from pyprune.models.densenet import DenseNet

    return DenseNet(6, growth_rate=12, bottleneck=True, compression=0.5, stem_channels=24)
