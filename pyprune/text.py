"""Plain-text formatting shared by the command line and the reports it prints."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 2) -> str:
    """A fixed-width table: the first ``left`` columns left-aligned (names), the rest
    right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none):
    what a one-line error quotes of an exception raised by code it does not own."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
