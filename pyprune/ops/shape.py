"""Shape and indexing ops: flatten, view and reshape, cat, pad, indexing
(``operator.getitem``), ``size``, and the serializable barriers that move or split
dims (permute, transpose, squeeze, unsqueeze, expand, chunk, split, narrow,
stack, ``nn.ZeroPad2d``, ``builtins.getattr`` of shape/dtype/device/ndim)."""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.context import Context, describe
from ..analysis.registry import ChannelHandler
from ..ir import output_shape
from .registry import BARRIER, OpSupport, function, method, module
from .rewrite import Rewriter


class CatHandler(ChannelHandler):
    """torch.cat: along dim 1 each input owns an offset range of the output;
    along another dim, inputs and output are tied channel by channel."""

    @staticmethod
    def parts(node: fx.Node) -> tuple[list, int]:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return list(tensors), dim

    def connect(self, ctx: Context, node: fx.Node) -> None:
        tensors, dim = self.parts(node)
        if not ctx.has(node) or not all(ctx.has(t) for t in tensors):
            return super().connect(ctx, node)
        if dim % len(output_shape(node)) != 1:
            for t in tensors:
                ctx.tie(t, node)
            return
        out, offset = ctx.ids(node), 0
        for t in tensors:
            ctx.tie_ids(ctx.ids(t), out[offset:offset + ctx.size[t]])
            offset += ctx.size[t]

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        tensors, dim = self.parts(node)
        zs = [ctx.zeros_of(t) for t in tensors]
        if any(z is None for z in zs):
            return ctx.not_zero(node)
        if dim % len(output_shape(node)) != 1:
            return np.logical_and.reduce(zs)
        return np.concatenate(zs)


class PadHandler(ChannelHandler):
    """F.pad. Spatial padding keeps channels. Zero padding of the channel dimension
    (option-A shortcuts) maps input c to output c + front; the padded channels are
    constant zero, free to remove, and the rewrite shrinks the pad amounts."""

    @staticmethod
    def spec(node: fx.Node) -> tuple[Any, list[int], str, float]:
        src = node.args[0]
        pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return src, pad, mode, value or 0.0

    def channel_pad(self, ctx_or_shape_node: fx.Node, pad: list[int]) -> tuple[int, int] | None:
        ndim = len(output_shape(ctx_or_shape_node))
        k = 2 * (ndim - 2)  # pad entries that cover spatial dims
        if len(pad) <= k:
            return 0, 0
        if len(pad) == k + 2:
            return pad[k], pad[k + 1]
        return None  # pads the batch dimension

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src, pad, mode, value = self.spec(node)
        if not ctx.has(src) or not ctx.has(node) or any(not isinstance(p, int) for p in pad):
            return super().connect(ctx, node)
        channel = self.channel_pad(src, pad)
        if channel is None or min(channel) < 0 or (channel != (0, 0) and (mode != "constant" or value != 0)):
            return super().connect(ctx, node)
        front, _ = channel
        ctx.tie_ids(ctx.ids(src), ctx.ids(node)[front:front + ctx.size[src]])

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        src, pad, _, _ = self.spec(node)
        z = ctx.zeros_of(src)
        front, back = self.channel_pad(src, pad)
        if z is None:
            return ctx.not_zero(node)
        return np.concatenate([np.ones(front, bool), z, np.ones(back, bool)])

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        src, pad, _, _ = self.spec(node)
        front, back = self.channel_pad(src, pad)
        if (front, back) == (0, 0) or node not in rw.keep:
            return
        keep = rw.keep[node]
        width = output_shape(node)[1]
        new_front = int(np.sum(keep < front))
        new_back = int(np.sum(keep >= width - back))
        k = len(pad) - 2
        pad[k], pad[k + 1] = new_front, new_back
        if len(node.args) > 1:
            node.args = (node.args[0], tuple(pad), *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "pad": tuple(pad)}


