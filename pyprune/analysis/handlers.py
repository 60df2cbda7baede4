"""Per-op channel handlers: the registry behind :mod:`pyprune.analysis.channels`.

A handler knows three things about one kind of op:

* ``connect``: which of its input and output positions are tied, pinned, read by
  a channel-mixing computation, or scored by a BatchNorm;
* ``zeros``: which output channels are zero in the masked model, given which input
  channels are (forward zero propagation);
* ``rewrite``: how to change the op when channels are removed (new smaller
  modules, new pad amounts, new view sizes).

Handlers are looked up by module type (through the MRO), by function, or by method
name. An op with no handler is a barrier: its inputs and outputs are pinned, so no
channel is pruned across it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ir import output_shape

if TYPE_CHECKING:
    from .channels import DisjointSets


class Context:
    """What handlers record while the graph is analysed."""

    def __init__(self, gm: fx.GraphModule, base: dict[fx.Node, int], size: dict[fx.Node, int],
                 sets: "DisjointSets") -> None:
        self.gm = gm
        self.base = base
        self.size = size
        self.sets = sets
        self.pinned: dict[int, str] = {}
        self.readers: list[tuple[fx.Node, str]] = []
        self.batchnorms: list[tuple[str, fx.Node]] = []
        self.barriers: list[str] = []
        self.zero: dict[fx.Node, np.ndarray] = {}

    def has(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.base

    def ids(self, node: fx.Node) -> np.ndarray:
        return np.arange(self.base[node], self.base[node] + self.size[node])

    def tie_ids(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.sets.union(x, y)

    def tie(self, a: fx.Node, b: fx.Node) -> None:
        """Tie channel c of ``a`` to channel c of ``b``; pin both if widths differ."""
        if self.size[a] != self.size[b]:
            self.pin(a, f"width mismatch at {b.name}")
            self.pin(b, f"width mismatch at {a.name}")
            return
        self.tie_ids(self.ids(a), self.ids(b))

    def pin(self, node: Any, why: str) -> None:
        if self.has(node):
            for p in self.ids(node).tolist():
                self.pinned.setdefault(p, why)

    def read(self, node: Any, by: str) -> None:
        """``node``'s channels are read by a channel-mixing op ``by``."""
        if self.has(node):
            self.readers.append((node, by))

    def zeros_of(self, node: Any) -> np.ndarray | None:
        return self.zero.get(node) if self.has(node) else None

    def not_zero(self, node: fx.Node) -> np.ndarray:
        return np.zeros(self.size[node], dtype=bool)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{node.name}' ({node.op} {target})"


def tensor_args(ctx: Context, node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if ctx.has(a)]


class Rewriter:
    """Applies a removal plan: ``keep[node]`` lists the channels each node keeps."""

    def __init__(self, gm: fx.GraphModule, keep: dict[fx.Node, np.ndarray]) -> None:
        self.gm = gm
        self.keep = keep
        self._replaced: dict[str, tuple[tuple, nn.Module]] = {}

    def kept(self, node: fx.Node) -> torch.Tensor:
        return torch.as_tensor(self.keep[node], dtype=torch.long)

    def unchanged(self, node: Any) -> bool:
        return not isinstance(node, fx.Node) or node not in self.keep or \
            len(self.keep[node]) == output_shape(node)[1]

    def in_out_keep(self, node: fx.Node, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kept input channels, kept output channels) of a layer, or None if it keeps all."""
        src = node.args[0]
        if self.unchanged(node) and self.unchanged(src):
            return None
        return (self.kept(src) if src in self.keep else torch.arange(n_in),
                self.kept(node) if node in self.keep else torch.arange(n_out))

    def replace_module(self, node: fx.Node, key: tuple, build: Callable[[], nn.Module]) -> None:
        """Swap the module called by ``node``; a module shared by several calls must
        shrink the same way at each of them."""
        target = node.target
        if target in self._replaced:
            if self._replaced[target][0] != key:
                raise RuntimeError(f"module '{target}' is called at several places that need different widths")
            return
        new = build()
        parent_name, _, leaf = target.rpartition(".")
        setattr(self.gm.get_submodule(parent_name), leaf, new)
        self._replaced[target] = (key, new)


def _filled(new: nn.Module, old: nn.Module, weight: torch.Tensor, out_keep: torch.Tensor) -> nn.Module:
    """``new`` with ``weight`` and the kept part of ``old``'s bias, on ``old``'s device and mode."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias[out_keep])
    return new.to(old.weight.device).train(old.training)


