"""Shape propagation: run the graph once on an example input and record shape and
dtype on every node as ``node.meta['tensor_meta']`` (torch.fx's ``ShapeProp``)."""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .modules import in_mode


def propagate_shapes(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> fx.GraphModule:
    """Annotate ``gm`` in place and return it. Runs in eval mode under no_grad so
    that annotation never changes BatchNorm statistics."""
    with in_mode(gm, training=False), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def tensor_meta(node: fx.Node) -> TensorMetadata | None:
    """The recorded metadata of a node's output, or None for non-tensor outputs."""
    meta = node.meta.get("tensor_meta")
    return meta if isinstance(meta, TensorMetadata) else None


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    return tuple(meta.shape) if meta is not None else None


def example_input(input_shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """A deterministic input for shape propagation and numeric checks."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *input_shape), generator=generator)
