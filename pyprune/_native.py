"""Access to pyprune's compiled extensions, with errors that say how to build them.

``pyprune._C`` (CPU kernels) is always built; ``pyprune._C_cuda`` (CUDA kernels) only
where nvcc was found at build time. Import them through :func:`cpu` and :func:`cuda`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The extensions link against libtorch/libc10 without an rpath: those are found only
# once torch itself has loaded them.
import torch  # noqa: F401

_BUILD_HINT = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(or `make test`)"
)


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"pyprune.{name}")


def cpu() -> ModuleType:
    """Return the CPU extension module ``pyprune._C``.

    Raises:
        ImportError: the extension is not built, or was built against another torch.
    """
    try:
        return _load("_C")
    except ImportError as exc:
        raise ImportError(
            f"pyprune's native CPU extension pyprune._C is not built or does not load ({exc}); {_BUILD_HINT}."
        ) from exc


def has_cuda_extension() -> bool:
    """Whether ``pyprune._C_cuda`` was built and imports (a GPU need not be present)."""
    try:
        _load("_C_cuda")
    except ImportError:
        return False
    return True


def cuda(required: bool = False) -> ModuleType | None:
    """Return the CUDA extension module ``pyprune._C_cuda``, or None if it is not built.

    Args:
        required: raise instead of returning None.

    Raises:
        ImportError: ``required`` is set and the extension is not built or does not load.
    """
    try:
        return _load("_C_cuda")
    except ImportError as exc:
        if not required:
            return None
        raise ImportError(
            f"pyprune's CUDA extension pyprune._C_cuda is not built or does not load ({exc}); it is built "
            f"only where nvcc is found (set CUDA_HOME, or PYPRUNE_CUDA=1 to insist): {_BUILD_HINT}."
        ) from exc
