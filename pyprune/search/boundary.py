"""Finding how far a technique can go: the boundary of a monotone predicate.

A compression setting ``levels[i]`` is more aggressive the larger ``i``, and
accuracy falls (or stays) as ``i`` grows, so "meets the target" is true up to some
index and false after it. Bisection finds that index with ``ceil(log2(n + 1))``
evaluations instead of ``n``; the caller's cache makes repeated questions free.
"""

from __future__ import annotations

from collections.abc import Callable


def last_passing(passes: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest ``i`` in ``[lo, hi)`` with ``passes(i)``, by bisection.

    ``lo`` must be known to pass (or be ``-1``: "none", the stage skipped) and
    ``hi`` known to fail (or be ``len(levels)``); ``passes`` is assumed monotone
    (true, then false) between them and is only called strictly inside
    ``(lo, hi)``."""
    if hi <= lo:
        raise ValueError(f"empty range: lo={lo} must be below hi={hi}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo
