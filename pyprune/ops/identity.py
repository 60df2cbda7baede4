"""Identity-like ops: Dropout, Identity, and tensor copies and conversions
(``contiguous``, ``clone``, ``to``, ``float``). Also defines :class:`PassThrough`,
the handler of every per-channel op (channel c in is channel c out), which the
activation, pooling, norm and reduction families reuse."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.context import Context
from ..analysis.registry import ChannelHandler
from .registry import BARRIER, OpSupport, function, method, module


class PassThrough(ChannelHandler):
    """Per-channel ops (activations, pooling, dropout, identity): channel c in is
    channel c out. ``keeps_zero``: whether f(0) == 0, so that zeros propagate."""

    def __init__(self, keeps_zero: bool = True) -> None:
        self.keeps_zero = keeps_zero

    def source(self, ctx: Context, node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        return first if ctx.has(first) else None

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src = self.source(ctx, node)
        if src is None or not ctx.has(node) or ctx.size[src] != ctx.size[node]:
            return super().connect(ctx, node)
        ctx.tie(src, node)

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        src = self.source(ctx, node)
        z = ctx.zeros_of(src)
        return z.copy() if self.keeps_zero and z is not None and len(z) == ctx.size[node] else ctx.not_zero(node)


PASS_THROUGH = PassThrough(keeps_zero=True)
"""For ops with f(0) == 0; one shared instance, as the handler holds no state."""

OPS: tuple[OpSupport, ...] = (
    module(nn.Identity, PASS_THROUGH, serializable=True),
    # Dropout is the identity in eval mode and scales kept values in training: zeros stay zeros.
    module(nn.Dropout, PASS_THROUGH, serializable=True),
    module(nn.Dropout2d, PASS_THROUGH, serializable=True),
    function("torch.nn.functional.dropout", F.dropout, PASS_THROUGH, serializable=True),
    method("contiguous", PASS_THROUGH, serializable=True),
    method("clone", PASS_THROUGH, serializable=False),
    method("to", BARRIER, serializable=True),
    method("float", BARRIER, serializable=True),
)
