"""pyprune: a compiler for CNN compression.

The data path is laid out as packages: ``data`` and ``models`` (load), ``ir``
(trace, shape propagation, accounting, pass manager), ``analysis`` (channel
dependencies), ``ops`` (what each op supports), ``passes`` (transformations),
``encode`` (files), ``runtime`` and ``export`` (inference, ONNX), ``train`` (the
fine-tuning engine), ``opt`` and ``search`` and ``compile`` (pipelines and the
target-driven search), with ``api`` as the Python entry point and ``cli`` a thin
layer over it. The layers only import downwards; ``pyproject.toml`` states them
(``[tool.importlinter]``) and ``tests/test_layers.py`` checks them.
"""

# Loaded first so that the native extensions (pyprune._C, pyprune._C_cuda), which
# link against libtorch without an rpath, find its libraries already in the process.
import torch  # noqa: F401

from .version import __version__  # noqa: E402, F401  (pyprune.__version__)

# Registers every op's channel handler, allowlist entry and MAC rule (pyprune.ops):
# those registries start empty, and this runs before any pyprune submodule can be
# used to trace, analyse, serialize or count.
from . import ops  # noqa: E402, F401
