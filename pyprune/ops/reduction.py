"""Reductions: ``mean`` over spatial dims keeps channels (method); ``torch.mean``,
``sum`` and ``amax`` (functions and methods) are serializable barriers."""

from __future__ import annotations

import torch
from torch import fx

from ..analysis.context import Context
from ..analysis.registry import ChannelHandler
from ..ir import output_shape
from .identity import PassThrough
from .registry import BARRIER, OpSupport, function, method


class ReduceHandler(PassThrough):
    """mean over dims that exclude batch and channels: keeps channels."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not ctx.has(src) or dims is None or any(d % len(output_shape(src)) < 2 for d in dims):
            return ChannelHandler.connect(self, ctx, node)
        super().connect(ctx, node)


OPS: tuple[OpSupport, ...] = (
    method("mean", ReduceHandler(), serializable=True),
    method("sum", BARRIER, serializable=True),
    method("amax", BARRIER, serializable=True),
    function("torch.mean", torch.mean, BARRIER, serializable=True),
    function("torch.sum", torch.sum, BARRIER, serializable=True),
    function("torch.amax", torch.amax, BARRIER, serializable=True),
)
