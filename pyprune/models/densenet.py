"""DenseNets for CIFAR: DenseNet-40 (k=12) and DenseNet-BC-100 (k=12).

Layers are pre-activation (BN-ReLU-conv) and append their output to their
input with ``torch.cat([x, out], 1)``, so fx traces explicit ``cat`` nodes
that the channel-dependency analysis follows. Transitions are
BN-ReLU-conv1x1-avgpool2; the head is BN-ReLU-global avgpool-flatten-Linear.

DenseNet-40 (Huang et al. 2017, also the network-slimming baseline): 3 blocks
of 12 plain 3x3 layers, no bottleneck, no compression, and a 16-channel stem.
The 16-channel stem is the original paper's; it gives 1,019,722 parameters,
the 1.02M quoted by both papers. (Network slimming's code uses a 2k = 24
channel stem, which gives 1.06M.)

DenseNet-BC-100: 3 blocks of 16 bottleneck layers (BN-ReLU-conv1x1 to 4k,
BN-ReLU-conv3x3 to k), compression 0.5 at transitions, 2k = 24-channel stem.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .preresnet import slimming_init
from .registry import register_model

__all__ = ["DenseLayer", "BottleneckLayer", "Transition", "DenseNet", "densenet40", "densenet_bc100"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth_rate`` channels, concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        return torch.cat([x, out], 1)


class BottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k) then BN-ReLU-conv3x3 (k), concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inter = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2 between dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv1(self.relu1(self.bn1(x))))


class DenseNet(nn.Module):
    """Three dense blocks of ``layers_per_block`` layers for 32x32 inputs."""

    def __init__(
        self,
        layers_per_block: int,
        growth_rate: int = 12,
        bottleneck: bool = False,
        compression: float = 1.0,
        stem_channels: int | None = None,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        layer_cls = BottleneckLayer if bottleneck else DenseLayer
        channels = 2 * growth_rate if stem_channels is None else stem_channels
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        blocks: list[nn.Sequential] = []
        transitions: list[Transition] = []
        for b in range(3):
            layers = []
            for _ in range(layers_per_block):
                layers.append(layer_cls(channels, growth_rate))
                channels += growth_rate
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                out_channels = int(math.floor(channels * compression))
                transitions.append(Transition(channels, out_channels))
                channels = out_channels
        self.dense1, self.dense2, self.dense3 = blocks
        self.trans1, self.trans2 = transitions
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) on 32x32 inputs
        self.fc = nn.Linear(channels, num_classes)
        slimming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def densenet40(num_classes: int = 10) -> DenseNet:
    """DenseNet-40, k=12: 3x12 plain layers, no compression, 16-channel stem."""
    return DenseNet(12, growth_rate=12, bottleneck=False, compression=1.0,
                    stem_channels=16, num_classes=num_classes)


def densenet_bc100(num_classes: int = 10) -> DenseNet:
    """DenseNet-BC-100, k=12: 3x16 bottleneck layers, compression 0.5, 24-channel stem."""
    return DenseNet(16, growth_rate=12, bottleneck=True, compression=0.5,
                    stem_channels=24, num_classes=num_classes)


@register_model("densenet40", description="DenseNet-40 (k=12), no bottleneck, no compression")
def _densenet40(num_classes: int = 10) -> nn.Module:
    return densenet40(num_classes=num_classes)


@register_model("densenet100", aliases=("densenet_bc100",),
                description="DenseNet-BC-100 (k=12), bottleneck, compression 0.5")
def _densenet100(num_classes: int = 10) -> nn.Module:
    return densenet_bc100(num_classes=num_classes)
