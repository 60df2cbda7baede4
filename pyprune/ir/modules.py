"""Modules that passes put into graphs, and that the file formats, the runtime and the
exporter know: plain ``nn.Module`` s with a documented function, so a saved graph that
holds them needs nothing but the allowlist to rebuild."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1 of ``x``): a BatchNorm as inference
    uses it, two vectors instead of four and a counter (the ``bnfold`` pass). The vectors
    may be stored as float16; the arithmetic runs in the input's dtype."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale = nn.Parameter(torch.ones(num_features))
        self.shift = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.to(x.dtype).view(shape) + self.shift.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, {self.scale.dtype}".replace("torch.", "")


# Modules of pyprune's own that tracing keeps whole, as it keeps torch.nn's.
LEAF_MODULES: tuple[type[nn.Module], ...] = (ChannelAffine,)


def inference_only(model: nn.Module) -> list[str]:
    """Names of the submodules that make ``model`` an inference-only one (folded BatchNorm)."""
    return [name for name, m in model.named_modules() if isinstance(m, ChannelAffine)]


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module`` in training or eval mode for the block, and every submodule in its
    own mode again after, whatever the block raised: annotating, exporting or
    measuring a model must not leave the caller's BatchNorm and dropout switched (nor
    unfreeze a BatchNorm the caller keeps in eval mode inside a training model)."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, was_training in modes:
            m.training = was_training
