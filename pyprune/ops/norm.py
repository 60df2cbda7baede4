"""Normalisation: BatchNorm (channel handler, on the ``_BatchNorm`` base; its |gamma|
scores channel groups), and the serializable barriers LayerNorm, GroupNorm,
``F.batch_norm`` and ChannelAffine (a BatchNorm folded for inference by ``bnfold``;
folded models are not slimmed again)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.context import Context
from ..ir.modules import ChannelAffine
from .identity import PassThrough
from .registry import BARRIER, INHERITED, OpSupport, function, module
from .rewrite import Rewriter


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


OPS: tuple[OpSupport, ...] = (
    # On the base class, so that every BatchNorm (1d/2d/3d, SyncBatchNorm, lazy
    # ones) is analysed, while only the exact types below are in the graph format.
    module(nn.modules.batchnorm._BatchNorm, BatchNormHandler(), serializable=False),
    module(nn.BatchNorm1d, INHERITED, serializable=True),
    module(nn.BatchNorm2d, INHERITED, serializable=True),
    # Statistics over the channels themselves: removing one changes the others.
    module(nn.LayerNorm, BARRIER, serializable=True),
    module(nn.GroupNorm, BARRIER, serializable=True),
    function("torch.nn.functional.batch_norm", F.batch_norm, BARRIER, serializable=True),
    function("torch.nn.functional.layer_norm", F.layer_norm, BARRIER, serializable=True),
    module(ChannelAffine, BARRIER, serializable=True),
)
