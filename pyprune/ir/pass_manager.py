"""Passes on the graph IR and the manager that runs them in order.

A pass is a plain callable that takes a ``GraphModule`` and returns a
:class:`PassResult` (or just the ``GraphModule``). The manager runs an ordered
pipeline and, after every pass, lints the graph, propagates shapes again,
optionally compares the outputs with those before the pass, and records
parameters, bytes and MACs. A pass that breaks any check is named in the error.

A pass that changes the model's outputs on purpose (masking, quantization) sets
the attribute ``changes_outputs = True`` and is exempt from the numeric check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import fx

from .accounting import layer_stats, totals
from .modules import in_mode
from .shape_prop import propagate_shapes


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool = True
    record: dict[str, Any] = field(default_factory=dict)  # what the pass changed, for reports


GraphPass = Callable[[fx.GraphModule], Union[PassResult, fx.GraphModule]]


@dataclass
class PassStats:
    name: str
    modified: bool
    record: dict[str, Any]
    params: int
    bytes: int
    macs: int
    max_abs_diff: float | None  # against the outputs before this pass; None when not checked
    seconds: float


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    stats: list[PassStats]  # first row describes the input graph


class PassCheckError(RuntimeError):
    """A pass left the graph malformed, unpropagatable, or numerically changed."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"after pass '{pass_name}': {message}")
        self.pass_name = pass_name


def pass_name(p: GraphPass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _run_eval(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with in_mode(gm, training=False), torch.no_grad():
        return gm(*inputs)


class PassManager:
    """Run ``passes`` in order on a graph, checking the graph after each one.

    ``example_inputs`` drive shape propagation and the numeric check;
    ``check_numerics`` compares each output-preserving pass's outputs with the
    outputs before it, to ``atol``. ``after_pass(name, graph_module)`` runs after
    each pass has been checked, before its statistics are taken: the place for
    fine-tuning between passes."""

    def __init__(self, passes: Sequence[GraphPass], example_inputs: Sequence[torch.Tensor],
                 check_numerics: bool = False, atol: float = 1e-4,
                 after_pass: Callable[[str, fx.GraphModule], None] | None = None) -> None:
        self.passes = list(passes)
        self.example_inputs = tuple(example_inputs)
        self.check_numerics = check_numerics
        self.atol = atol
        self.after_pass = after_pass

    def _stats(self, name: str, gm: fx.GraphModule, modified: bool, record: dict,
               diff: float | None, seconds: float) -> PassStats:
        t = totals(layer_stats(gm))
        return PassStats(name, modified, record, t.params, t.bytes, t.macs, diff, seconds)

    def run(self, gm: fx.GraphModule) -> PipelineResult:
        propagate_shapes(gm, *self.example_inputs)
        reference = _run_eval(gm, self.example_inputs) if self.check_numerics else None
        stats = [self._stats("input", gm, False, {}, None, 0.0)]
        for p in self.passes:
            name = pass_name(p)
            start = time.perf_counter()
            result = p(gm)
            seconds = time.perf_counter() - start
            if isinstance(result, fx.GraphModule):
                result = PassResult(result)
            if not isinstance(result, PassResult):
                raise PassCheckError(name, f"returned {type(result).__name__}, expected a GraphModule or PassResult")
            gm = result.graph_module
            try:
                gm.graph.lint()
                gm.recompile()
                propagate_shapes(gm, *self.example_inputs)
            except Exception as exc:
                raise PassCheckError(name, f"the graph is invalid: {type(exc).__name__}: {exc}") from exc
            diff = None
            if reference is not None:
                output = _run_eval(gm, self.example_inputs)
                if not getattr(p, "changes_outputs", False):
                    diff = _max_abs_diff(reference, output)
                    if not diff <= self.atol:
                        raise PassCheckError(name, f"outputs changed by {diff:.3g} (tolerance {self.atol:g})")
                reference = output
            if self.after_pass is not None:
                self.after_pass(name, gm)
                if reference is not None:  # fine-tuning moves the outputs on purpose
                    reference = _run_eval(gm, self.example_inputs)
            stats.append(self._stats(name, gm, result.modified, result.record, diff, seconds))
        return PipelineResult(gm, stats)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a - b).abs().max().item() if a.numel() else 0.0
