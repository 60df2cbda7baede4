"""Convolutions: ``nn.Conv1d/2d/3d`` (channel handler, MAC rule),
``nn.ConvTranspose2d`` and ``F.conv2d`` (serializable barriers)."""

from __future__ import annotations

import math

import numpy as np
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.context import Context
from ..analysis.registry import ChannelHandler
from .registry import BARRIER, OpSupport, function, module
from .rewrite import Rewriter, filled


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
            return filled(new, conv, weight, out_keep)

        rw.replace_module(node, (tuple(in_keep.tolist()), tuple(out_keep.tolist())), build)


def conv_macs(m: nn.Module, out_shape: tuple[int, ...]) -> int:
    """MACs of a convolution for the whole batch."""
    # Each output element sums over in_channels/groups times the kernel window.
    return math.prod(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size)


CONV = ConvHandler()

OPS: tuple[OpSupport, ...] = (
    module(nn.Conv1d, CONV, serializable=True, macs=conv_macs),
    module(nn.Conv2d, CONV, serializable=True, macs=conv_macs),
    # Analysed and counted, but not in graph format version 1: allowlisting it is a
    # format change (older readers refuse files that use it).
    module(nn.Conv3d, CONV, serializable=False, macs=conv_macs),
    # ConvHandler treats transposed convolutions as barriers: their weight is
    # (in, out/groups, ...), not the (out, in/groups, ...) its rewrite indexes.
    module(nn.ConvTranspose2d, BARRIER, serializable=True),
    function("torch.nn.functional.conv2d", F.conv2d, BARRIER, serializable=True),
)
