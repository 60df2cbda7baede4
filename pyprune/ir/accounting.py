"""Per-layer accounting of parameters, bytes and multiply-accumulates (MACs).

Needs shape metadata on the graph (:func:`pyprune.ir.shape_prop.propagate_shapes`).
MACs are counted per sample for the layers that do the arithmetic that matters,
convolutions and linear layers, through a registry of per-module-type rules
(:data:`MAC_COUNTERS`, filled by :mod:`pyprune.ops` with the rest of each op's
support); normalisation, activations, pooling and element-wise ops count zero, as
in the usual CIFAR literature. ``bytes`` is the storage of a layer's parameters and
buffers (BatchNorm running statistics included), which an inference file must hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import fx, nn

from .shape_prop import output_shape

MacCounter = Callable[[nn.Module, tuple[int, ...]], int]
MAC_COUNTERS: dict[type, MacCounter] = {}


def register_mac_counter(*module_types: type) -> Callable[[MacCounter], MacCounter]:
    """Register ``fn(module, output_shape) -> MACs for the whole batch`` for module types."""
    def decorator(fn: MacCounter) -> MacCounter:
        for t in module_types:
            MAC_COUNTERS[t] = fn
        return fn
    return decorator


def unregister_mac_counter(*module_types: type) -> None:
    """Forget the MAC rules of ``module_types``; a type with none is ignored."""
    for t in module_types:
        MAC_COUNTERS.pop(t, None)


def _mac_counter(module: nn.Module) -> MacCounter | None:
    for klass in type(module).__mro__:
        if klass in MAC_COUNTERS:
            return MAC_COUNTERS[klass]
    return None


@dataclass
class LayerStats:
    name: str
    op: str
    output_shape: tuple[int, ...] | None
    params: int
    bytes: int
    macs: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shape"] = list(self.output_shape) if self.output_shape is not None else None
        return d


@dataclass
class Totals:
    params: int
    bytes: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _owned_tensors(gm: fx.GraphModule, node: fx.Node) -> tuple[str, list[torch.Tensor], int]:
    """(owner key, tensors held, parameter count) of a call_module or get_attr node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # recursively: fx never calls a leaf's children, so what they hold is the leaf's
        # (a user's --leaf-module holding convs, torch.nn.MultiheadAttention's out_proj)
        params = list(module.parameters())
        return node.target, [*params, *module.buffers()], sum(p.numel() for p in params)
    owner, _, attr = node.target.rpartition(".")
    value = getattr(gm.get_submodule(owner), attr)
    if not isinstance(value, torch.Tensor):
        return node.target, [], 0
    return node.target, [value], value.numel() if isinstance(value, nn.Parameter) else 0


def layer_stats(gm: fx.GraphModule) -> list[LayerStats]:
    """One row per compute node of the graph, in execution order.

    A module called several times has its parameters counted at its first call
    and its MACs at every call, so the totals equal the model's parameter count."""
    seen: set[str] = set()
    rows = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        shape = output_shape(node)
        params = nbytes = macs = 0
        if node.op in ("call_module", "get_attr"):
            key, tensors, n_params = _owned_tensors(gm, node)
            if key not in seen:
                seen.add(key)
                params = n_params
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if node.op == "call_module" and shape is not None:
            module = gm.get_submodule(node.target)
            counter = _mac_counter(module)
            if counter is not None:
                # Shapes carry the example's batch; report per sample.
                macs = counter(module, shape) // max(shape[0], 1)
        name = str(node.target) if node.op == "call_module" else node.name
        rows.append(LayerStats(name, _op_name(gm, node), shape, params, nbytes, macs))
    return rows


def totals(rows: list[LayerStats]) -> Totals:
    return Totals(sum(r.params for r in rows), sum(r.bytes for r in rows), sum(r.macs for r in rows))
