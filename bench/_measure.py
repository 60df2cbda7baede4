"""Shared helpers of the benchmarks: interleaved median timing and Markdown tables.

The machines here are noisy (2 shared cores), so contenders are timed in the same
process, interleaved repeat by repeat, and compared by medians."""

from __future__ import annotations

from typing import Sequence

from pyprune.runtime.measure import interleaved_medians

__all__ = ["interleaved_medians", "table"]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, so it pastes into a README as it is."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
