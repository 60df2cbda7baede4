"""VGG-11/13/16/19 with batch norm, CIFAR variant of network slimming.

As in Eric-mingjie/network-slimming ``models/vgg.py``: 3x3 convolutions
without bias, each followed by BN and ReLU, max-pooling at the 'M' entries
(four of them: 32x32 -> 2x2), a 2x2 average pool down to 1x1, and a single
``Linear(512, num_classes)`` instead of VGG's three-layer classifier. VGG-19
has 20,035,018 parameters.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .preresnet import slimming_init
from .registry import register_model

__all__ = ["VGG_CFGS", "VGG", "vgg"]

Cfg = Sequence[Union[int, str]]

# Network slimming's default configurations; 'M' is a 2x2 max-pool. The last
# block has no max-pool: the final 2x2 map is average-pooled instead.
VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """``features`` (conv-BN-ReLU / max-pool stack), global average pool, ``classifier``."""

    def __init__(self, cfg: Cfg, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int), f"bad VGG cfg entry {v!r}"
                layers += [
                    nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(),
                ]
                in_channels = v
        self.features = nn.Sequential(*layers)
        # Adaptive pooling equals the reference's AvgPool2d(2) on 32x32 inputs
        # and keeps the classifier input at 512 for other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        slimming_init(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def vgg(depth: int = 19, num_classes: int = 10) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19) with BN, CIFAR variant."""
    if depth not in VGG_CFGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
    return VGG(VGG_CFGS[depth], num_classes=num_classes)


def _register(depth: int) -> None:
    @register_model(f"vgg{depth}", description=f"VGG-{depth} with BN, one linear classifier")
    def _build(num_classes: int = 10) -> nn.Module:
        return vgg(depth, num_classes=num_classes)


for _depth in sorted(VGG_CFGS):
    _register(_depth)
