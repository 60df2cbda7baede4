"""Symbolic tracing of a model into the graph IR (a ``torch.fx.GraphModule``).

When tracing fails, the error names the module that was being traced and the
line of user code that failed, and says how to get past it."""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import fx, nn

_TORCH_DIR = str(Path(torch.__file__).parent)


class TraceError(RuntimeError):
    """Symbolic tracing failed. ``module_path`` names the innermost module being
    traced ('' for the root) and ``module_type`` its class."""

    def __init__(self, message: str, module_path: str, module_type: str) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type


class _PathTracer(fx.Tracer):
    """A tracer that remembers which submodule it is inside, for error messages,
    and treats extra module types as leaves."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.scope_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.scope_stack.append((self.path_of_module(m), type(m).__name__))
        result = super().call_module(m, forward, args, kwargs)
        self.scope_stack.pop()
        return result


def _user_frame(exc: BaseException) -> str:
    """The innermost stack frame outside torch itself: where the user's code failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def trace(model: nn.Module, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule``.

    ``leaf_modules`` are module classes kept as opaque calls instead of being
    traced through; later passes treat such calls as barriers."""
    tracer = _PathTracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... all mean the same here
        path, type_name = tracer.scope_stack[-1] if tracer.scope_stack else ("", type(model).__name__)
        where = f"module '{path}' ({type_name})" if path else f"the top-level module ({type_name})"
        frame = _user_frame(exc)
        raise TraceError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}\n"
            + (f"  failing line: {frame}\n" if frame else "")
            + "Ways out:\n"
            f"  - mark it a leaf module, so it is kept as one opaque call "
            f"(trace(model, leaf_modules=[{type_name}]), or --leaf-module MODULE:{type_name}); "
            "no channel is pruned across a leaf;\n"
            "  - or rewrite that piece without data-dependent Python control flow "
            "(if/for over tensor values, .item(), len() of a tensor, .size() used as a Python int).",
            path, type_name) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)
