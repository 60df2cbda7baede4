"""Linear layers and matrix products: ``nn.Linear`` (channel handler, MAC rule);
``F.linear`` and ``matmul`` (function and method: serializable barriers)."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.context import Context
from ..analysis.registry import ChannelHandler
from ..ir import output_shape
from .registry import BARRIER, OpSupport, function, method, module
from .rewrite import Rewriter, filled


class LinearHandler(ChannelHandler):
    """Linear on (N, F): reads its input features, produces fresh output features."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src = node.args[0]
        if not ctx.has(src) or len(output_shape(src)) != 2:
            return super().connect(ctx, node)
        ctx.read(src, f"linear '{node.target}'")

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        lin = rw.gm.get_submodule(node.target)
        keeps = rw.in_out_keep(node, lin.in_features, lin.out_features)
        if keeps is None:
            return
        in_keep, out_keep = keeps

        def build() -> nn.Module:
            new = nn.Linear(len(in_keep), len(out_keep), bias=lin.bias is not None)
            return filled(new, lin, lin.weight[out_keep][:, in_keep], out_keep)

        rw.replace_module(node, (tuple(in_keep.tolist()), tuple(out_keep.tolist())), build)


def linear_macs(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    """MACs of a linear layer for the whole batch."""
    return math.prod(out_shape) * m.in_features


OPS: tuple[OpSupport, ...] = (
    module(nn.Linear, LinearHandler(), serializable=True, macs=linear_macs),
    function("torch.nn.functional.linear", F.linear, BARRIER, serializable=True),
    function("operator.matmul", operator.matmul, BARRIER, serializable=True),
    function("torch.matmul", torch.matmul, BARRIER, serializable=True),
    method("matmul", BARRIER, serializable=True),
)
