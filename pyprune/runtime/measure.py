"""Short timing of candidate modules on one input, for the runtime's per-layer choice."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn


@torch.inference_mode()
def time_modules(modules: Sequence[nn.Module], x: torch.Tensor, repeats: int = 5,
                 warmup: int = 1) -> list[float]:
    """Median milliseconds of one ``module(x)`` call for each module.

    The modules run in turn within every repeat, not one after the other, so a
    burst of load from other processes on a shared machine hits them all alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for m in modules:
            m(x)
    samples: list[list[float]] = [[] for _ in modules]
    for _ in range(repeats):
        for m, times in zip(modules, samples):
            start = time.perf_counter()
            m(x)
            times.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in samples]
