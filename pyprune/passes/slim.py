"""slim: network slimming's channel elimination, by BatchNorm |gamma|.

Needs: a traced ``GraphModule`` with shapes on every node (the pass manager
provides them). Its channel groups come from :mod:`pyprune.analysis.channels`.

Guarantees: in ``mode="apply"`` the removed channels are physically gone: smaller
Conv, BatchNorm and Linear modules, new pad amounts, groups and view sizes; the
model's output shape is unchanged and its outputs equal those of ``mode="mask"``
(same plan, gamma and beta of the removed channels zeroed, shapes kept) to float
rounding, in eval mode. No layer loses all its channels.

Refuses: channels of groups that touch a barrier (an op with no channel handler),
the graph's inputs or outputs, or that a channel-mixing layer reads where the
masked model is not zero; they stay, and the plan says why.

Selection: each group's score combines the |gamma| of its BatchNorm channels with
``combine`` (default ``max``: a residual channel goes only when it is weak in every
block that writes it). Network slimming's global threshold, with groups in place of
channels: the lowest-scoring ``ratio`` of the prunable groups go, in ascending
score, skipping any whose removal would take a layer below its floor.
(Counting BatchNorm channels instead would make a residual group, written by many
BatchNorms, cost as much as many single channels, so a budget would be spent almost
entirely inside blocks.) ``layer_ratios`` first removes the given share of a named
layer's own channels.

Folding (``fold=True``, the default): a removed channel did not output zero but,
on average, E[act(gamma * z + beta)] for z ~ N(0, 1) (the BatchNorm output is
normalised), which is act(beta) when gamma is near zero. Where a removed channel
reaches a conv or linear layer straight from its BatchNorm through activations,
pooling or flatten, that mean's contribution is added to the layer's bias, or taken
off the running mean of the BatchNorm that alone reads the layer, so accuracy before
fine-tuning drops less. ``mask`` folds the same way, so apply and mask stay equal.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from ..analysis import ChannelAnalysis, analyze_channels, handler_for
from ..ops.rewrite import Rewriter
import torch.nn.functional as F

from ..ir import PassResult, output_shape, propagate_shapes
from .base import GraphPass, Knob, Option, Range
from .registry import register_pass

COMBINE = {"max": np.max, "sum": np.sum, "mean": np.mean}


@dataclass
class LayerRow:
    name: str
    op: str
    before: int
    after: int


@dataclass
class SlimPlan:
    """Which channel groups go. Inspect with :meth:`table` and :meth:`summary`."""

    analysis: ChannelAnalysis
    removed: list[int]  # group ids
    ratio: float
    combine: str
    scores: dict[int, float]
    total_bn_channels: int
    layers: list[LayerRow] = field(default_factory=list)
    fold: bool = True

    @property
    def achieved_ratio(self) -> float:
        """Share of the prunable groups removed."""
        return len(self.removed) / max(len(self.analysis.prunable_groups), 1)

    @property
    def removed_bn_channels(self) -> int:
        return sum(len(self.analysis.groups[g].bn_channels) for g in self.removed)

    def keep(self) -> dict[fx.Node, np.ndarray]:
        """Channels kept by every channel-carrying node."""
        gone = np.zeros(len(self.analysis.groups), dtype=bool)
        gone[self.removed] = True
        return {n: np.flatnonzero(~gone[self.analysis.group_ids(n)]) for n in self.analysis.base}

    def summary(self) -> dict:
        groups = self.analysis.groups
        refused = Counter(g.reason.split(" '")[0].split(" (")[0] for g in groups if not g.prunable)
        return {"ratio": self.ratio, "combine": self.combine, "achieved_ratio": self.achieved_ratio,
                "groups": len(groups), "prunable_groups": len(self.analysis.prunable_groups),
                "removed_groups": len(self.removed), "removed_bn_channels": self.removed_bn_channels,
                "total_bn_channels": self.total_bn_channels, "refused": dict(refused),
                "layers": [vars(r) for r in self.layers if r.after != r.before]}

    def table(self) -> str:
        rows = [(r.name, r.op, str(r.before), str(r.after), f"{1 - r.after / r.before:.0%}") for r in self.layers]
        head = ("layer", "op", "before", "after", "removed")
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        s = self.summary()
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows),
                 f"removed {s['removed_groups']}/{s['prunable_groups']} prunable channel groups "
                 f"({s['achieved_ratio']:.1%}, asked {self.ratio:.1%}; {s['groups']} groups in all), "
                 f"{s['removed_bn_channels']}/{s['total_bn_channels']} BatchNorm channels"]
        return "\n".join(lines)


def _layer_nodes(gm: fx.GraphModule, analysis: ChannelAnalysis) -> list[fx.Node]:
    """Nodes whose channels are a layer's own: conv, BatchNorm and linear calls."""
    kinds = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)
    return [n for n in analysis.base if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds)]


