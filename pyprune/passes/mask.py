"""mask: magnitude pruning of Conv and Linear weights (deep compression, step 1).

Needs: a ``GraphModule`` whose layers are ``call_module`` nodes of ``nn.Conv*d``
(transposed included) or ``nn.Linear``. Functional convolutions on ``get_attr``
weights are not layers here and are left alone. Biases and BatchNorm are never
touched.

Guarantees: the pruned weights are set to exactly ``0.0`` in place; nothing else
changes (shapes, graph, other parameters). The mask is implied by the exact zeros,
so it survives save/load with no extra state. With ``scope="layer"`` a layer of
``n`` weights ends with exactly ``round(S * n)`` zeros (Python's ``round``), the
smallest ``|w|`` going first and ties broken by flat index, lowest first. With
``scope="global"`` one threshold over the ``|w|`` of every globally pruned layer
removes exactly ``round(S * N)`` of their ``N`` weights (same tie rule, layers in
graph order), so small layers may lose more or less than ``S``. Overridden layers
(``layers={name: sparsity}``) get their own exact per-layer count in both scopes.
Zeros already present count as the smallest weights; the pass never un-prunes, so
a layer already sparser than asked stays as it is.

Refuses: sparsity outside ``[0, 1]``, unknown scopes or layer kinds, and names in
``layers`` that are not included layers of the graph. Layers with fewer than
``min_params`` weights are skipped unless named in ``layers``.

Fine-tuning: with ``regrow=True``, the default, the weights train straight through
(:meth:`MaskPass.projection`): the optimizer steps full-precision latent weights,
pruned ones included, and after every step the pass's own rule runs on them, so
the count of zeros stays exact while a pruned weight that has grown larger than a
kept one comes back in its place (pruning with feedback, Lin et al. 2020). With
``regrow=False`` :func:`mask_hooks` keep the zero set itself: they zero the masked
gradients after backward and re-apply the mask after every optimizer step, so masked
weights stay exactly zero under SGD with momentum and weight decay. :class:`GradualMask` reaches the
pass's zeros during fine-tuning instead, on Zhu & Gupta's cubic schedule
(:func:`cubic_sparsity`). :func:`sensitivity_scan` prunes one layer at a time to find
how much each tolerates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..ir import PassResult
from .base import GraphPass, Knob, Option, Range
from .constraints import Projection, TrainHooks
from .layers import parse_include, present_layers, weight_layers
from .registry import register_pass

SCOPES = ("global", "layer")


def _check_sparsity(s: float, what: str) -> float:
    s = float(s)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {s}")
    return s


def smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of the ``k`` smallest entries of the 1-D ``values``, ties broken
    by index (lowest first): the first ``k`` of a stable sort, found by selection
    (``kthvalue``) rather than a sort, because fine-tuning with regrowth runs it
    after every step."""
    drop = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k <= 0:
        return drop
    if k >= values.numel():
        return ~drop
    kth = torch.kthvalue(values, k).values
    drop = values < kth
    ties = torch.nonzero(values == kth).reshape(-1)
    drop[ties[:k - int(drop.sum())]] = True
    return drop


def prune_layer(weight: torch.Tensor, sparsity: float) -> int:
    """Zero exactly ``round(sparsity * n)`` of ``weight`` by magnitude (at least that
    many if more are zero already), in place; returns the number of zeros."""
    with torch.no_grad():
        k = int(round(sparsity * weight.numel()))
        flat = weight.detach().reshape(-1)  # a copy for channels_last weights: write back below
        weight.masked_fill_(smallest(flat.abs(), k).view(weight.shape), 0.0)
        return int((weight == 0).sum())


def _layer_record(weight: torch.Tensor, asked: float, how: str) -> dict[str, Any]:
    n = weight.numel()
    zeros = int((weight == 0).sum())
    return {"params": n, "zeros": zeros, "sparsity": zeros / max(n, 1), "asked": asked, "by": how}


