"""Channel dependency analysis: which (tensor, channel) positions must go together.

Needs: a traced ``GraphModule`` with shape metadata on every node
(:func:`pyprune.ir.propagate_shapes`).

Every node whose output is a tensor of rank >= 2 owns one *position* per index
of dimension 1 (its channels; for a flattened (N, F) tensor, its features). Per-op
handlers (:mod:`pyprune.analysis.registry`, filled by :mod:`pyprune.ops`) tie
positions that must be removed together; the resulting equivalence classes are
the *channel groups*. Handlers also pin positions that must stay (graph inputs
and outputs, constants, and the inputs and outputs of ops with no handler:
barriers), record which BatchNorm channels score a group, and which positions
are read by channel-mixing layers.

A group is *prunable* when it is not pinned, holds at least one BatchNorm channel,
and removing it is exact with respect to the masked model, in which the gamma and
beta of the group's BatchNorm channels are zero: every position of the group that a
channel-mixing layer (conv, linear) reads must then be zero. That is checked by
propagating zeros forward through the handlers, so, for example, a residual stream
produced by convolutions and read by a 1x1 downsample convolution is refused.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from torch import fx

from ..ir import output_shape
from .context import Context
from .registry import handler_for

log = logging.getLogger(__name__)


class DisjointSets:
    """Union-find over integer ids; the smallest id is the root, for determinism."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64,
                           count=len(self.parent))


@dataclass
class ChannelGroup:
    """One set of positions removed together, and whether it may be."""

    id: int
    positions: np.ndarray  # position ids, sorted
    bn_channels: list[tuple[str, int]]  # (BatchNorm module target, channel) that score it
    prunable: bool
    reason: str = ""  # why not prunable
    analysis: "ChannelAnalysis | None" = field(default=None, repr=False)

    def members(self) -> dict[str, list[int]]:
        """{node name: [channels]} of the group, in graph order."""
        assert self.analysis is not None
        return self.analysis.describe(self.positions)


class ChannelAnalysis:
    """The result of :func:`analyze_channels`: positions, groups and their status."""

    def __init__(self, gm: fx.GraphModule, ctx: Context, roots: np.ndarray) -> None:
        self.gm = gm
        self.ctx = ctx
        self.base = ctx.base
        self.size = ctx.size
        self.roots = roots
        self.groups: list[ChannelGroup] = []
        self._group_of_root: dict[int, int] = {}
        self._node_at: list[tuple[int, fx.Node]] = sorted((b, n) for n, b in ctx.base.items())

    def ids(self, node: fx.Node) -> np.ndarray:
        return np.arange(self.base[node], self.base[node] + self.size[node])

    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name or (n.op == "call_module" and n.target == name):
                return n
        raise KeyError(f"no node or module call named {name!r}")

    def group_of(self, node: fx.Node | str, channel: int) -> ChannelGroup:
        node = self.node(node) if isinstance(node, str) else node
        return self.groups[self._group_of_root[int(self.roots[self.base[node] + channel])]]

    def group_ids(self, node: fx.Node) -> np.ndarray:
        """Group id of each channel of ``node``."""
        return np.array([self._group_of_root[int(r)] for r in self.roots[self.ids(node)]], dtype=np.int64)

    def describe(self, positions: np.ndarray) -> dict[str, list[int]]:
        starts = [b for b, _ in self._node_at]
        out: dict[str, list[int]] = defaultdict(list)
        for p in positions:
            i = int(np.searchsorted(starts, p, side="right")) - 1
            base, node = self._node_at[i]
            out[node.name].append(int(p - base))
        return dict(out)

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Find the channel groups of ``gm``; see the module docstring for the rules."""
    nodes = list(gm.graph.nodes)
    # ShapeProp records the result type of every node, tensor or not.
    missing = [n.name for n in nodes if n.op != "output" and "type" not in n.meta]
    if missing:
        raise ValueError(f"channel analysis needs shapes on every node (missing on {missing[:5]}); "
                         "run pyprune.ir.propagate_shapes first")
    base, size, total = {}, {}, 0
    for n in nodes:
        shape = output_shape(n) if n.op != "output" else None  # the output node repeats its input
        if shape is not None and len(shape) >= 2:
            base[n], size[n] = total, shape[1]
            total += shape[1]
    ctx = Context(gm, base, size, DisjointSets(total))
    for n in nodes:
        handler_for(gm, n).connect(ctx, n)
    if ctx.barriers:
        log.warning("channels are not pruned across %d node(s) that are barriers to them (no channel handler, "
                    "or one that cannot follow channels there, such as a broadcast): %s",
                    len(ctx.barriers), ", ".join(ctx.barriers[:10]) + (" ..." if len(ctx.barriers) > 10 else ""))
    for n in nodes:
        if n in base:
            ctx.zero[n] = handler_for(gm, n).zeros(ctx, n)

    roots = ctx.sets.roots()
    analysis = ChannelAnalysis(gm, ctx, roots)
    pinned = {int(roots[p]): why for p, why in ctx.pinned.items()}
    inexact: dict[int, str] = {}
    for node, reader in ctx.readers:
        for p in analysis.ids(node)[~ctx.zero[node]]:
            inexact.setdefault(int(roots[p]), f"read by {reader} where the masked model is not zero")
    bn_of_root: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for target, node in ctx.batchnorms:
        for c, p in enumerate(analysis.ids(node)):
            bn_of_root[int(roots[p])].append((target, c))

    order = np.argsort(roots, kind="stable")
    unique_roots, starts = np.unique(roots[order], return_index=True)
    bounds = list(starts[1:]) + [len(order)]
    for gid, (root, begin, end) in enumerate(zip(unique_roots.tolist(), starts.tolist(), bounds)):
        bns = bn_of_root.get(root, [])
        reason = pinned.get(root) or inexact.get(root) or ("" if bns else "no BatchNorm channel to score it")
        group = ChannelGroup(gid, np.sort(order[begin:end]), bns, not reason, reason, analysis)
        analysis.groups.append(group)
        analysis._group_of_root[root] = gid
    return analysis
