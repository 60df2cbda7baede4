"""Pooling and resampling: max, average and adaptive pooling (modules and
functions) pass channels through; ``nn.Upsample`` and ``F.interpolate`` are
serializable barriers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .identity import PASS_THROUGH
from .registry import BARRIER, OpSupport, function, module

OPS: tuple[OpSupport, ...] = (
    module(nn.MaxPool1d, PASS_THROUGH, serializable=False),
    module(nn.MaxPool2d, PASS_THROUGH, serializable=True),
    module(nn.AvgPool1d, PASS_THROUGH, serializable=False),
    module(nn.AvgPool2d, PASS_THROUGH, serializable=True),
    module(nn.AdaptiveAvgPool1d, PASS_THROUGH, serializable=False),
    module(nn.AdaptiveAvgPool2d, PASS_THROUGH, serializable=True),
    module(nn.AdaptiveMaxPool2d, PASS_THROUGH, serializable=True),
    module(nn.Upsample, BARRIER, serializable=True),

    function("torch.nn.functional.max_pool2d", F.max_pool2d, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.avg_pool2d", F.avg_pool2d, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.adaptive_avg_pool2d", F.adaptive_avg_pool2d, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.adaptive_max_pool2d", F.adaptive_max_pool2d, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.interpolate", F.interpolate, BARRIER, serializable=True),
)
