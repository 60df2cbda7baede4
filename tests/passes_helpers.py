"""Helpers shared by tests that need a compressed model."""

from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.passes import build_pipeline
from pyprune.passes.quant import codebooks


def compressed(model, pipeline="slim(ratio=0.3),mask(sparsity=0.8),quant(bits=5)"):
    """Run ``pipeline`` on a LoadedModel's module; return the graph module and the
    quant pass's codebooks (layer name -> sorted distinct non-zero values)."""
    gm = propagate_shapes(trace(model.module), example_input(model.input_shape))
    books = {}
    for p in build_pipeline(pipeline):
        result = p(gm)
        gm = propagate_shapes(result.graph_module, example_input(model.input_shape))
        if p.name == "quant":
            books = codebooks(gm, result.record)
    return gm, books