class ChannelHandler:
    """Base: a barrier. Subclasses override what they know."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        inputs = tensor_args(ctx, node)
        if not inputs and not ctx.has(node):
            return  # arithmetic on sizes and other non-tensors: no channels involved
        why = f"barrier {describe(ctx.gm, node)}"
        ctx.barriers.append(describe(ctx.gm, node))
        for a in inputs:
            ctx.pin(a, why)
            ctx.read(a, why)
        ctx.pin(node, why)

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        return ctx.not_zero(node)

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        pass


class Inert(ChannelHandler):
    """Graph inputs, constants and outputs: pinned, but not barriers worth a warning."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        why = {"placeholder": "graph input", "get_attr": "constant tensor", "output": "graph output"}[node.op]
        ctx.pin(node, why)
        for a in tensor_args(ctx, node):
            ctx.pin(a, why)
            ctx.read(a, why)


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


class BatchNormHandler(PassThrough):
    """BatchNorm: per channel; its |gamma| scores the group. In the masked model its
    gamma and beta are zero, so its output is zero."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        super().connect(ctx, node)
        if ctx.gm.get_submodule(node.target).affine and ctx.has(node):
            ctx.batchnorms.append((node.target, node))

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        affine = ctx.gm.get_submodule(node.target).affine
        return np.ones(ctx.size[node], dtype=bool) if affine else ctx.not_zero(node)

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        if rw.unchanged(node):
            return
        bn = rw.gm.get_submodule(node.target)
        keep = rw.kept(node)

        def build() -> nn.Module:
            new = type(bn)(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    old = getattr(bn, name)
                    if old is not None:
                        getattr(new, name).copy_(old[keep])
                if bn.num_batches_tracked is not None:
                    new.num_batches_tracked.copy_(bn.num_batches_tracked)
            return new.to(bn.weight.device if bn.weight is not None else "cpu").train(bn.training)

        rw.replace_module(node, tuple(keep.tolist()), build)


class ConvHandler(ChannelHandler):
    """Convolutions. Output channels are fresh positions (a conv mixes channels), and
    the input is read. Grouped convolutions tie the k-th channel of every group, so
    groups stay equal in size; depthwise ones tie input c to outputs c*m..c*m+m-1 and
    pass zeros through when they have no bias."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        conv = ctx.gm.get_submodule(node.target)
        src = node.args[0]
        if conv.transposed or not ctx.has(src) or not ctx.has(node):
            return super().connect(ctx, node)
        if self.depthwise(conv):
            m = conv.out_channels // conv.in_channels
            ctx.tie_ids(np.repeat(ctx.ids(src), m), ctx.ids(node))
            return
        ctx.read(src, f"conv '{node.target}'")
        if conv.groups > 1:
            for ids, per_group in ((ctx.ids(src), conv.in_channels // conv.groups),
                                   (ctx.ids(node), conv.out_channels // conv.groups)):
                blocks = ids.reshape(conv.groups, per_group)
                for g in range(1, conv.groups):
                    ctx.tie_ids(blocks[0], blocks[g])

    @staticmethod
    def depthwise(conv: nn.Module) -> bool:
        return conv.groups > 1 and conv.groups == conv.in_channels

    def zeros(self, ctx: Context, node: fx.Node) -> np.ndarray:
        conv = ctx.gm.get_submodule(node.target)
        z = ctx.zeros_of(node.args[0])
        if self.depthwise(conv) and conv.bias is None and z is not None:
            return np.repeat(z, conv.out_channels // conv.in_channels)
        return ctx.not_zero(node)

    def rewrite(self, rw: Rewriter, node: fx.Node) -> None:
        conv = rw.gm.get_submodule(node.target)
        keeps = rw.in_out_keep(node, conv.in_channels, conv.out_channels)
        if keeps is None:
            return
        in_keep, out_keep = keeps
        if self.depthwise(conv):
            groups, weight = len(in_keep), conv.weight[out_keep]
        elif conv.groups == 1:
            groups, weight = 1, conv.weight[out_keep][:, in_keep]
        else:  # tied across groups, so the kept in-group indices are those of group 0
            per_group = conv.in_channels // conv.groups
            groups, weight = conv.groups, conv.weight[out_keep][:, in_keep[in_keep < per_group]]

        def build() -> nn.Module:
            new = type(conv)(weight.shape[1] * groups, len(out_keep), conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=groups,
                             bias=conv.bias is not None, padding_mode=conv.padding_mode)
            return _filled(new, conv, weight, out_keep)

        rw.replace_module(node, (tuple(in_keep.tolist()), tuple(out_keep.tolist())), build)


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
            return _filled(new, lin, lin.weight[out_keep][:, in_keep], out_keep)

        rw.replace_module(node, (tuple(in_keep.tolist()), tuple(out_keep.tolist())), build)


class Elementwise(ChannelHandler):
    """add, sub, mul, div of equal-shaped tensors (scalars allowed): all tensor
    operands and the output are tied channel by channel. ``zero``: how zeros combine:
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
        if any(z is None for z in zs):
            return ctx.not_zero(node)
        if self.zero == "all":
            return np.logical_and.reduce(zs)
        if self.zero == "any":
            return np.logical_or.reduce(zs)
        return zs[0].copy()


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


class ReduceHandler(PassThrough):
    """mean over dims that exclude batch and channels: keeps channels."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        src = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not ctx.has(src) or dims is None or any(d % len(output_shape(src)) < 2 for d in dims):
            return ChannelHandler.connect(self, ctx, node)
        super().connect(ctx, node)


class SizeHandler(ChannelHandler):
    """x.size(0) reads the batch size, which pruning does not change. Reading any
    other size observes the channel count, so the tensor is pinned."""

    def connect(self, ctx: Context, node: fx.Node) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim != 0:
            ctx.pin(node.args[0], f"its size is read by '{node.name}'")


PASS_THROUGH = PassThrough(keeps_zero=True)
CHANNEL_HANDLERS: dict[str, dict[Any, ChannelHandler]] = {"module": {}, "function": {}, "method": {}}


def register_module(handler: ChannelHandler, *types: type) -> None:
    for t in types:
        CHANNEL_HANDLERS["module"][t] = handler


def register_function(handler: ChannelHandler, *functions: Callable) -> None:
    for f in functions:
        CHANNEL_HANDLERS["function"][f] = handler


def register_method(handler: ChannelHandler, *names: str) -> None:
    for n in names:
        CHANNEL_HANDLERS["method"][n] = handler


register_module(ConvHandler(), nn.Conv1d, nn.Conv2d, nn.Conv3d)
register_module(LinearHandler(), nn.Linear)
register_module(BatchNormHandler(), nn.modules.batchnorm._BatchNorm)
register_module(PASS_THROUGH, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh,
                nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
                nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
register_module(PassThrough(keeps_zero=False), nn.Sigmoid, nn.Hardsigmoid)
register_module(FlattenHandler(), nn.Flatten)
register_function(PASS_THROUGH, F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish,
                  F.hardtanh, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool2d)
register_function(PassThrough(keeps_zero=False), torch.sigmoid, F.sigmoid, F.hardsigmoid)
register_function(Elementwise("all"), operator.add, operator.sub, operator.iadd, torch.add, torch.sub)
register_function(Elementwise("any"), operator.mul, operator.imul, torch.mul)
register_function(Elementwise("first"), operator.truediv, torch.div)
register_function(CatHandler(), torch.cat)
register_function(PadHandler(), F.pad)
register_function(GetItemHandler(), operator.getitem)
register_function(FlattenHandler(), torch.flatten)
register_function(ReshapeHandler(), torch.reshape)
register_method(PASS_THROUGH, "relu", "relu_", "contiguous", "clone", "tanh")
register_method(Elementwise("all"), "add", "add_", "sub", "sub_")
register_method(Elementwise("any"), "mul", "mul_")
register_method(Elementwise("first"), "div", "div_")
register_method(FlattenHandler(), "flatten")
register_method(ReshapeHandler(), "view", "reshape")
register_method(ReduceHandler(), "mean")
register_method(SizeHandler(), "size")

_BARRIER = ChannelHandler()
_INERT = Inert()


def handler_for(gm: fx.GraphModule, node: fx.Node) -> ChannelHandler:
    """The handler of ``node``: by module type (MRO), function, or method name; a
    barrier when none is registered."""
    if node.op in ("placeholder", "get_attr", "output"):
        return _INERT
    if node.op == "call_module":
        for klass in type(gm.get_submodule(node.target)).__mro__:
            if klass in CHANNEL_HANDLERS["module"]:
                return CHANNEL_HANDLERS["module"][klass]
        return _BARRIER
    table = CHANNEL_HANDLERS["function" if node.op == "call_function" else "method"]
    return table.get(node.target, _BARRIER)
