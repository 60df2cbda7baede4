"""What a compile is asked to do: :class:`CompileConfig`, checked before any work,
and its fingerprint, which a resumed compile must match."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import DataSpec
from ..models import LoadedModel
from ..passes import pass_class
from ..search import Stage, Target, make_stages
from ..search.marginal import RECOVERY_MODELS
from ..train import TrainConfig

# The paper's order: structured slimming first, then deep compression's pruning and sharing.
DEFAULT_ORDER = ("slim", "mask", "quant")
# --val-from: (the split the search validates on, the split the final model is tested on)
VAL_FROM = {"train": ("val", "test"), "test": ("test-search", "test-report")}
# marginal: the trade-off search (pyprune.search.marginal); heuristic: stage by stage,
# each stage's boundary by bisection; grid: every combination (the brute-force baseline)
SEARCHES = ("marginal", "heuristic", "grid")
MEASURE_FROM = ("accepted", "baseline")  # where the marginal search's deciding measurements start


@dataclass
class CompileConfig:
    target: Target
    output: Path
    search: str = "marginal"  # or "heuristic", "grid"
    order: tuple[str, ...] = DEFAULT_ORDER
    explore_order: bool = False
    levels: dict[str, tuple[float | int, ...]] = field(default_factory=dict)
    finetune_epochs: float = 0.1
    slim_l1: float = 0.0
    l1_epochs: float = 1.0
    budget_minutes: float | None = None
    val_from: str = "train"
    val_limit: int | None = 2500
    screen_limit: int = 1000
    test_limit: int | None = None
    train_limit: int | None = None
    recal_images: int = 1024
    margin: float = 0.1
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))
    data: DataSpec | str = "cifar10"
    resume: bool = False
    force: bool = False
    quiet: bool = False
    onnx: bool = True  # write model.onnx (False: --no-onnx; `pyprune export-onnx` writes it from model.ppz later)
    onnx_verify: int = 256
    fold_batchnorm: bool = True  # write BatchNorm folded for inference (bnfold) where the target holds
    # Recovery: every fine-tune distils from the uncompressed model (0: labels only), and
    # the chosen model gets final_epochs more, kept only if it still meets the target.
    distill: float = 0.5
    distill_temperature: float = 4.0
    final_epochs: float = 0.0
    continue_lr: float | None = None  # fine-tunes of already fine-tuned models (EvalSettings); None: train.lr
    # The most fine-tuning of one candidate, in multiples of --finetune-epochs: a near
    # miss is trained on at twice its effort, and the marginal search's last phase
    # retries untaken moves with 2x, 4x ... this many, while the budget lasts (1: never).
    # None: 8 when there is a budget to spend, 1 without one (so an unbounded compile
    # does not run for hours).
    max_effort: int | None = None
    per_layer: bool = True  # after the marginal search, push single layers further (pyprune.search.layerwise)
    gradual_mask: bool = False  # deciding candidates reach their mask during fine-tuning (EvalSettings)
    screen_steps: int = 0  # fine-tuning steps in every screen, after recalibration (EvalSettings)
    measure_from: str = "accepted"  # or "baseline" (pyprune.search.marginal_oracle)
    recovery: str = "additive"  # or "proportional": how the marginal search expects fine-tuning to recover

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.data = DataSpec.of(self.data)
        if self.search not in SEARCHES:
            raise ValueError(f"--search must be heuristic or grid, got {self.search!r}")
        if self.val_from not in VAL_FROM:
            raise ValueError(f"--val-from must be train or test, got {self.val_from!r}")
        for flag, value in (("--finetune-epochs", self.finetune_epochs), ("--slim-l1", self.slim_l1),
                            ("--recover-margin", self.margin), ("--final-epochs", self.final_epochs)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--val-limit", self.val_limit), ("--screen-limit", self.screen_limit),
                            ("--test-limit", self.test_limit), ("--train-limit", self.train_limit),
                            ("--recal-images", self.recal_images)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.measure_from not in MEASURE_FROM:
            raise ValueError(f"--measure-from must be accepted or baseline, got {self.measure_from!r}")
        if self.recovery not in RECOVERY_MODELS:
            raise ValueError(f"--recovery-model must be additive or proportional, got {self.recovery!r}")
        if self.screen_steps < 0:
            raise ValueError(f"--screen-steps must be >= 0, got {self.screen_steps}")
        if self.max_effort is None:
            self.max_effort = 8 if self.budget_minutes is not None else 1
        if self.max_effort < 1 or self.max_effort & (self.max_effort - 1):
            raise ValueError(f"--max-effort must be a power of two >= 1, got {self.max_effort}")
        if self.continue_lr is not None and not self.continue_lr > 0:
            raise ValueError(f"--continue-lr must be positive, got {self.continue_lr}")
        if self.onnx_verify < 0:
            raise ValueError(f"--onnx-verify must be >= 0, got {self.onnx_verify}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.slim_l1 > 0 and self.l1_epochs <= 0:
            raise ValueError("--slim-l1 needs --l1-epochs > 0")
        self.stages = make_stages(tuple(self.order), self.levels)  # validates order and levels
        if self.slim_l1 > 0 and self.sparsity_trained_stage() is None:
            raise ValueError("--slim-l1 schedules sparsity training for a stage that gains from it (network "
                             "slimming), but --order has no such stage")
        if self.search == "grid" and (self.explore_order or self.slim_l1 > 0):
            raise ValueError("--explore-order and --slim-l1 belong to the heuristic and marginal searches, "
                             "not to --search grid")
        # checked here, before any work, with the flags' names
        self.train = replace(self.train, distill=self.distill, distill_temperature=self.distill_temperature)

    @property
    def splits(self) -> tuple[str, str]:
        """(validation split, test split)."""
        return VAL_FROM[self.val_from]

    def sparsity_trained_stage(self) -> Stage | None:
        """The stage whose pass gains from network slimming's sparsity training, if any."""
        return next((s for s in self.stages if pass_class(s.name).gains_from_sparsity_training), None)

    def fingerprint(self, model: LoadedModel) -> dict[str, Any]:
        """The settings that decide the search's results (a resume must match)."""
        digest = hashlib.sha256()
        for k, v in sorted(model.module.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        t = self.train
        return {"model": model.name, "weights": digest.hexdigest()[:16], "target": self.target.to_dict(),
                "search": self.search, "order": list(self.order), "explore_order": self.explore_order,
                "levels": {s.name: list(s.levels) for s in self.stages}, "finetune_epochs": self.finetune_epochs,
                "slim_l1": self.slim_l1, "l1_epochs": self.l1_epochs, "val_from": self.val_from,
                "val_limit": self.val_limit, "screen_limit": self.screen_limit, "train_limit": self.train_limit,
                "recal_images": self.recal_images, "margin": self.margin, "data": self.data.name,
                "lr": t.lr, "batch_size": t.batch_size, "seed": t.seed, "distill": self.distill,
                "distill_temperature": self.distill_temperature, "final_epochs": self.final_epochs,
                "max_effort": self.max_effort, "per_layer": self.per_layer,
                **({"gradual_mask": True} if self.gradual_mask else {}),
                **({"screen_steps": self.screen_steps} if self.screen_steps else {}),
                **({"continue_lr": self.continue_lr} if self.continue_lr is not None else {}),
                **({"measure_from": self.measure_from} if self.measure_from != "accepted" else {}),
                **({"recovery": self.recovery} if self.recovery != "additive" else {}),
                # only when off, so that journals written before the switch existed still resume
                **({} if t.sync_batchnorm else {"sync_batchnorm": False})}
