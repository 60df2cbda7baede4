"""Residual blocks' adds fused into the sparse convolution before them.

A ResNet block ends ``relu(bn(conv2(...)) + shortcut)``; with BatchNorm folded that is a
convolution, an add and a ReLU, and the last two are each one more pass over the
activations. :func:`fuse_residual_adds` hands the shortcut to the convolution, whose
epilogue adds it before the ReLU while the output tile is in cache (the native kernels'
``residual`` argument, NCHW or lanes).
"""

from __future__ import annotations

from torch import fx

from ..ir import output_shape
from .fusion import is_add, is_relu
from .lanes import LanesSparseConv2d
from .modules import SparseConv2d


def _is_relu_of(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    return is_relu(gm, node) and node.args[:1] == (value,) and set(node.kwargs) <= {"inplace"}


def fuse_residual_adds(gm: fx.GraphModule, in_lanes: set[fx.Node]) -> int:
    """In place: a sparse convolution (no ReLU of its own) used only by an add, itself
    optionally used only by a ReLU, becomes one call with the add's other operand as
    ``residual``. The other operand must come earlier in the graph and be in the
    convolution's layout: a lanes value (``in_lanes``) for a :class:`LanesSparseConv2d`,
    an NCHW value of the same shape for a :class:`SparseConv2d`. Returns the number of
    adds fused. Recompile ``gm`` after."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused = 0
    for conv in list(gm.graph.nodes):
        if conv.op != "call_module" or len(conv.users) != 1:
            continue
        module = gm.get_submodule(conv.target)
        if not isinstance(module, (SparseConv2d, LanesSparseConv2d)):
            continue
        own_relu = module.conv.relu if isinstance(module, LanesSparseConv2d) else module.relu
        (add,) = conv.users
        if own_relu or len(conv.args) != 1 or conv.kwargs or not is_add(add) or add.kwargs or len(add.args) != 2:
            continue
        (other,) = [a for a in add.args if a is not conv] or [None]
        if not isinstance(other, fx.Node) or order[other] > order[conv]:
            continue
        if isinstance(module, LanesSparseConv2d):
            if other not in in_lanes:
                continue
        elif other in in_lanes or output_shape(other) is None or output_shape(other) != output_shape(conv):
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
