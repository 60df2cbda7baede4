"""Symbolic tracing of a model into the graph IR (a ``torch.fx.GraphModule``).

When tracing fails, the error names the module that was being traced and the
line of user code that failed, and says how to get past it."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .modules import LEAF_MODULES

_TORCH_DIR = str(Path(torch.__file__).parent)


BEFORE_TRACE: list[Callable[[], None]] = []
"""Called before every trace; :mod:`pyprune.ops` registers the support of
third-party ops here once their package is imported (layers above fill it)."""


class TraceError(RuntimeError):
    """Symbolic tracing failed. ``module_path`` names the innermost module being
    traced ('' for the root) and ``module_type`` its class."""

    def __init__(self, message: str, module_path: str, module_type: str) -> None:
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type


@dataclass(frozen=True)
class LeafMatcher:
    """Which modules tracing keeps as one opaque call: instances of ``types``, and
    modules whose class name, ``module:Class`` name or qualified path is in ``names``."""

    types: tuple[type, ...] = ()
    names: tuple[str, ...] = ()

    def __call__(self, m: nn.Module, path: str) -> bool:
        cls = type(m)
        return isinstance(m, self.types) or bool(self.names) and (
            path in self.names or cls.__name__ in self.names or f"{cls.__module__}:{cls.__qualname__}" in self.names)


def leaf_matcher(model: nn.Module, leaf_modules: Iterable[type | str]) -> LeafMatcher:
    """A :class:`LeafMatcher` for ``leaf_modules`` (classes, or names as ``--leaf-module``
    takes them); a name that matches no submodule of ``model`` is an error that lists
    what there is, so a typo does not pass for a trace that kept everything."""
    types = tuple(x for x in leaf_modules if isinstance(x, type))
    names = tuple(dict.fromkeys(str(x).strip() for x in leaf_modules if not isinstance(x, type)))
    matcher = LeafMatcher(types, names)
    modules = list(model.named_modules())
    for name in names:
        if not name or not any(LeafMatcher((), (name,))(m, path) for path, m in modules):
            classes = sorted({type(m).__name__ for _, m in modules[1:]})
            raise ValueError(f"--leaf-module {name!r} names no submodule of {type(model).__name__}: give a class "
                             f"(one of {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}), "
                             "package.module:Class, or a submodule's qualified name (e.g. layer1.0)")
    return matcher


class _PathTracer(fx.Tracer):
    """A tracer that remembers which submodule it is inside, for error messages,
    and treats the modules its matcher names as leaves."""

    # ``leaves`` has a default because unpickling a GraphModule re-creates its tracer's
    # class with no arguments (torch.load of a pickled model would fail otherwise).
    def __init__(self, leaves: LeafMatcher = LeafMatcher()) -> None:
        super().__init__()
        self.leaves = leaves
        self.scope_stack: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_MODULES) or self.leaves(m, module_qualified_name) or \
            super().is_leaf_module(m, module_qualified_name)

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


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """Trace ``model`` into a ``GraphModule``.

    ``leaf_modules`` are kept as opaque calls instead of being traced through:
    module classes, or names as ``--leaf-module`` takes them (a class name,
    ``package.module:Class``, or a submodule's qualified name). The channel analysis
    treats such a call as a barrier; mask and quant still reach the Conv and Linear
    layers inside it."""
    for hook in BEFORE_TRACE:
        hook()
    tracer = _PathTracer(leaf_matcher(model, leaf_modules))
    # Traced in inference mode: a flag read in forward (stochastic_depth(..., self.training),
    # F.dropout(training=...)) becomes a constant of the graph, and a graph that drops
    # activations at random forever would not be a model. Leaf modules (nn.Dropout,
    # BatchNorm) still follow .train() and .eval() at run time.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
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
            f"(--leaf-module {type_name}, or trace(model, leaf_modules=[{type_name}])); "
            "no channel is pruned across a leaf, and only files that can describe its class can store it;\n"
            "  - or rewrite that piece without data-dependent Python control flow "
            "(if/for over tensor values, .item(), len() of a tensor, .size() used as a Python int).",
            path, type_name) from exc
    finally:
        for m, mode in modes:
            m.training = mode
    try:
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except SyntaxError as exc:  # fx writes module names into its generated code unescaped
        raise TraceError(f"torch.fx could not generate code for {type(model).__name__}: a submodule name it cannot "
                         f"write ({exc.msg}: {(exc.text or '').strip()}); rename the submodule (no quotes, "
                         "backslashes or Python keywords)", "", type(model).__name__) from exc
