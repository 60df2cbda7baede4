"""What passes ask of fine-tuning, as a type the engine (:mod:`pyprune.train`) runs
without knowing any pass: hooks after ``backward`` (edit gradients: zero those of
masked weights, average them over a shared weight's cluster) and after each optimizer
step (restore invariants on the weights: re-apply masks, re-tie shared weights), and
*projections* for constraints kept by straight-through training.

A projection trains its layers through full-precision *latent* weights: the
optimizer steps the latent weights, with the gradient taken at the projected ones,
and after every step the weights the model uses are the latent ones passed through
every projection, in pipeline order (magnitude pruning to an exact count, then the
nearest of a layer's shared values). A weight can then change cluster, or come back
from zero when it grows larger than one that is kept, which tying the clusters or
the zero set once (the hooks) never allows: on the adapted ResNet-20, mask 0.8 and
3-bit codes fine-tuned half an epoch recover to 0.8435 this way, 0.8290 with the zero
set kept and 0.7970 with it kept and the clusters tied (``bench/straight_through.py``).

It lives here, with the passes, so that passes implement it and the engine consumes
it, and neither imports the other's internals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from .base import GraphPass

Hook = Callable[[nn.Module], None]


@dataclass
class Projection:
    """Maps latent weights to the weights a model uses: ``project`` edits, in place,
    a dict holding (a copy of) the current weights of at least ``layers``, by layer
    name. ``moves_zeros``: it may choose other weights to be zero than the ones that
    are zero now (magnitude pruning with regrowth)."""

    layers: tuple[str, ...]
    project: Callable[[dict[str, torch.Tensor]], None]
    moves_zeros: bool = False


@dataclass
class TrainHooks:
    after_backward: list[Hook] = field(default_factory=list)
    after_step: list[Hook] = field(default_factory=list)
    # told the number of optimizer steps the fine-tune will take, before the first one
    # (a schedule over the fine-tune, such as gradual pruning, needs its length)
    on_start: list[Callable[[int], None]] = field(default_factory=list)
    # constraints kept by straight-through training, applied in order after every step
    projections: list[Projection] = field(default_factory=list)
    # the hooks captured the zero set when they were made, and rely on it staying
    # (tied clusters): they cannot follow a projection that moves it
    fixes_zeros: bool = False

    def extend(self, other: "TrainHooks") -> "TrainHooks":
        if other.fixes_zeros and any(p.moves_zeros for p in self.projections):
            raise ValueError("a constraint captured when fine-tuning starts (clusters tied by grad=mean or "
                             "grad=sum) cannot follow a mask that regrows weights: use quant(grad=ste) or "
                             "mask(regrow=False) before it")
        self.after_backward.extend(other.after_backward)
        self.after_step.extend(other.after_step)
        self.on_start.extend(other.on_start)
        self.projections.extend(other.projections)
        self.fixes_zeros = self.fixes_zeros or other.fixes_zeros
        return self


def constraint_hooks(passes: Iterable["GraphPass"], gm: fx.GraphModule) -> TrainHooks:
    """The training hooks of every pass in ``passes`` (earliest first), each captured
    from ``gm`` as it is now, so that fine-tuning keeps the constraints of all the
    passes run so far. Capturing again after every pass (rather than once, right
    after each pass) keeps the hooks valid when a later pass reshapes a layer: the
    constraints themselves live in the weights (exact zeros, tied values). Passes
    with no constraints add nothing."""
    hooks = TrainHooks()
    for p in passes:
        hooks.extend(p.training_hooks(gm))
    return hooks


def codebook_layers(passes: Iterable["GraphPass"], gm: fx.GraphModule) -> dict[str, int]:
    """``{layer: bits}`` of every layer whose weights one of ``passes`` shares, in
    pipeline order (a later pass's bound wins)."""
    layers: dict[str, int] = {}
    for p in passes:
        layers.update(p.codebook_layers(gm))
    return layers


def read_codebooks(gm: nn.Module, layers: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
    """The current codebook of each named layer: its sorted distinct non-zero weight
    values (float, on the CPU), checked against the layer's bound of ``2**bits``
    values where one is given. Read from the weights, because centroid fine-tuning
    moves the values after the pass recorded them."""
    out = {}
    for name, bits in layers.items():
        w = gm.get_submodule(name).weight.detach()
        values = torch.unique(w[w != 0]).cpu()
        if bits is not None and values.numel() > 2**bits:
            raise ValueError(f"{name} has {values.numel()} distinct non-zero values, more than 2**{bits}")
        out[name] = values
    return out


def codebooks_of(passes: Iterable["GraphPass"], gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The codebooks of every layer whose weights one of ``passes`` shares: what the
    ``.ppz`` container stores beside those layers."""
    return read_codebooks(gm, codebook_layers(passes, gm))