@register_pass
class MaskPass(GraphPass):
    """zero the smallest |w| of conv and linear weights (magnitude pruning; deep compression, step 1)"""

    name = "mask"
    changes_outputs = True
    options = (
        Option("sparsity", float, 0.5, "share of the weights set to zero", Range(0.0, 1.0)),
        Option("scope", str, "global", "global: one |w| threshold over all layers; layer: exactly round(S*n) "
               "zeros per layer", choices=SCOPES),
        Option("layers", dict, None, "{layer: sparsity} overrides, each pruned to its own exact count"),
        Option("include", (str, list, tuple), "conv,linear", "layer kinds pruned: conv, linear or both"),
        Option("min_params", int, 0, "skip layers with fewer weights (unless named in layers)", Range(0)),
        Option("regrow", bool, True, "fine-tuning: weights train straight through and the rule runs again after "
               "every step, so a pruned weight that grows back past a kept one returns (the count stays exact); "
               "False keeps the zero set"),
    )
    # Bisection makes long ladders cheap: 16 sparsities cost about 4 screens.
    knob = Knob("sparsity", (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97,
                             0.98), range=Range(0.0, 1.0, low_open=True, high_open=True), flag="--mask-levels",
                per_layer="layers")
    training_constraint = ("the same number of zeros (by the same rule: a pruned weight may come back in place of "
                           "a smaller one with regrow, the default; with regrow=False the same zeros)")
    gradual = True
    examples = (("mask(sparsity=0.8)", "zero the 80% smallest |w| of all conv/linear weights (one global threshold)"),
                ("mask(sparsity=0.7,scope=layer,layers={'linear':0.9})", "70% of every layer, 90% of 'linear'"))

    def __init__(self, sparsity: float = 0.5, scope: str = "global", layers: Mapping[str, float] | None = None,
                 include: str | Sequence[str] = "conv,linear", min_params: int = 0, regrow: bool = True) -> None:
        self.check_options(dict(sparsity=sparsity, scope=scope, layers=layers, include=include,
                                min_params=min_params, regrow=regrow))
        self.regrow = regrow
        self.sparsity = float(sparsity)
        self.scope = scope
        self.layers = {str(k): _check_sparsity(v, f"sparsity of layer {k!r}") for k, v in (layers or {}).items()}
        self.include = parse_include(include)
        self.min_params = int(min_params)
        self.pruned: list[str] | None = None  # layer names, once the pass has run

    def select(self, gm: fx.GraphModule) -> tuple[list[str], dict[str, float]]:
        """(layers under the global/layer rule, overridden layers with their sparsity)."""
        names = weight_layers(gm, self.include)
        unknown = sorted(set(self.layers) - set(names))
        if unknown:
            raise ValueError(f"mask layers not among the included {'/'.join(self.include)} layers of the graph: "
                             f"{', '.join(unknown)}")
        overridden = {n: self.layers[n] for n in names if n in self.layers}
        ruled = [n for n in names if n not in self.layers
                 and gm.get_submodule(n).weight.numel() >= self.min_params]
        return ruled, overridden

    def _prune(self, weights: Mapping[str, torch.Tensor], ruled: Sequence[str],
               overridden: Mapping[str, float]) -> float | None:
        """Zero ``weights`` (by layer name) in place by the pass's rule; the global
        threshold (the largest |w| pruned), if there is one."""
        threshold = None
        for name, s in overridden.items():
            prune_layer(weights[name], s)
        if self.scope == "layer":
            for name in ruled:
                prune_layer(weights[name], self.sparsity)
        elif ruled:
            with torch.no_grad():
                flat = torch.cat([weights[n].detach().reshape(-1).abs() for n in ruled])
                k = int(round(self.sparsity * flat.numel()))
                drop = smallest(flat, k)
                if k:
                    threshold = float(flat[drop].max())
                offset = 0
                for n in ruled:
                    w = weights[n]
                    w.masked_fill_(drop[offset:offset + w.numel()].view(w.shape), 0.0)
                    offset += w.numel()
        return threshold

    def call(self, gm: fx.GraphModule) -> PassResult:
        ruled, overridden = self.select(gm)
        weights = {n: gm.get_submodule(n).weight for n in [*ruled, *overridden]}
        before = sum(int((w == 0).sum()) for w in weights.values())
        per_layer: dict[str, dict[str, Any]] = {}
        threshold = self._prune(weights, ruled, overridden)
        for name in weights:
            how = "override" if name in overridden else self.scope
            asked = overridden.get(name, self.sparsity)
            per_layer[name] = _layer_record(weights[name], asked, how)
        total = sum(r["params"] for r in per_layer.values())
        zeros = sum(r["zeros"] for r in per_layer.values())
        self.pruned = list(weights)
        record = {"scope": self.scope, "sparsity": self.sparsity, "threshold": threshold,
                  "params": total, "zeros": zeros, "achieved": zeros / max(total, 1),
                  "layers": per_layer}
        return PassResult(gm, modified=zeros != before, record=record)

    def gradually(self, gm: fx.GraphModule) -> "GradualMask":
        return GradualMask(self, gm)

    def training_hooks(self, gm: fx.GraphModule) -> TrainHooks:
        """How fine-tuning keeps this pass's result (see ``regrow``): the projection,
        or hooks that keep the zeros of ``gm``'s weights now (call it after the pass)."""
        if self.regrow:
            return TrainHooks(projections=[self.projection(gm)])
        names = self.pruned
        if names is None:
            ruled, overridden = self.select(gm)
            names = [*ruled, *overridden]
        return mask_hooks(gm, names)

    def projection(self, gm: fx.GraphModule) -> Projection:
        """The pass's rule as a projection of latent weights (pruning with feedback):
        the same layers (selected in ``gm``), the same exact counts."""
        ruled, overridden = self.select(gm)
        return Projection((*ruled, *overridden), lambda weights: self._prune(weights, ruled, overridden),
                          moves_zeros=True)


