"""Transformation passes on the graph IR, one pass per file.

Each pass is a plain callable ``GraphModule -> PassResult`` (see
:mod:`pyprune.ir.pass_manager`) whose docstring states its contract: what it
needs in the IR, what it guarantees, and what it refuses. Passes register under
a name (:func:`register_pass`) so pipelines can be written as text
(:func:`parse_pipeline`), as in ``pyprune opt --passes "slim(ratio=0.4)"``.
"""

from .pipeline import PassSpec, PipelineSyntaxError, build_pipeline, parse_pipeline
from .registry import PASSES, create_pass, register_pass

__all__ = ["PASSES", "PassSpec", "PipelineSyntaxError", "build_pipeline", "create_pass", "parse_pipeline",
           "register_pass"]

from . import slim  # noqa: E402,F401  (registers the pass)
from . import mask  # noqa: E402,F401
from . import quant  # noqa: E402,F401