def plan(gm: fx.GraphModule, ratio: float = 0.5, combine: str = "max", min_channels: int = 1,
         min_keep: float = 0.0, layer_ratios: Mapping[str, float] | None = None, fold: bool = True,
         analysis: ChannelAnalysis | None = None) -> SlimPlan:
    """Choose the channel groups to remove (see the module docstring)."""
    Slim.check_options(dict(ratio=ratio, combine=combine, min_channels=min_channels, min_keep=min_keep))
    analysis = analysis or analyze_channels(gm)
    gammas = {t: gm.get_submodule(t).weight.detach().abs().cpu().numpy() for t, _ in analysis.ctx.batchnorms}
    scores = {g.id: float(COMBINE[combine]([gammas[t][c] for t, c in g.bn_channels]))
              for g in analysis.prunable_groups}
    total_bn = sum(len(v) for v in gammas.values())

    layers = _layer_nodes(gm, analysis)
    width = {n: analysis.size[n] for n in layers}
    floor = {n: max(min_channels, math.ceil(min_keep * width[n])) for n in layers}
    remaining = dict(width)
    group_ids = {n: analysis.group_ids(n) for n in layers}
    # For each prunable group, how many channels of each layer it holds.
    holds: dict[int, Counter] = {g: Counter() for g in scores}
    for n, ids in group_ids.items():
        for g, count in zip(*np.unique(ids, return_counts=True)):
            if int(g) in holds:
                holds[int(g)][n] += int(count)
    removed: list[int] = []
    taken: set[int] = set()

    def take(g: int) -> bool:
        if g in taken or any(remaining[n] - k < floor[n] for n, k in holds[g].items()):
            return False
        for n, k in holds[g].items():
            remaining[n] -= k
        taken.add(g)
        removed.append(g)
        return True

    by_score = sorted(scores, key=lambda g: (scores[g], g))
    for name, layer_ratio in (layer_ratios or {}).items():
        node = analysis.node(name)
        if node not in width:
            raise ValueError(f"layer_ratios names {name!r}, which is not a conv, BatchNorm or linear layer")
        own = set(group_ids[node].tolist())
        target = layer_ratio * width[node]
        for g in by_score:
            if width[node] - remaining[node] >= target:
                break
            if g in own:
                take(g)
    budget = round(ratio * len(scores))
    for g in by_score:
        if len(removed) >= budget:
            break
        take(g)

    rows = [LayerRow(str(n.target), type(gm.get_submodule(n.target)).__name__, width[n], remaining[n])
            for n in layers]
    return SlimPlan(analysis, sorted(removed), ratio, combine, scores, total_bn, rows, fold)


# Ops a removed channel's constant passes through on its way to a reader: activations
# map it, pooling and dropout keep it (up to zero-padded borders, hence "approximately").
_CONST_MAPS: dict = {nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.Hardswish: F.hardswish, nn.SiLU: F.silu,
                     nn.GELU: F.gelu, F.relu: F.relu, torch.relu: F.relu, F.relu6: F.relu6}
_CONST_KEEPS = (nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_CONST_KEEP_FNS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout)


