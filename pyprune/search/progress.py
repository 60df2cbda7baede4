"""Progress of a search: one overall bar over candidates, and a one-line summary
per measured candidate printed above it. Fine-tuning shows its own bars (the
engine's). ``quiet`` shows nothing."""

from __future__ import annotations

from tqdm.auto import tqdm

from .candidates import Candidate


class Progress:
    def __init__(self, quiet: bool = False, desc: str = "compile") -> None:
        self.quiet = quiet
        self.bar = tqdm(total=0, desc=desc, unit="cand", disable=quiet, dynamic_ncols=True, leave=False,
                        position=0)

    def expect(self, more: int) -> None:
        """Add ``more`` expected measurements to the bar's total (bisection knows
        its count per ladder in advance; the total grows stage by stage)."""
        self.bar.total = (self.bar.total or 0) + max(more, 0)
        self.bar.refresh()

    def done(self, candidate: Candidate, cached: bool) -> None:
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.total = self.bar.n + 1
        self.bar.update(1)
        if not cached:
            self.say(candidate.summary())

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