def mask_hooks(gm: nn.Module, layer_names: Iterable[str]) -> TrainHooks:
    """Capture ``mask = (weight != 0)`` of the named layers now; the hooks zero the
    masked gradients after backward and the masked weights after each step. The
    hooks look the layers up by name in the model they are given, so they work on
    a model whose parameters were moved or re-laid-out (channels_last) since."""
    masks = {n: (gm.get_submodule(n).weight.detach() == 0) for n in present_layers(gm, layer_names)}
    masks = {n: m for n, m in masks.items() if bool(m.any())}  # dense layers need no hook

    def _check(n: str, w: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        if w.shape != zero.shape:
            raise RuntimeError(f"mask of {n} has shape {tuple(zero.shape)} but the weight is now "
                               f"{tuple(w.shape)}: capture the hooks again after passes that reshape layers")
        if zero.device != w.device:
            zero = masks[n] = zero.to(w.device)
        return zero

    def after_backward(model: nn.Module) -> None:
        for n, zero in masks.items():
            w = model.get_submodule(n).weight
            if w.grad is not None:
                w.grad.masked_fill_(_check(n, w, zero), 0.0)

    def after_step(model: nn.Module) -> None:
        with torch.no_grad():
            for n, zero in masks.items():
                w = model.get_submodule(n).weight
                w.masked_fill_(_check(n, w, zero), 0.0)

    return TrainHooks(after_backward=[after_backward], after_step=[after_step])


def cubic_sparsity(initial: float, final: float, progress: float) -> float:
    """Zhu & Gupta's (2017) schedule: ``final + (initial - final) * (1 - progress)**3``,
    ``progress`` clipped to [0, 1]. It prunes fast while many weights are redundant and
    slowly near the end, where each weight costs more."""
    t = min(max(float(progress), 0.0), 1.0)
    return final + (initial - final) * (1.0 - t) ** 3


def _zero_share(weights: Sequence[torch.Tensor]) -> float:
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


class GradualMask:
    """``mask``'s zeros reached during fine-tuning rather than before it (gradual
    magnitude pruning): every few steps of the first ``ramp`` share of the fine-tune,
    the layers are pruned to :func:`cubic_sparsity` of the way from the zeros they
    have at the start to ``mask``'s sparsities (global threshold or per layer, with
    the same overrides); at the end of the ramp ``mask`` itself runs, so the result
    has exactly the pass's zeros on the weights as trained. Zeros are never given
    back: between prunings the masked weights and their gradients stay zero.

    Use :meth:`hooks` in :func:`~pyprune.train.fine_tune`, then read ``record`` (the
    pass's own record, once it has run)."""

    def __init__(self, mask: MaskPass, gm: fx.GraphModule, ramp: float = 0.75, prunings: int = 8) -> None:
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"the ramp must be a share of the fine-tune in (0, 1], got {ramp}")
        if prunings < 1:
            raise ValueError(f"prunings must be at least 1, got {prunings}")
        self.mask = mask
        self.ramp = float(ramp)
        self.prunings = int(prunings)
        ruled, overridden = mask.select(gm)
        weights = lambda names: [gm.get_submodule(n).weight.detach() for n in names]  # noqa: E731
        self._start = {"": _zero_share(weights(ruled)), **{n: _zero_share(weights([n])) for n in overridden}}
        self._names = [*ruled, *overridden]
        self._ends: list[int] = []  # the step after which each pruning runs
        self._step = 0
        self._zero: dict[str, torch.Tensor] = {}
        self.record: dict[str, Any] | None = None
        self._capture(gm)

    def _capture(self, model: nn.Module) -> None:
        self._zero = {n: model.get_submodule(n).weight.detach() == 0 for n in self._names}

    def _begin(self, total_steps: int) -> None:
        ramp_steps = max(1, int(round(self.ramp * total_steps)))
        n = min(self.prunings, ramp_steps)
        self._ends = sorted({max(1, round(ramp_steps * (i + 1) / n)) for i in range(n)})

    def _prune(self, model: nn.Module, progress: float) -> None:
        if progress >= 1.0:
            self.record = self.mask.call(model).record
        else:
            step = MaskPass(cubic_sparsity(self._start[""], self.mask.sparsity, progress), self.mask.scope,
                            {n: cubic_sparsity(self._start[n], s, progress) for n, s in self.mask.layers.items()
                             if n in self._start},
                            self.mask.include, self.mask.min_params)
            step.call(model)
        self._capture(model)

    def _after_backward(self, model: nn.Module) -> None:
        for n, zero in self._zero.items():
            w = model.get_submodule(n).weight
            if w.grad is not None:
                w.grad.masked_fill_(zero.to(w.grad.device), 0.0)

    def _after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for n, zero in self._zero.items():
                w = model.get_submodule(n).weight
                w.masked_fill_(zero.to(w.device), 0.0)
        self._step += 1
        if self._step in self._ends:
            self._prune(model, self._step / self._ends[-1])  # 1.0 at the last: the pass itself

    def hooks(self) -> TrainHooks:
        return TrainHooks(after_backward=[self._after_backward], after_step=[self._after_step],
                          on_start=[self._begin])

    def finish(self, gm: fx.GraphModule) -> dict[str, Any]:
        """Run ``mask`` now if the fine-tune ended before the ramp did (a diverged or
        cut run), and return its record."""
        if self.record is None:
            self._prune(gm, 1.0)
        return self.record


def sensitivity_scan(gm: nn.Module, evaluate_fn: Callable[[nn.Module], float],
                     sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
                     layers: Sequence[str] | None = None,
                     include: str | Sequence[str] = "conv,linear") -> dict[str, list[tuple[float, float]]]:
    """Prune one layer at a time (layer scope, on a copy of ``gm``) to each of
    ``sparsities`` and return ``{layer: [(sparsity, evaluate_fn(copy)), ...]}``.
    ``gm`` itself is not changed; ``layers`` defaults to every included layer."""
    work = copy.deepcopy(gm)
    if layers is None:
        if not isinstance(work, fx.GraphModule):
            raise ValueError("sensitivity_scan needs layers=... for a model that is not a GraphModule")
        layers = weight_layers(work, include)
    result: dict[str, list[tuple[float, float]]] = {}
    for name in layers:
        weight = work.get_submodule(name).weight
        saved = weight.detach().clone()
        rows = []
        for s in sparsities:
            prune_layer(weight, _check_sparsity(s, "sensitivity sparsity"))
            rows.append((float(s), float(evaluate_fn(work))))
            with torch.no_grad():
                weight.copy_(saved)
        result[name] = rows
    return result
