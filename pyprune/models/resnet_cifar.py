"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

6n+2 layers: a 3x3 stem, three stages of n basic blocks with widths 16/32/64,
global average pooling and one linear layer. Where a block changes width and
resolution the shortcut is "option A": subsample and zero-pad channels, no
parameters.

The parameter names match the pretrained checkpoints of
akamaster/pytorch_resnet_cifar10 once their ``module.`` prefix is stripped
(``conv1``, ``bn1``, ``layer{s}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``), so
those files load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["ZeroPadShortcut", "BasicBlock", "ResNetCifar", "resnet_cifar"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every second pixel, zero-pad ``pad`` channels each side.

    A module rather than a lambda so that ``torch.fx`` traces through it into a
    ``getitem`` (the strided slice) and a ``pad`` node, which the dependency
    analysis recognises; a lambda would not be picklable either.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus shortcut, then relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            # The checkpoints were trained with planes//4 zero channels on each
            # side (16 -> 32 -> 64), which assumes the width doubles with stride 2.
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcut needs stride 2 and doubled width")
            self.shortcut = ZeroPadShortcut(planes // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # ``self.shortcut is None`` is fixed at construction, so fx can trace it.
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class ResNetCifar(nn.Module):
    """ResNet for 32x32 inputs with ``blocks_per_stage`` basic blocks per stage."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        # Kaiming normal on convs and the linear layer, as the checkpoints were trained.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def resnet_cifar(depth: int, num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet of the given depth (6n+2: 20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return ResNetCifar((depth - 2) // 6, num_classes=num_classes)


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}", description=f"CIFAR ResNet-{depth}, option-A shortcuts")
    def _build(num_classes: int = 10) -> nn.Module:
        return resnet_cifar(depth, num_classes=num_classes)


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
