"""Transformation passes on the graph IR, one pass per file.

Each pass is a :class:`GraphPass` (``requires`` / ``call`` / ``ensures``, as in
torch.fx's ``PassBase``) whose module docstring states its contract: what it needs
in the IR, what it guarantees, and what it refuses. Passes register by class
(:func:`register_pass`) with their options, search knob and training constraints
declared, in one table (:data:`PASSES`) that pipeline strings
(:func:`parse_pipeline`, as in ``pyprune opt --passes "slim(ratio=0.4)"``),
``pyprune passes`` and the compile search all read.
"""

from .base import GraphPass, Knob, Option, Range, check_levels, constrains_training, shares_weights
from .constraints import TrainHooks, codebook_layers, codebooks_of, constraint_hooks, read_codebooks
from .layers import weight_layers
from .pipeline import PassSpec, PipelineSyntaxError, build_pipeline, parse_pipeline
from .registry import (PASSES, create_pass, describe_pass, describe_passes, parse_levels, pass_class, register_pass,
                       registered, searchable_passes, unregister_pass)

__all__ = ["GraphPass", "Knob", "Option", "PASSES", "PassSpec", "PipelineSyntaxError", "Range", "TrainHooks",
           "build_pipeline", "check_levels", "codebook_layers", "codebooks_of", "constrains_training",
           "constraint_hooks", "create_pass", "describe_pass", "describe_passes", "parse_levels", "parse_pipeline", "pass_class",
           "read_codebooks", "register_pass", "registered", "searchable_passes", "shares_weights",
           "unregister_pass", "weight_layers"]

# The built-in passes register themselves on import.
from . import slim  # noqa: E402,F401
from . import mask  # noqa: E402,F401
from . import quant  # noqa: E402,F401
from . import bnfold  # noqa: E402,F401
