"""Binary arithmetic: add, sub, mul, div (operators, functions, in-place and
out-of-place methods) tie their operands channel by channel; floordiv, mod, pow
and neg are serializable barriers."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx

from ..analysis.context import Context
from ..analysis.registry import ChannelHandler
from ..ir import output_shape
from .registry import BARRIER, OpSupport, function, method


class Elementwise(ChannelHandler):
    """add, sub, mul, div of equal-shaped tensors (scalars allowed): all tensor
    operands and the output are tied channel by channel. An operand broadcast to the
    output's shape makes the op a barrier. ``zero``: how zeros combine:
    'all' (add, sub: zero only if every operand is), 'any' (mul), 'first' (div)."""

    def __init__(self, zero: str) -> None:
        self.zero = zero

    def connect(self, ctx: Context, node: fx.Node) -> None:
        operands = [a for a in node.args[:2]]
        if not ctx.has(node) or any(isinstance(a, fx.Node) and not ctx.has(a) for a in operands) or \
                any(ctx.has(a) and output_shape(a) != output_shape(node) for a in operands):
            return super().connect(ctx, node)  # broadcasting over channels, or a non-tensor operand
        for a in operands:
            if ctx.has(a):
                ctx.tie(a, node)

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        ops = node.args[:2]
        zs = [ctx.zeros_of(a) if isinstance(a, fx.Node) else np.full(ctx.size[node], a == 0) for a in ops]
        # A broadcast operand (a (C, 1, 1) layer scale, a (1, C, 1, 1) mask) has channels
        # of its own count, or none: connect() made the op a barrier, and no zero is known.
        if any(z is None or z.shape != (ctx.size[node],) for z in zs):
            return ctx.not_zero(node)
        if self.zero == "all":
            return np.logical_and.reduce(zs)
        if self.zero == "any":
            return np.logical_or.reduce(zs)
        return zs[0].copy()


ADD = Elementwise("all")
MUL = Elementwise("any")
DIV = Elementwise("first")

OPS: tuple[OpSupport, ...] = (
    function("operator.add", operator.add, ADD, serializable=True),
    function("operator.sub", operator.sub, ADD, serializable=True),
    function("operator.iadd", operator.iadd, ADD, serializable=False),
    function("torch.add", torch.add, ADD, serializable=True),
    function("torch.sub", torch.sub, ADD, serializable=True),
    function("operator.mul", operator.mul, MUL, serializable=True),
    function("operator.imul", operator.imul, MUL, serializable=False),
    function("torch.mul", torch.mul, MUL, serializable=True),
    function("operator.truediv", operator.truediv, DIV, serializable=True),
    function("torch.div", torch.div, DIV, serializable=True),
    # Also reached by arithmetic on sizes (x.size(1) // 2), where the barrier finds
    # no tensor and does nothing.
    function("operator.floordiv", operator.floordiv, BARRIER, serializable=True),
    function("operator.mod", operator.mod, BARRIER, serializable=True),
    function("operator.pow", operator.pow, BARRIER, serializable=True),
    function("operator.neg", operator.neg, BARRIER, serializable=True),

    method("add", ADD, serializable=True),
    method("add_", ADD, serializable=True),
    method("sub", ADD, serializable=True),
    method("sub_", ADD, serializable=False),
    method("mul", MUL, serializable=True),
    method("mul_", MUL, serializable=True),
    method("div", DIV, serializable=True),
    method("div_", DIV, serializable=False),
    method("pow", BARRIER, serializable=True),
)
