"""Which layers of a graph carry the weights that unstructured passes work on:
the Conv (transposed included) and Linear modules that ``call_module`` nodes call.
Shared by the passes and by the reports that describe their results."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.modules.conv._ConvNd,),
    "linear": (nn.Linear,),
}


def parse_include(include: str | Iterable[str]) -> tuple[str, ...]:
    """``"conv,linear"``, ``"conv+linear"``, ``"conv"`` or a sequence of kind names."""
    if isinstance(include, str):
        parts = include.replace("+", ",").replace("|", ",").split(",")
    else:
        parts = list(include)
    kinds = tuple(dict.fromkeys(p.strip().lower() for p in parts if p and p.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"include must name layer kinds among {', '.join(KINDS)}, got {include!r}")
    return kinds


def weight_layers(gm: fx.GraphModule, include: str | Iterable[str] = "conv,linear") -> list[str]:
    """Names of the Conv/Linear modules the graph calls, in graph order, each once,
    including those inside a user's leaf module (``--leaf-module``: one opaque call
    whose layers fx does not list, but whose weights are still there to prune)."""
    types = tuple(t for k in parse_include(include) for t in KINDS[k])

    def is_layer(m: nn.Module) -> bool:
        return isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)

    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        inside = [] if is_layer(m) or not is_user_leaf(m) else \
            [f"{node.target}.{path}" for path, sub in m.named_modules() if path and is_layer(sub)]
        for name in ([node.target] if is_layer(m) else inside):
            if name not in names:
                names.append(name)
    return names


def is_user_leaf(m: nn.Module) -> bool:
    """A module fx kept whole although torch.nn did not define it: a leaf the user
    asked for (fx's own leaves are torch.nn's modules)."""
    return not type(m).__module__.startswith("torch.nn")


def present_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The ``names`` that are still submodules of ``model`` (a later pass may have
    removed a layer since they were recorded)."""
    out = []
    for n in names:
        try:
            model.get_submodule(n)
        except AttributeError:
            continue
        out.append(n)
    return out
