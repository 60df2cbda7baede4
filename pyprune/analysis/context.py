"""What channel handlers record while a graph is analysed (:class:`Context`), and
helpers every handler uses to describe and select a node's tensor inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import fx

if TYPE_CHECKING:
    from .channels import DisjointSets


class Context:
    """What handlers record while the graph is analysed."""

    def __init__(self, gm: fx.GraphModule, base: dict[fx.Node, int], size: dict[fx.Node, int],
                 sets: "DisjointSets") -> None:
        self.gm = gm
        self.base = base
        self.size = size
        self.sets = sets
        self.pinned: dict[int, str] = {}
        self.readers: list[tuple[fx.Node, str]] = []
        self.batchnorms: list[tuple[str, fx.Node]] = []
        self.barriers: list[str] = []
        self.zero: dict[fx.Node, np.ndarray] = {}

    def has(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.base

    def ids(self, node: fx.Node) -> np.ndarray:
        return np.arange(self.base[node], self.base[node] + self.size[node])

    def tie_ids(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.sets.union(x, y)

    def tie(self, a: fx.Node, b: fx.Node) -> None:
        """Tie channel c of ``a`` to channel c of ``b``; pin both if widths differ."""
        if self.size[a] != self.size[b]:
            self.pin(a, f"width mismatch at {b.name}")
            self.pin(b, f"width mismatch at {a.name}")
            return
        self.tie_ids(self.ids(a), self.ids(b))

    def pin(self, node: Any, why: str) -> None:
        if self.has(node):
            for p in self.ids(node).tolist():
                self.pinned.setdefault(p, why)

    def read(self, node: Any, by: str) -> None:
        """``node``'s channels are read by a channel-mixing op ``by``."""
        if self.has(node):
            self.readers.append((node, by))

    def zeros_of(self, node: Any) -> np.ndarray | None:
        return self.zero.get(node) if self.has(node) else None

    def not_zero(self, node: fx.Node) -> np.ndarray:
        return np.zeros(self.size[node], dtype=bool)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node`` as a warning or a pin reason names it: module target and type, or op and target."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({node.op} {target})"


def tensor_args(ctx: Context, node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` that own channel positions."""
    return [a for a in node.all_input_nodes if ctx.has(a)]
