"""The lanes layout: activations kept between batched sparse convolutions.

The batched sparse convolution (``csrc/cpu/sparse.h``) puts groups of 8 or 16 images on
the vector lanes: a lanes tensor is ``[groups, C, H + 2 pad, W + 2 pad, lanes]``, zero on
the border (the next convolution's padding) and in the lanes past the batch. Converting
NCHW to lanes and back costs about as much as a 90%-sparse convolution of the same
activation, so the runtime keeps runs of such layers in the lanes layout and converts
only where a neighbour needs NCHW: :func:`place_conversions` is that graph rewrite.

Between two lanes layers, element-wise additions of two tensors and ReLUs stay in the
lanes layout (both keep a zero border zero: the residual add and the ReLU after it of a
ResNet block); anything else gets its input back in NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .. import _native
from ..ir import output_shape
from .fusion import is_add, is_relu
from .modules import SparseConv2d


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
    ``relu?(conv(x) + residual)``, the ReLU when its own or when ``relu_after_residual``
    is set (see :mod:`.residual`)."""

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
    if not (is_add(node) or is_relu(gm, node)) or set(node.kwargs) - {"inplace"}:
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
    in_lanes: set[fx.Node] = field(default_factory=set)  # the nodes whose values are lanes tensors


def place_conversions(gm: fx.GraphModule, lanes_layers: set[str], lanes: int, pad: int) -> LanesRewrite:
    """In place: the layers named in ``lanes_layers`` (:class:`LanesSparseConv2d` modules
    already) take and give lanes tensors; element-wise nodes whose inputs are lanes stay
    lanes; a :class:`ToLanes` is put after each NCHW value a lanes node reads and a
    :class:`FromLanes` after each lanes value anything else reads, once per value.
    Needs the NCHW shapes of shape propagation on the nodes."""
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
    graph.lint()
    gm.recompile()
    return LanesRewrite(len(converted), in_lanes)
