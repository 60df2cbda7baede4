"""What a search works with: stages (a pass and its ladder of settings), states
(a model reached by a chain of accepted steps) and candidates (one measured
setting), the last being the rows of ``report.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import fx

from ..passes import GraphPass, build_pipeline, check_levels, codebook_layers, pass_class, searchable_passes


@dataclass(frozen=True)
class Stage:
    """One technique (a registered pass with a search knob) and the settings the
    search may give it, least aggressive first. Levels default to the knob's ladder."""

    name: str
    levels: tuple[float | int, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in searchable_passes():
            raise ValueError(f"unknown stage {self.name!r}; stages are {', '.join(searchable_passes())}")
        cls = pass_class(self.name)
        object.__setattr__(self, "levels", check_levels(cls, self.levels or cls.knob.ladder))

    @property
    def option(self) -> str:
        return pass_class(self.name).knob.option

    def spec(self, level: float | int, layers: dict[str, float | int] | None = None) -> str:
        """The pass pipeline text of one setting, with ``layers`` set apart from it
        (``{layer: level}``, for a pass whose knob has a per-layer option)."""
        if not layers:
            return f"{self.name}({self.option}={level!r})"
        return f"{self.name}({self.option}={level!r},{self.per_layer}={dict(sorted(layers.items()))!r})"

    @property
    def per_layer(self) -> str | None:
        return pass_class(self.name).knob.per_layer

    @property
    def layer_screens(self) -> bool:
        return pass_class(self.name).knob.layer_screens


def make_stages(order: tuple[str, ...] | list[str],
                levels: dict[str, tuple[float | int, ...]] | None = None) -> list[Stage]:
    levels = levels or {}
    if len(set(order)) != len(order):
        raise ValueError(f"--order names a stage twice: {','.join(order)}")
    return [Stage(name, tuple(levels.get(name) or ())) for name in order]


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

    @property
    def tuned(self) -> bool:
        """Whether the weights were fine-tuned in this search (here or on the path to
        here): every fine-tune marks its key ``@ft``, and children extend the key."""
        return "@ft" in self.key

    def passes(self) -> list[GraphPass]:
        """The state's passes, rebuilt from their text. Unrun passes capture their
        layers from the weights themselves (zeros, distinct values), so their
        training constraints start from this state's masks and shared values, also
        after a resume."""
        return build_pipeline(",".join(self.steps)) if self.steps else []

    def codebook_layers(self) -> dict[str, int]:
        """``{layer: bits}`` of the layers whose weights this state's passes share."""
        return codebook_layers(self.passes(), self.gm)


_NUMBER = (int, float)
# (field, accepted types, required): what a journal record must hold to be replayed.
_RECORD_FIELDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("key", (str,), True), ("search", (str,), True), ("pipeline", (str,), True), ("stage", (str,), True),
    ("level", (int, float, type(None)), True), ("phase", (str,), True), ("accuracy", (int, float, type(None)), True),
    ("n", (int,), True), ("meets", (bool,), True), ("size_bytes", (int,), True), ("params", (int,), True),
    ("finetune_epochs", _NUMBER, True), ("seconds", _NUMBER, True), ("status", (str,), False),
    ("reason", (str,), False), ("extra", (dict,), False),
)


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

    @classmethod
    def from_record(cls, record: Any) -> "Candidate":
        """A candidate from a journal record, checked field by field (the file may
        be cut, edited or foreign); ``ValueError`` names the first field that is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"a {type(record).__name__}, not a record")
        for name, kinds, required in _RECORD_FIELDS:
            if name not in record:
                if required:
                    raise ValueError(f"no {name!r}")
                continue
            value = record[name]
            if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
                raise ValueError(f"{name!r} is {value!r:.60}, not {' or '.join(k.__name__ for k in kinds)}")
        if record.get("accuracy") is not None and not 0.0 <= record["accuracy"] <= 1.0:
            raise ValueError(f"'accuracy' {record['accuracy']!r} is not in [0, 1]")
        return cls.from_dict(record)

    def summary(self) -> str:
        acc = "failed" if self.status != "ok" else f"{self.accuracy:.4f}"
        if "estimate" in self.extra:
            acc += f" (val estimate {self.extra['estimate']:.4f})"
        # the baseline is measured before the target exists (a relative one is taken from it)
        verdict = "" if self.stage == "baseline" else " (meets)" if self.meets else " (misses)"
        ft = f", fine-tuned {self.finetune_epochs:g} ep" if self.phase == "finetune" else ""
        return (f"[{self.search} {self.phase:8s}] {self.pipeline or 'baseline'}: acc {acc} on {self.n}"
                f"{verdict}, {self.size_bytes / 1024:.1f} KiB{ft}, {self.seconds:.1f}s"
                + (f" ({self.reason})" if self.reason else ""))