def _constant_source(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, list] | None:
    """The BatchNorm that ``node`` comes from through constant-preserving ops, and
    the activations on the way (in order), or None."""
    maps = []
    while isinstance(node, fx.Node):
        op = gm.get_submodule(node.target) if node.op == "call_module" else node.target
        if isinstance(op, nn.modules.batchnorm._BatchNorm):
            return (op, maps[::-1]) if op.affine else None
        if node.op == "call_module" and type(op) in _CONST_MAPS:
            maps.append(_CONST_MAPS[type(op)])
        elif node.op == "call_function" and op in _CONST_MAPS:
            maps.append(_CONST_MAPS[op])
        elif not (isinstance(op, _CONST_KEEPS) or (node.op == "call_function" and op in _CONST_KEEP_FNS)):
            return None
        node = node.args[0] if node.args else None
    return None


def _fold(gm: fx.GraphModule, slim_plan: SlimPlan) -> None:
    """Fold the constant outputs of removed channels into their readers (see module docstring)."""
    analysis = slim_plan.analysis
    gone = np.zeros(len(analysis.groups), dtype=bool)
    gone[slim_plan.removed] = True
    for node in analysis.gm.graph.nodes:
        if node.op != "call_module":
            continue
        reader = gm.get_submodule(node.target)
        is_conv = isinstance(reader, nn.Conv2d) and reader.groups == 1
        if not (is_conv or isinstance(reader, nn.Linear)) or node.args[0] not in analysis.base:
            continue
        src, block = node.args[0], 1
        if src.op == "call_function" and src.target is torch.flatten or \
                src.op == "call_module" and isinstance(gm.get_submodule(src.target), nn.Flatten):
            block = analysis.size[src] // analysis.size[src.args[0]] if src.args[0] in analysis.base else 0
            src = src.args[0]
        removed = np.flatnonzero(gone[analysis.group_ids(src)]) if block and src in analysis.base else []
        found = _constant_source(gm, src) if len(removed) else None
        if found is None:
            continue
        bn, maps = found
        index = torch.as_tensor(removed)
        # Gauss-Hermite quadrature of E[act(gamma * z + beta)], z ~ N(0, 1).
        nodes, weights = (torch.as_tensor(a, dtype=bn.weight.dtype) for a in np.polynomial.hermite_e.hermegauss(32))
        with torch.no_grad():
            value = bn.weight[index, None] * nodes + bn.bias[index, None]
            for f in maps:
                value = f(value)
            value = value @ (weights / weights.sum())
            w = reader.weight
            value = value.to(w.dtype)
            if is_conv:
                delta = w[:, torch.as_tensor(removed)].sum(dim=(2, 3)) @ value
            else:
                features = (torch.as_tensor(removed)[:, None] * block + torch.arange(block)).flatten()
                delta = w[:, features] @ value.repeat_interleave(block)
            if reader.bias is not None:
                reader.bias.add_(delta)
                continue
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and \
                    isinstance(gm.get_submodule(users[0].target), nn.modules.batchnorm._BatchNorm):
                gm.get_submodule(users[0].target).running_mean.sub_(delta)


def apply(gm: fx.GraphModule, slim_plan: SlimPlan) -> fx.GraphModule:
    """Remove the planned channels from ``gm`` in place, and re-propagate shapes."""
    keep = slim_plan.keep()
    example = _example_from_meta(gm)
    if slim_plan.fold:
        _fold(gm, slim_plan)
    rewriter = Rewriter(gm, keep)
    for node in list(gm.graph.nodes):
        handler_for(gm, node).rewrite(rewriter, node)
    gm.recompile()
    return propagate_shapes(gm, example)


def mask(gm: fx.GraphModule, slim_plan: SlimPlan) -> fx.GraphModule:
    """Simulate the plan without changing shapes: zero gamma and beta of every
    BatchNorm channel in a removed group (after the same folding as :func:`apply`)."""
    if slim_plan.fold:
        _fold(gm, slim_plan)
    with torch.no_grad():
        for g in slim_plan.removed:
            for target, c in slim_plan.analysis.groups[g].bn_channels:
                bn = gm.get_submodule(target)
                bn.weight[c] = 0.0
                bn.bias[c] = 0.0
    return gm


