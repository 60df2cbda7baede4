"""Shared helpers of the benchmarks: interleaved median timing and Markdown tables.

The machines here are noisy (2 shared cores), so contenders are timed in the same
process, interleaved repeat by repeat, and compared by medians: a burst of background
load then hits all of them alike instead of one."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def interleaved_medians(fns: Sequence[Callable[[], object]], repeats: int = 15, warmup: int = 2,
                        min_seconds: float = 0.0) -> list[float]:
    """Median seconds per call of each function, timing them in turn ``repeats`` times.

    A function fast enough to finish under ``min_seconds`` is called in a loop within
    one repeat, and the per-call time is reported."""
    for f in fns:
        for _ in range(warmup):
            f()
    loops = []
    for f in fns:  # calls per repeat, from one probe call
        start = time.perf_counter()
        f()
        elapsed = time.perf_counter() - start
        loops.append(max(1, int(min_seconds / elapsed)) if elapsed > 0 else 1)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, n, out in zip(fns, loops, samples):
            start = time.perf_counter()
            for _ in range(n):
                f()
            out.append((time.perf_counter() - start) / n)
    return [statistics.median(s) for s in samples]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so it pastes into a README as it is."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
