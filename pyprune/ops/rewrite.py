"""Applying a channel-removal plan to a graph: :class:`Rewriter`, which slim drives
and which each channel handler's ``rewrite`` uses to swap in smaller modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..ir import output_shape


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


def filled(new: nn.Module, old: nn.Module, weight: torch.Tensor, out_keep: torch.Tensor) -> nn.Module:
    """``new`` with ``weight`` and the kept part of ``old``'s bias, on ``old``'s device and mode."""
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias[out_keep])
    return new.to(old.weight.device).train(old.training)
