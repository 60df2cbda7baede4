"""Inference-time graph rewrites: fold BatchNorm into the layer before it, fuse a
ReLU into the layer before it.

Both keep the function of the graph in eval mode (up to float rounding of the
folded weights) and leave a graph of plain torch modules: a layer with a fused ReLU
becomes torch's ``ConvReLU2d`` / ``LinearReLU`` container, which the runtime then
runs densely or swaps for a sparse module.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.optimization import replace_node_module

from ..ir import call_counts
from ..passes import create_pass
from ..passes.bnfold import fold_affine
from .modules import dense_layer

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def fold_batchnorm(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` in eval mode with every BatchNorm (or a ``bnfold`` ChannelAffine)
    whose input is a Conv or Linear output used by nothing else folded into that layer,
    shared weights included (the runtime keeps them as float32); the others become
    ChannelAffine. Also the names of the layers folded into, in graph order."""
    gm = copy.deepcopy(gm).eval()
    record = create_pass("bnfold", shared=[])(gm).record
    into = {**record["folded"], **fold_affine(gm)}
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    return gm.eval(), sorted(set(into.values()), key=order.index)


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ReLU: the module, the function or the tensor method."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def is_add(node: fx.Node) -> bool:
    """An addition: ``+``, ``+=``, ``torch.add`` or the tensor method (operands unchecked)."""
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)


def fuse_relu(gm: fx.GraphModule) -> list[str]:
    """In place: where a Conv2d or Linear called once has a ReLU as the only user of
    its output, make the layer torch's layer+ReLU container and drop the ReLU node.
    Returns the names of the layers that took a ReLU."""
    modules = dict(gm.named_modules())
    counts = call_counts(gm)
    fused = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in (nn.Conv2d, nn.Linear):
            continue
        # A shared layer would take the ReLU at every call site; leave it alone.
        if counts[node.target] != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if not is_relu(gm, user) or user.args[:1] != (node,):
            continue
        replace_node_module(node, modules, dense_layer(modules[node.target], relu=True))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        fused.append(node.target)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return fused


__all__ = ["call_counts", "fold_batchnorm", "fuse_relu", "is_add", "is_relu"]
