"""Pre-activation ResNet with bottleneck blocks (ResNet-164) for CIFAR.

As used by network slimming (Liu et al. 2017, code at
Eric-mingjie/network-slimming ``models/preresnet.py``): 9n+2 layers, three
stages of n bottleneck blocks (BN-ReLU-conv1x1, BN-ReLU-conv3x3,
BN-ReLU-conv1x1) with bottleneck widths 16/32/64 and outputs 4x that; the
shortcut of a stage's first block is a 1x1 convolution without BN. Their
``channel_selection`` layers (a pruning device of their training code) are
left out: pyprune prunes by rewriting the graph instead. Parameter names
otherwise follow theirs (``layer{s}.{i}.bn1/conv1/...``, ``downsample.0``,
``bn``, ``fc``).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

__all__ = ["PreActBottleneck", "PreResNet", "preresnet", "slimming_init"]


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3(stride), BN-ReLU-conv1x1(x4), plus shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        # As in the reference, the projection shortcut takes the block input
        # before its BN-ReLU. Out-of-place add keeps the fx graph free of iadd.
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class PreResNet(nn.Module):
    """Pre-activation bottleneck ResNet of depth 9n+2 for 32x32 inputs."""

    def __init__(self, depth: int = 164, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self._in_planes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        width = 64 * PreActBottleneck.expansion
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(8) on 32x32 inputs
        self.fc = nn.Linear(width, num_classes)
        slimming_init(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * PreActBottleneck.expansion
        downsample = None
        if stride != 1 or self._in_planes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_planes, out_planes, 1, stride=stride, bias=False)
            )
        layers = [PreActBottleneck(self._in_planes, planes, stride, downsample)]
        self._in_planes = out_planes
        layers += [PreActBottleneck(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def slimming_init(model: nn.Module) -> None:
    """Initialisation of the network-slimming reference code.

    Convs: normal(0, sqrt(2 / (k*k*out_channels))), i.e. Kaiming normal in
    fan-out mode. BN scales start at 0.5 rather than 1: slimming trains with
    an L1 penalty on them, and this is the starting point its recipe was tuned
    for.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)


def preresnet(depth: int = 164, num_classes: int = 10) -> PreResNet:
    """Pre-activation bottleneck ResNet of the given depth (9n+2)."""
    return PreResNet(depth, num_classes=num_classes)


@register_model("resnet164", description="pre-activation bottleneck ResNet-164 (network slimming)")
def _resnet164(num_classes: int = 10) -> nn.Module:
    return preresnet(164, num_classes=num_classes)
