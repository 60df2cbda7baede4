"""bnfold: BatchNorm as inference uses it.

Needs: a ``GraphModule`` whose BatchNorm modules (``call_module`` nodes of
``nn.BatchNorm1d/2d``) track running statistics. The result is for inference: in eval
mode a BatchNorm is the per-channel affine map ``x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``.

Guarantees: no BatchNorm module is called any more, and the model's eval-mode outputs
are those of before to float rounding (to float16 rounding of ``s`` and ``t`` with
``float16=True``). Where a BatchNorm reads the output of a Conv (not transposed) or
Linear layer that nothing else reads, called once, and whose weights are not shared
(not tied to a codebook), it is folded into that layer: ``w * s`` and
``(b - running_mean) * s + beta`` (torch's ``fuse_conv_bn_weights``); the layer's
exact zeros stay +0.0. Everywhere else, shared weights included (scaling them would
undo their codebook: each output channel would need its own), the BatchNorm becomes a
:class:`~pyprune.ir.modules.ChannelAffine` holding ``s`` and ``t``: two vectors in place
of four and a counter. The record lists what went where.

Refuses: BatchNorm without running statistics (``track_running_stats=False``, which
normalises by the batch even in eval mode): it is left as it is, and the record says
so. A folded model is for inference: fine-tuning refuses it (``pyprune.train``), and
``slim`` treats ChannelAffine as a barrier.

Shared layers: ``shared`` names them; by default a layer counts as shared when its
non-zero weights take at most 65,535 distinct values, and at most half as many as
there are non-zero weights (quantized layers; an unquantized float layer's values
almost never repeat).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..ir import ChannelAffine, PassResult, call_counts
from .base import GraphPass, Option
from .registry import register_pass

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def looks_shared(weight: torch.Tensor) -> bool:
    """Whether a layer's non-zero weights repeat as a codebook's do (see the module docstring)."""
    nonzero = weight.detach()[weight.detach() != 0]
    if nonzero.numel() < 2:
        return False
    distinct = torch.unique(nonzero).numel()
    return distinct <= 65535 and 2 * distinct <= nonzero.numel()


def affine_of(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of a BatchNorm in eval mode: ``bn(x) == x * s + t`` per channel."""
    with torch.no_grad():
        s = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight
        t = -bn.running_mean * s
        if bn.bias is not None:
            t = t + bn.bias
    return s, t


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, module)


def fold_affine(gm: fx.GraphModule) -> dict[str, str]:
    """In place: fold each ChannelAffine that reads a Conv or Linear output nothing else
    reads into that layer (``w * s``, ``b * s + t``), whether or not its weights are
    shared: for the runtime, which keeps weights as float32 anyway. Returns
    ``{ChannelAffine: layer}``."""
    calls = call_counts(gm)
    folded = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ChannelAffine):
            continue
        src = node.args[0]
        layer = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not (isinstance(layer, _FOLDABLE) and not getattr(layer, "transposed", False) and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            continue
        affine = gm.get_submodule(node.target)
        new = copy.deepcopy(layer)
        with torch.no_grad():
            s, t = affine.scale.to(layer.weight.dtype), affine.shift.to(layer.weight.dtype)
            new.weight = nn.Parameter(layer.weight * s.view((-1,) + (1,) * (layer.weight.dim() - 1)) + 0.0)
            bias = layer.bias if layer.bias is not None else torch.zeros_like(s)
            new.bias = nn.Parameter(bias * s + t)
        _set_module(gm, src.target, new)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded[node.target] = src.target
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


@register_pass
class BnFold(GraphPass):
    """fold each BatchNorm into the layer before it, or into a two-vector ChannelAffine (inference only)"""

    name = "bnfold"
    options = (
        Option("float16", bool, False, "store the ChannelAffine vectors as float16"),
        Option("shared", (list, tuple), None, "layers whose weights keep their values (codebooks); default: "
               "detected from repeated values"),
    )
    examples = (("bnfold", "fold every BatchNorm (after the other passes: the result is for inference)"),
                ("mask(sparsity=0.8),quant(bits=5),bnfold(float16=True)", "deep compression, then BN as 2 fp16 "
                 "vectors per quantized layer"))

    def __init__(self, float16: bool = False, shared: Sequence[str] | None = None) -> None:
        self.check_options(dict(float16=float16, shared=shared))
        self.float16 = float16
        self.shared = None if shared is None else tuple(str(s) for s in shared)
        # float rounding only, unless the vectors are rounded to float16: the pass
        # manager's numeric check applies to the first
        self.changes_outputs = float16

    def _is_shared(self, gm: fx.GraphModule, target: str) -> bool:
        if self.shared is not None:
            return target in self.shared
        return looks_shared(gm.get_submodule(target).weight)

    def call(self, gm: fx.GraphModule) -> PassResult:
        calls = call_counts(gm)
        folded: dict[str, str] = {}  # BatchNorm -> the layer it went into
        affine: list[str] = []
        kept: dict[str, str] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            bn = gm.get_submodule(node.target)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            if not bn.track_running_stats or bn.running_mean is None:
                kept[node.target] = "no running statistics: normalises by the batch even in eval mode"
                continue
            src = node.args[0]
            layer = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
            if isinstance(layer, _FOLDABLE) and not getattr(layer, "transposed", False) and len(src.users) == 1 \
                    and calls[src.target] == 1 and calls[node.target] == 1 and not self._is_shared(gm, src.target):
                self._fold(gm, src.target, layer, bn)
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                folded[node.target] = src.target
            else:
                _set_module(gm, node.target, self._affine(bn))
                affine.append(node.target)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        record: dict[str, Any] = {"folded": folded, "affine": affine, "kept": kept, "float16": self.float16}
        return PassResult(gm, modified=bool(folded or affine), record=record)

    @staticmethod
    def _fold(gm: fx.GraphModule, target: str, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
        new = copy.deepcopy(layer)
        with torch.no_grad():
            fuse = fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fuse_conv_bn_weights
            w, b = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            # + 0.0 maps the -0.0 a negative scale makes of a pruned weight back to +0.0,
            # which the container stores as a zero (it keeps -0.0 as a value)
            new.weight = nn.Parameter(w.detach() + 0.0)
            new.bias = nn.Parameter(b.detach())
        _set_module(gm, target, new.train(layer.training))

    def _affine(self, bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine:
        s, t = affine_of(bn)
        m = ChannelAffine(s.numel())
        dtype = torch.float16 if self.float16 else s.dtype
        m.scale = nn.Parameter(s.detach().to(dtype))
        m.shift = nn.Parameter(t.detach().to(dtype))
        return m.to(bn.running_mean.device)

    def summary(self, record: Mapping[str, Any]) -> str | None:
        n = len(record.get("folded", {})) + len(record.get("affine", []))
        if not n:
            return None
        return (f"bnfold: {len(record['folded'])} BatchNorm folded into the layer before, "
                f"{len(record['affine'])} kept as {'float16 ' if record['float16'] else ''}scale and shift")
