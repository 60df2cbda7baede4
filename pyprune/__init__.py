"""pyprune: a compiler for CNN compression.

The data path is laid out as packages: ``data`` (load), ``models`` (zoo and
checkpoints), ``ir`` (trace, shape propagation, accounting, pass manager),
``passes`` (transformations), ``train`` (fine-tuning engine), with ``api`` as
the Python entry point and ``cli`` a thin layer over it.
"""

# Loaded first so that the native extensions (pyprune._C, pyprune._C_cuda), which
# link against libtorch without an rpath, find its libraries already in the process.
import torch  # noqa: F401

__version__ = "0.1.0"

# Registers every op's channel handler, allowlist entry and MAC rule (pyprune.ops):
# those registries start empty, and this runs before any pyprune submodule can be
# used to trace, analyse, serialize or count. Placed after __version__ so that a
# module reached from here that reads it (as cli, compile and export do) finds it
# on the half-initialised package.
from . import ops  # noqa: E402, F401
