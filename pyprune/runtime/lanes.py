"""The lanes layout: activations kept between batched sparse convolutions.

The batched sparse convolution (``csrc/cpu/sparse.h``) puts groups of 8 or 16 images on
the vector lanes: a lanes tensor is ``[groups, C, H + 2 pad, W + 2 pad, lanes]``, zero on
the border (the next convolution's padding) and in the lanes past the batch. Converting
NCHW to lanes and back costs about as much as a 90%-sparse convolution of the same
activation, so the runtime keeps runs of such layers in the lanes layout and converts
only where a neighbour needs NCHW: :func:`place_conversions` is that graph rewrite.

Between two lanes layers, element-wise additions of two tensors and ReLUs stay in the
lanes layout (both keep a zero border zero: the residual add and the ReLU after it of a
ResNet block); anything else gets its input back in NCHW. A lanes convolution whose
only use is such an add, then (optionally) a ReLU, takes the add's other input as its
residual and does both in its epilogue: two passes over the activations fewer per block.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import _native
from ..ir import output_shape
from .modules import SparseConv2d

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ELEMENTWISE_METHODS = ("add", "add_", "relu", "relu_")


def lanes_for(batch: int) -> int | None:
    """The lane count (8 or 16) the batched kernel uses for ``batch`` images on this CPU,
    or None where the lanes layout does not pay (fewer images than the kernel batches
    from) or the native kernels are missing."""
    try:
        native = _native.cpu()
    except ImportError:
        return None
    if not hasattr(native, "sparse_lanes") or batch < native.sparse_batched_from:
        return None
    return int(native.sparse_lanes(batch))


class ToLanes(nn.Module):
    """NCHW -> lanes tensor with a zero border of ``pad``."""

    def __init__(self, lanes: int, pad: int) -> None:
        super().__init__()
        self.lanes, self.pad = lanes, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _native.cpu().to_lanes(x, self.lanes, self.pad)

    def extra_repr(self) -> str:
        return f"lanes={self.lanes}, pad={self.pad}"


class FromLanes(nn.Module):
    """Lanes tensor -> NCHW; the batch size is read from ``like`` (the model's input)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _native.cpu().from_lanes(x, like.shape[0], self.pad)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class LanesSparseConv2d(nn.Module):
    """A :class:`SparseConv2d` from and to lanes tensors with border ``pad``. Given a
    ``residual`` (a lanes tensor of its output's shape) it returns
    ``relu?(conv(x) + residual)``, the ReLU when :func:`fuse_residual_adds` set
    ``relu_after_residual``."""

    def __init__(self, conv: SparseConv2d, pad: int) -> None:
        super().__init__()
        if max(conv.padding) > pad:
            raise ValueError(f"padding {conv.padding} exceeds the lanes layout's border {pad}")
        self.conv, self.pad = conv, pad
        self.relu_after_residual = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        relu = c.relu or (residual is not None and self.relu_after_residual)
        return _native.cpu().sparse_conv2d_lanes(x, *c.csr.kernel_args(), c.csr.kernel_size, c.bias, c.stride,
                                                 c.padding, c.dilation, relu, "auto", self.pad, self.pad,
                                                 residual=residual, **c.csr.kernel_kwargs())

    def extra_repr(self) -> str:
        return f"pad={self.pad}" + (", then + residual and ReLU" if self.relu_after_residual else "")


def _keeps_zero_border(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Element-wise on same-shaped tensor inputs only, and zero where they are all zero."""
    if node.op == "call_module":
        ok = type(gm.get_submodule(node.target)) is nn.ReLU
    elif node.op == "call_function":
        ok = node.target in _ADD_FUNCTIONS + _RELU_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target in _ELEMENTWISE_METHODS
    if not ok or set(node.kwargs) - {"inplace"}:
        return False
    # A scalar operand (x + 1) would make the border non-zero; broadcasting would mix layouts.
    if any(not isinstance(a, fx.Node) for a in node.args):
        return False
    shape = output_shape(node)
    return shape is not None and all(output_shape(a) == shape for a in node.args)


@dataclass
class LanesRewrite:
    """What :func:`place_conversions` did to a graph."""

    conversions: int = 0  # ToLanes and FromLanes nodes placed
    fused_adds: int = 0  # residual adds (and the ReLUs after them) taken into a convolution


def _is_relu_of(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    if node.op == "call_module":
        ok = type(gm.get_submodule(node.target)) is nn.ReLU
    elif node.op == "call_function":
        ok = node.target in _RELU_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target in ("relu", "relu_")
    return ok and node.args[:1] == (value,) and set(node.kwargs) <= {"inplace"}


def fuse_residual_adds(gm: fx.GraphModule, in_lanes: set[fx.Node], lanes_layers: set[str]) -> int:
    """In place: a lanes convolution (no ReLU of its own) used only by an add of two lanes
    values, itself optionally used only by a ReLU, becomes one call with the add's other
    operand as ``residual``. The other operand must come earlier in the graph. Returns
    the number of adds fused."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for conv in list(gm.graph.nodes):
        if conv.op != "call_module" or conv.target not in lanes_layers or len(conv.users) != 1:
            continue
        module = gm.get_submodule(conv.target)
        (add,) = conv.users
        is_add = (add.op == "call_function" and add.target in _ADD_FUNCTIONS) or \
            (add.op == "call_method" and add.target in ("add", "add_"))
        if module.conv.relu or len(conv.args) != 1 or not is_add or add.kwargs or len(add.args) != 2:
            continue
        (other,) = [a for a in add.args if a is not conv] or [None]
        if not isinstance(other, fx.Node) or other not in in_lanes or order[other] > order[conv]:
            continue
        last = add
        if len(add.users) == 1 and _is_relu_of(gm, next(iter(add.users)), add):
            last = next(iter(add.users))
            module.relu_after_residual = True
        conv.args = (conv.args[0], other)
        last.replace_all_uses_with(conv)
        for node in (last, add) if last is not add else (add,):
            gm.graph.erase_node(node)
        fused += 1
    return fused


def place_conversions(gm: fx.GraphModule, lanes_layers: set[str], lanes: int, pad: int) -> LanesRewrite:
    """In place: the layers named in ``lanes_layers`` (:class:`LanesSparseConv2d` modules
    already) take and give lanes tensors; element-wise nodes whose inputs are lanes stay
    lanes; a :class:`ToLanes` is put after each NCHW value a lanes node reads and a
    :class:`FromLanes` after each lanes value anything else reads, once per value.
    Then :func:`fuse_residual_adds`. Needs the NCHW shapes of shape propagation on the
    nodes."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not lanes_layers:
        return LanesRewrite()
    if not placeholders:
        raise ValueError("the graph has no input to read the batch size from")
    batch_ref = placeholders[0]
    in_lanes: set[fx.Node] = set()
    converted: dict[tuple[fx.Node, str], fx.Node] = {}

    def convert(value: fx.Node, to: str) -> fx.Node:
        key = (value, to)
        if key not in converted:
            name = f"{value.name}_{to}"
            gm.add_submodule(name, ToLanes(lanes, pad) if to == "to_lanes" else FromLanes(pad))
            with graph.inserting_after(value):
                args = (value,) if to == "to_lanes" else (value, batch_ref)
                converted[key] = graph.call_module(name, args)
            if to == "to_lanes":
                in_lanes.add(converted[key])
        return converted[key]

    for node in list(graph.nodes):
        inputs = node.all_input_nodes
        if node.op == "call_module" and node.target in lanes_layers:
            node.args = fx.map_arg(node.args, lambda a: a if a in in_lanes else convert(a, "to_lanes"))
            in_lanes.add(node)
        elif not any(a in in_lanes for a in inputs):
            continue
        elif _keeps_zero_border(gm, node):
            node.args = fx.map_arg(node.args, lambda a: a if a in in_lanes else convert(a, "to_lanes"))
            in_lanes.add(node)
        else:
            node.args = fx.map_arg(node.args, lambda a: convert(a, "from_lanes") if a in in_lanes else a)
            node.kwargs = fx.map_arg(node.kwargs, lambda a: convert(a, "from_lanes") if a in in_lanes else a)
    fused = fuse_residual_adds(gm, in_lanes, lanes_layers)
    graph.lint()
    gm.recompile()
    return LanesRewrite(len(converted), fused)
