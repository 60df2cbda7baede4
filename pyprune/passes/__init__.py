"""Transformation passes on the graph IR, one pass per file.

Each pass is a plain callable ``GraphModule -> PassResult`` (see
:mod:`pyprune.ir.pass_manager`) whose docstring states its contract: what it
needs in the IR, what it guarantees, and what it refuses. The structured
(channel slimming) and unstructured (masking, codebook quantization) passes of
the compression pipeline land here.
"""