def _example_from_meta(gm: fx.GraphModule) -> torch.Tensor:
    (placeholder, *rest) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if rest:
        raise ValueError("slim supports graphs with one tensor input")
    return torch.randn(output_shape(placeholder), generator=torch.Generator().manual_seed(0))


@register_pass
class Slim(GraphPass):
    """remove the channel groups with the smallest BatchNorm |gamma| (network slimming)"""

    name = "slim"
    changes_outputs = True
    options = (
        Option("ratio", float, 0.5, "share of the prunable channel groups removed", Range(0.0, 1.0, high_open=True)),
        Option("combine", str, "max", "how a group's BatchNorm |gamma| combine into its score", choices=tuple(COMBINE)),
        Option("min_channels", int, 1, "fewest channels a layer keeps", Range(1)),
        Option("min_keep", float, 0.0, "smallest share of its channels a layer keeps", Range(0.0, 1.0, high_open=True)),
        Option("layer_ratios", dict, None, "{layer: share} of a layer's own channels removed first"),
        Option("fold", bool, True, "fold the removed channels' mean output into their readers' bias"),
        Option("mode", str, "apply", "apply: remove the channels; mask: zero their gamma and beta, shapes kept",
               choices=("apply", "mask")),
    )
    # Bisection makes long ladders cheap: 18 ratios cost about 5 screens, not 18.
    knob = Knob("ratio", tuple(round(0.05 * i, 2) for i in range(1, 19)),
                range=Range(0.0, 1.0, low_open=True, high_open=True), flag="--slim-levels",
                absolute=False)  # a share of the channels still there
    gains_from_sparsity_training = True
    examples = (("slim(ratio=0.4)", "remove the 40% of channel groups with the smallest BatchNorm |gamma|"),
                ("slim(ratio=0.5,combine=sum,min_keep=0.1)", "score groups by summed |gamma|; keep 10% of each layer"),
                ("slim(layer_ratios={'layer1.0.bn1':0.5},ratio=0)", "half of one layer's channels only"))

    def __init__(self, ratio: float = 0.5, combine: str = "max", min_channels: int = 1, min_keep: float = 0.0,
                 layer_ratios: Mapping[str, float] | None = None, fold: bool = True, mode: str = "apply") -> None:
        # checked at parse time, before any training
        self.check_options(dict(ratio=ratio, combine=combine, min_channels=min_channels, min_keep=min_keep,
                                layer_ratios=layer_ratios, fold=fold, mode=mode))
        self.settings = dict(ratio=ratio, combine=combine, min_channels=min_channels, min_keep=min_keep,
                            layer_ratios=dict(layer_ratios or {}), fold=fold)
        self.mode = mode
        self.plan: SlimPlan | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.plan = plan(gm, **self.settings)
        gm = apply(gm, self.plan) if self.mode == "apply" else mask(gm, self.plan)
        return PassResult(gm, bool(self.plan.removed), {"mode": self.mode, **self.plan.summary()})

    def summary(self, record: Mapping) -> str | None:
        if not record.get("layers"):
            return _nothing_removed(record)
        return (f"slim removed channels in {len(record['layers'])} layers "
                f"({record['achieved_ratio']:.1%} of prunable channel groups)")


def _nothing_removed(record: Mapping) -> str | None:
    """Why slim left every layer as it was, for a model where it could not help."""
    if "total_bn_channels" not in record:
        return None
    if not record["total_bn_channels"]:
        return ("slim removed nothing: the model has no BatchNorm layer, and slimming ranks channels by their "
                "BatchNorm gamma")
    if not record["prunable_groups"]:
        reasons = sorted(record.get("refused", {}).items(), key=lambda kv: -kv[1])
        why = ", ".join(f"{reason} ({count})" for reason, count in reasons[:3])
        return f"slim removed nothing: no channel group can be removed ({why})"
    return f"slim removed nothing at ratio {record['ratio']:g}: raise the ratio to remove channels"
