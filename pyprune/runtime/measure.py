"""Short interleaved timings: the runtime's per-layer choice and the benchmarks use them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int = 5, warmup: int = 1,
                        min_seconds: float = 0.0) -> list[float]:
    """Median seconds per call of each function.

    The functions run in turn within every repeat, not one after the other, so a burst
    of load from other processes on a shared machine hits them all alike. A function
    faster than ``min_seconds`` is called in a loop within a repeat (the count comes from
    one probe call) and the time per call is reported."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for f in fns:
            f()
    loops = []
    for f in fns:
        start = time.perf_counter()
        f()
        elapsed = time.perf_counter() - start
        loops.append(max(1, int(min_seconds / elapsed)) if elapsed > 0 and min_seconds > 0 else 1)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, n, out in zip(fns, loops, samples):
            start = time.perf_counter()
            for _ in range(n):
                f()
            out.append((time.perf_counter() - start) / n)
    return [statistics.median(s) for s in samples]


@torch.inference_mode()
def time_modules(modules: Sequence[nn.Module], x: torch.Tensor, repeats: int = 5,
                 warmup: int = 1) -> list[float]:
    """Median milliseconds of one ``module(x)`` call for each module (interleaved)."""
    return [s * 1e3 for s in interleaved_medians([lambda m=m: m(x) for m in modules], repeats, warmup)]
