"""``pyprune opt``: run a pass pipeline on a model, with optional sparsity training
before it and fine-tuning after each pass, measuring every step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from .data import ArrayDataset, DataSpec
from .ir import PassManager, example_input, layer_stats, propagate_shapes, totals, trace
from .passes import GraphPass, build_pipeline, codebooks_of, constraint_hooks
from .train import TrainConfig, evaluate, fine_tune

__all__ = ["OptConfig", "OptResult", "OptStep", "constraint_hooks", "optimize"]


@dataclass
class OptStep:
    """The model after one step: its size, and its accuracy on the evaluation split."""

    name: str
    params: int
    bytes: int
    macs: int
    accuracy: float | None
    accuracy_before_training: float | None  # right after the pass, before fine-tuning
    train_epochs: float
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OptResult:
    graph_module: fx.GraphModule
    steps: list[OptStep]
    pipeline: str
    passes: list[GraphPass] = field(default_factory=list)  # the pipeline's passes, run

    def provenance(self) -> list[dict[str, Any]]:
        """Every step, for the saved file's manifest. Codebooks are left out: the
        container stores them with their tensors, and twice as JSON text would
        cost more than the quantized weights of a small model. So are timings: the
        same input and seed must give the same file, byte for byte."""
        return [{k: v for k, v in step.items() if k != "seconds"} for step in self.report()]

    def report(self) -> list[dict[str, Any]]:
        """Every step as ``--json`` prints it: the provenance with each step's seconds."""
        return [_without_codebooks(s.to_dict()) for s in self.steps]

    def codebooks(self) -> dict[str, torch.Tensor]:
        """Codebooks of the layers whose weights the pipeline shared, read from the
        final weights (centroid fine-tuning moves them after the pass recorded them)."""
        return codebooks_of(self.passes, self.graph_module)

    def summaries(self) -> list[str]:
        """What each pass says it did, one line each, for those that say something."""
        lines = [p.summary(step.record) for p, step in zip(self.passes, self.steps[-len(self.passes):])] \
            if self.passes else []
        return [line for line in lines if line]


def _without_codebooks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_codebooks(v) for k, v in value.items() if k not in ("codebook", "codebooks")}
    if isinstance(value, list):
        return [_without_codebooks(v) for v in value]
    return value


@dataclass
class OptConfig:
    pipeline: str
    finetune_epochs: float = 0.0
    slim_l1: float = 0.0  # sparsity training on BatchNorm gammas before the pipeline
    l1_epochs: float = 0.0
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_split: str | None = "val"  # None: do not measure accuracy
    eval_limit: int | None = None
    train_limit: int | None = None
    data: DataSpec | str = "cifar10"

    def __post_init__(self) -> None:
        self.data = DataSpec.of(self.data)
        if self.slim_l1 < 0 or self.l1_epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("--slim-l1, --l1-epochs and --finetune-epochs must be >= 0")
        if (self.slim_l1 > 0) != (self.l1_epochs > 0):
            raise ValueError("sparsity training needs both --slim-l1 and --l1-epochs")


def _size(module: nn.Module, input_shape: tuple[int, ...], leaf_modules: Sequence[str]) -> tuple[int, int, int]:
    gm = module if isinstance(module, fx.GraphModule) else trace(module, leaf_modules=leaf_modules)
    t = totals(layer_stats(propagate_shapes(gm, example_input(input_shape))))
    return t.params, t.bytes, t.macs


def optimize(module: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
             input_shape: tuple[int, ...], config: OptConfig,
             log: Callable[[str], None] = lambda _: None, leaf_modules: Sequence[str] = ()) -> OptResult:
    """Sparsity-train (optional), trace (keeping ``leaf_modules`` whole), then run
    ``config.pipeline``; after each pass fine-tune for ``finetune_epochs`` (optional)
    and measure. ``module`` is changed."""
    passes = build_pipeline(config.pipeline)  # parse first: a typo should not cost a training run
    train_set: ArrayDataset | None = None
    if config.finetune_epochs > 0 or config.l1_epochs > 0:
        train_set = config.data.load("train", config.train_limit, input_shape)
    eval_set = None
    if config.eval_split:
        eval_set = config.data.load(config.eval_split, config.eval_limit, input_shape)

    def accuracy_of(model: nn.Module) -> float | None:
        if eval_set is None:
            return None
        return evaluate(model, eval_set, mean, std, progress=config.train.progress).accuracy

    def report(step: OptStep) -> OptStep:
        acc = f"{step.accuracy:.4f}" if step.accuracy is not None else "-"
        if step.accuracy_before_training is not None:
            acc = f"{step.accuracy_before_training:.4f} -> {acc} after fine-tuning"
        log(f"{step.name}: {step.params:,} params, {step.macs / 1e6:.1f}M MACs, "
            f"{config.eval_split or 'no'} accuracy {acc}, {step.seconds:.1f}s")
        return step

    def measure(name: str, model: nn.Module, epochs: float, seconds: float, record: dict | None = None) -> OptStep:
        params, nbytes, macs = _size(model, input_shape, leaf_modules)
        return report(OptStep(name, params, nbytes, macs, accuracy_of(model), None, epochs, seconds, record or {}))

    steps = [measure("input", module, 0.0, 0.0)]
    if config.l1_epochs > 0:
        start = time.perf_counter()
        fine_tune(module, train_set, mean, std, replace(config.train, epochs=config.l1_epochs, slim_l1=config.slim_l1))
        steps.append(measure("l1", module, config.l1_epochs, time.perf_counter() - start,
                             {"slim_l1": config.slim_l1}))

    gm = propagate_shapes(trace(module, leaf_modules=leaf_modules), example_input(input_shape))
    measured: list[tuple[float | None, float | None, float]] = []  # per pass: accuracies, seconds
    clock = time.perf_counter()

    # The passes run so far, whose constraints (masks, shared weights) fine-tuning must
    # keep. The manager calls after_pass once per pass, in order.
    done: list[GraphPass] = []

    def after_pass(name: str, g: fx.GraphModule) -> None:
        nonlocal clock
        done.append(passes[len(done)])
        before = None
        if config.finetune_epochs > 0:
            before = accuracy_of(g)
            fine_tune(g, train_set, mean, std, replace(config.train, epochs=config.finetune_epochs, slim_l1=0.0),
                      hooks=constraint_hooks(done, g))
        measured.append((accuracy_of(g), before, time.perf_counter() - clock))
        clock = time.perf_counter()

    result = PassManager(passes, (example_input(input_shape),), after_pass=after_pass).run(gm)
    for stats, (accuracy, before, seconds) in zip(result.stats[1:], measured):
        steps.append(report(OptStep(stats.name, stats.params, stats.bytes, stats.macs, accuracy, before,
                                    config.finetune_epochs, seconds, stats.record)))
    return OptResult(result.graph_module, steps, config.pipeline, passes)
