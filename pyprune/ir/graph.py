"""Small questions about a graph that several passes and the runtime ask."""

from __future__ import annotations

from torch import fx


def call_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each module: a module called more than once
    shares its weights between the call sites, so rewriting it at one rewrites all."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts
