"""What a search works with: stages (a pass and its ladder of settings), states
(a model reached by a chain of accepted steps) and candidates (one measured
setting), the last being the rows of ``report.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import fx

from ..passes import build_pipeline

# Least to most aggressive. Bisection makes long ladders cheap: 19 slim ratios cost
# about 5 screens, not 19.
DEFAULT_LEVELS: dict[str, tuple[float | int, ...]] = {
    "slim": tuple(round(0.05 * i, 2) for i in range(1, 19)),
    "mask": (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98),
    "quant": (8, 7, 6, 5, 4, 3, 2),
}
DEFAULT_ORDER = ("slim", "mask", "quant")


@dataclass(frozen=True)
class Stage:
    """One technique and the settings the search may give it, least aggressive first."""

    name: str
    levels: tuple[float | int, ...]

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_LEVELS:
            raise ValueError(f"unknown stage {self.name!r}; stages are {', '.join(DEFAULT_LEVELS)}")
        if not self.levels:
            raise ValueError(f"{self.name}: no levels to search")
        check = {"slim": lambda v: 0 < v < 1, "mask": lambda v: 0 < v < 1,
                 "quant": lambda v: isinstance(v, int) and 1 <= v <= 16}[self.name]
        bad = [v for v in self.levels if not check(v)]
        if bad:
            what = "integer bits in 1..16" if self.name == "quant" else "fractions in (0, 1)"
            raise ValueError(f"{self.name} levels must be {what}, got {bad}")
        # more aggressive = larger ratio/sparsity, fewer bits
        key = (lambda v: -v) if self.name == "quant" else (lambda v: v)
        ordered = tuple(sorted(set(self.levels), key=key))
        if ordered != self.levels:
            object.__setattr__(self, "levels", ordered)

    def spec(self, level: float | int) -> str:
        """The pass pipeline text of one setting."""
        option = {"slim": "ratio", "mask": "sparsity", "quant": "bits"}[self.name]
        return f"{self.name}({option}={level!r})"


def make_stages(order: tuple[str, ...] | list[str],
                levels: dict[str, tuple[float | int, ...]] | None = None) -> list[Stage]:
    levels = levels or {}
    if len(set(order)) != len(order):
        raise ValueError(f"--order names a stage twice: {','.join(order)}")
    return [Stage(name, tuple(levels.get(name) or DEFAULT_LEVELS.get(name, ()))) for name in order]


@dataclass
class State:
    """A model reached by accepted steps. ``key`` names the path exactly (which
    setting, and whether it was fine-tuned or only BatchNorm-recalibrated), so two
    states with the same key hold the same weights."""

    gm: fx.GraphModule
    steps: tuple[str, ...] = ()  # pass specs, e.g. ("slim(ratio=0.3)", "mask(sparsity=0.8)")
    key: str = "base"
    prefix: str = ""  # "l1(...)" when the model was sparsity-trained first
    candidate: "Candidate | None" = None  # the measurement that accepted this state
    val_accuracy: float | None = None  # measured on all of val, or estimated from a screen

    @property
    def pipeline(self) -> str:
        return ",".join(s for s in (self.prefix, *self.steps) if s)

    def constrainers(self) -> list[Any]:
        """Pass objects whose training hooks keep this state's masks and shared
        weights through fine-tuning. Unrun passes capture their layers from the
        weights themselves (zeros, distinct values), so rebuilding them from text
        is exact, also after a resume."""
        passes = build_pipeline(",".join(self.steps)) if self.steps else []
        return [p for p in passes if callable(getattr(p, "training_hooks", None))]

    def quantized_layers(self) -> list[str]:
        names: list[str] = []
        for p in build_pipeline(",".join(self.steps)) if self.steps else []:
            if getattr(p, "name", "") == "quant":
                names += [n for n in p.plan(self.gm) if n not in names]
        return names


@dataclass
class Candidate:
    """One measured setting: a row of ``report.json``.

    ``phase``: ``screen`` (BatchNorm recalibration, accuracy on the screening
    subset of val), ``val`` (recalibration, accuracy on all of val) or ``finetune``
    (recalibration and fine-tuning, accuracy on all of val). ``status`` is ``ok`` or
    ``failed`` (training diverged: the candidate was rolled back)."""

    key: str
    search: str
    pipeline: str
    stage: str
    level: float | int | None
    phase: str
    accuracy: float | None
    n: int
    meets: bool
    size_bytes: int
    params: int
    finetune_epochs: float
    seconds: float
    status: str = "ok"
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        acc = "failed" if self.status != "ok" else f"{self.accuracy:.4f}"
        if "estimate" in self.extra:
            acc += f" (val estimate {self.extra['estimate']:.4f})"
        verdict = "meets" if self.meets else "misses"
        ft = f", fine-tuned {self.finetune_epochs:g} ep" if self.phase == "finetune" else ""
        return (f"[{self.search} {self.phase:8s}] {self.pipeline or 'baseline'}: acc {acc} on {self.n} "
                f"({verdict}), {self.size_bytes / 1024:.1f} KiB{ft}, {self.seconds:.1f}s"
                + (f" ({self.reason})" if self.reason else ""))