class GetItemHandler(ChannelHandler):
    """Indexing a tensor: keeps channels when the batch and channel dims are taken
    whole (``x[:, :, ::2, ::2]``). Indexing a tuple (the result of an op with no
    handler, such as chunk) yields a pinned tensor."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src, index = node.args
        if not ctx.has(src):
            ctx.pin(node, f"taken from the result of {describe(ctx.gm, src) if isinstance(src, fx.Node) else src}")
            return
        whole = slice(None)
        if isinstance(index, tuple) and len(index) >= 2 and index[0] == whole and index[1] == whole and \
                all(isinstance(i, slice) for i in index) and ctx.has(node):
            ctx.tie(src, node)
            return
        super().connect(ctx, node)

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        src = node.args[0]
        z = ctx.zeros_of(src)
        return z.copy() if z is not None and len(z) == ctx.size[node] else ctx.not_zero(node)


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    if node.op == "call_module":
        return 1, -1  # nn.Flatten's defaults; the handler reads the module below
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start, end


class FlattenHandler(ChannelHandler):
    """flatten from dim 1: channel c owns the contiguous block of H*W features
    [c*H*W, (c+1)*H*W). Flattening from a later dim keeps the channels."""

    def dims(self, ctx: Context, node: fx.Node) -> tuple[int, int]:
        if node.op == "call_module":
            m = ctx.gm.get_submodule(node.target)
            return m.start_dim, m.end_dim
        return _flatten_dims(node)

    def block(self, ctx: Context, node: fx.Node) -> int | None:
        src = node.args[0]
        if not ctx.has(src) or not ctx.has(node):
            return None
        in_shape = output_shape(src)
        start, end = self.dims(ctx, node)
        start, end = start % len(in_shape), end % len(in_shape)
        if start >= 2:
            return 1
        if start == 1 and end == len(in_shape) - 1:
            return math.prod(in_shape[2:])
        return None

    def connect(self, ctx: Context, node: fx.Node) -> None:
        block = self.block(ctx, node)
        if block is None:
            return super().connect(ctx, node)
        ctx.tie_ids(np.repeat(ctx.ids(node.args[0]), block), ctx.ids(node))

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        block, z = self.block(ctx, node), ctx.zeros_of(node.args[0])
        return np.repeat(z, block) if block is not None and z is not None else ctx.not_zero(node)


class ReshapeHandler(FlattenHandler):
    """view / reshape that keep dims 0 and 1, or that flatten everything after the
    batch dim (``x.view(x.size(0), -1)``). A literal size for dim 1 is rewritten."""

    def block(self, ctx: Context, node: fx.Node) -> int | None:
        src = node.args[0]
        if not ctx.has(src) or not ctx.has(node):
            return None
        a, b = output_shape(src), output_shape(node)
        if a[:2] == b[:2]:
            return 1
        if len(b) == 2 and a[0] == b[0] and b[1] == math.prod(a[1:]):
            return math.prod(a[2:])
        return None

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        if node not in rw.keep:
            return
        shape = list(node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
                     else node.args[1:])
        if len(shape) > 1 and isinstance(shape[1], int) and shape[1] != -1:
            shape[1] = len(rw.keep[node])
            node.args = (node.args[0], tuple(shape)) if len(node.args) == 2 and \
                isinstance(node.args[1], (tuple, list)) else (node.args[0], *shape)


class SizeHandler(ChannelHandler):
    """x.size(0) reads the batch size, which pruning does not change. Reading any
    other size observes the channel count, so the tensor is pinned."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim != 0:
            ctx.pin(node.args[0], f"its size is read by '{node.name}'")


FLATTEN = FlattenHandler()
RESHAPE = ReshapeHandler()

OPS: tuple[OpSupport, ...] = (
    module(nn.Flatten, FLATTEN, serializable=True),
    function("torch.flatten", torch.flatten, FLATTEN, serializable=True),
    method("flatten", FLATTEN, serializable=True),
    function("torch.reshape", torch.reshape, RESHAPE, serializable=True),
    method("view", RESHAPE, serializable=True),
    method("reshape", RESHAPE, serializable=True),
    function("torch.cat", torch.cat, CatHandler(), serializable=True),
    function("torch.nn.functional.pad", F.pad, PadHandler(), serializable=True),
    # PadHandler reads and rewrites the pad amounts in a node's arguments; this
    # module holds them itself.
    module(nn.ZeroPad2d, BARRIER, serializable=True),
    function("operator.getitem", operator.getitem, GetItemHandler(), serializable=True),
    method("size", SizeHandler(), serializable=True),
    function("builtins.getattr", builtins.getattr, BARRIER, serializable=True),
    method("dim", BARRIER, serializable=True),
    method("numel", BARRIER, serializable=True),

    function("torch.stack", torch.stack, BARRIER, serializable=True),
    function("torch.transpose", torch.transpose, BARRIER, serializable=True),
    function("torch.permute", torch.permute, BARRIER, serializable=True),
    function("torch.squeeze", torch.squeeze, BARRIER, serializable=True),
    function("torch.unsqueeze", torch.unsqueeze, BARRIER, serializable=True),
    function("torch.chunk", torch.chunk, BARRIER, serializable=True),
    function("torch.split", torch.split, BARRIER, serializable=True),
    function("torch.narrow", torch.narrow, BARRIER, serializable=True),
    method("permute", BARRIER, serializable=True),
    method("transpose", BARRIER, serializable=True),
    method("squeeze", BARRIER, serializable=True),
    method("unsqueeze", BARRIER, serializable=True),
    method("expand", BARRIER, serializable=True),
    method("expand_as", BARRIER, serializable=True),
    method("view_as", BARRIER, serializable=True),
    method("chunk", BARRIER, serializable=True),
    method("split", BARRIER, serializable=True),
    method("narrow", BARRIER, serializable=True),
)
