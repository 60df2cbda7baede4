"""The accuracy a compiled model must keep: absolute, or relative to the baseline."""

from __future__ import annotations

from dataclasses import dataclass


class BaselineBelowTarget(ValueError):
    """The uncompressed model already misses the target: nothing can be compressed."""

    def __init__(self, baseline: float, target: float, split: str) -> None:
        super().__init__(f"the baseline model scores {baseline:.4f} top-1 on {split}, below the target "
                         f"{target:.4f}: no compressed model can meet it. Lower --target-acc, or use "
                         f"--max-drop to set the target relative to the baseline.")
        self.baseline = baseline
        self.target = target


@dataclass(frozen=True)
class Target:
    """``accuracy``: absolute top-1 on the validation split (``--target-acc``).
    ``max_drop``: accuracy points the model may lose against its own validation
    accuracy, measured first (``--max-drop 0.01`` allows 92.5% -> 91.5%).
    Exactly one is set."""

    accuracy: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if (self.accuracy is None) == (self.max_drop is None):
            raise ValueError("give exactly one of --target-acc and --max-drop")
        value, flag = (self.accuracy, "--target-acc") if self.accuracy is not None else (self.max_drop, "--max-drop")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} is a fraction of images in [0, 1] (0.93 for 93%), got {value}")

    def resolve(self, baseline: float, split: str = "val") -> float:
        """The absolute accuracy to meet, given the baseline's accuracy on ``split``;
        raises :class:`BaselineBelowTarget` when the baseline misses an absolute target."""
        if self.max_drop is not None:
            return baseline - self.max_drop
        if baseline < self.accuracy:
            raise BaselineBelowTarget(baseline, self.accuracy, split)
        return self.accuracy

    def describe(self) -> str:
        if self.max_drop is not None:
            return f"at most {self.max_drop:.4f} below the baseline"
        return f"top-1 >= {self.accuracy:.4f}"

    def to_dict(self) -> dict:
        return {"kind": "max_drop" if self.max_drop is not None else "absolute",
                "value": self.max_drop if self.max_drop is not None else self.accuracy}
