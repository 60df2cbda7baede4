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
block that writes it). Groups go in ascending score until ``ratio`` of all
BatchNorm channels of the model are removed, network slimming's global threshold;
``layer_ratios`` first removes the given share of a named layer's own channels.
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
from ..analysis.handlers import Rewriter
from ..ir import PassResult, output_shape, propagate_shapes
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
        return {"ratio": self.ratio, "combine": self.combine,
                "achieved_ratio": self.removed_bn_channels / max(self.total_bn_channels, 1),
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
                 f"removed {s['removed_bn_channels']}/{s['total_bn_channels']} BatchNorm channels "
                 f"({s['achieved_ratio']:.1%}, asked {self.ratio:.1%}) in {s['removed_groups']} groups; "
                 f"{s['prunable_groups']}/{s['groups']} groups prunable"]
        return "\n".join(lines)


def _layer_nodes(gm: fx.GraphModule, analysis: ChannelAnalysis) -> list[fx.Node]:
    """Nodes whose channels are a layer's own: conv, BatchNorm and linear calls."""
    kinds = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear)
    return [n for n in analysis.base if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds)]


def plan(gm: fx.GraphModule, ratio: float = 0.5, combine: str = "max", min_channels: int = 1,
         min_keep: float = 0.0, layer_ratios: Mapping[str, float] | None = None,
         analysis: ChannelAnalysis | None = None) -> SlimPlan:
    """Choose the channel groups to remove (see the module docstring)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"slim ratio must be in [0, 1), got {ratio}")
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
    if min_channels < 1 or not 0.0 <= min_keep < 1.0:
        raise ValueError("min_channels must be >= 1 and min_keep in [0, 1)")
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
    budget = ratio * total_bn
    removed_bn = sum(len(analysis.groups[g].bn_channels) for g in removed)
    for g in by_score:
        if removed_bn >= budget:
            break
        if take(g):
            removed_bn += len(analysis.groups[g].bn_channels)

    rows = [LayerRow(str(n.target), type(gm.get_submodule(n.target)).__name__, width[n], remaining[n])
            for n in layers]
    return SlimPlan(analysis, sorted(removed), ratio, combine, scores, total_bn, rows)


def apply(gm: fx.GraphModule, slim_plan: SlimPlan) -> fx.GraphModule:
    """Remove the planned channels from ``gm`` in place, and re-propagate shapes."""
    keep = slim_plan.keep()
    example = _example_from_meta(gm)
    rewriter = Rewriter(gm, keep)
    for node in list(gm.graph.nodes):
        handler_for(gm, node).rewrite(rewriter, node)
    gm.recompile()
    return propagate_shapes(gm, example)


def mask(gm: fx.GraphModule, slim_plan: SlimPlan) -> fx.GraphModule:
    """Simulate the plan without changing shapes: zero gamma and beta of every
    BatchNorm channel in a removed group."""
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


@register_pass("slim")
class Slim:
    """The pass form of :func:`plan` + :func:`apply` (or :func:`mask`)."""

    name = "slim"
    changes_outputs = True

    def __init__(self, ratio: float = 0.5, combine: str = "max", min_channels: int = 1, min_keep: float = 0.0,
                 layer_ratios: Mapping[str, float] | None = None, mode: str = "apply") -> None:
        if mode not in ("apply", "mask"):
            raise ValueError(f"slim mode must be apply or mask, got {mode!r}")
        self.options = dict(ratio=ratio, combine=combine, min_channels=min_channels, min_keep=min_keep,
                            layer_ratios=dict(layer_ratios or {}))
        self.mode = mode
        self.plan: SlimPlan | None = None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"slim ratio must be in [0, 1), got {ratio}")

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.plan = plan(gm, **self.options)
        gm = apply(gm, self.plan) if self.mode == "apply" else mask(gm, self.plan)
        return PassResult(gm, bool(self.plan.removed), {"mode": self.mode, **self.plan.summary()})
