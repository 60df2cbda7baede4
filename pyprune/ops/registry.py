"""One declaration per op (:class:`OpSupport`) and :func:`register`, which pushes it
into the three registries that consume it.

Supporting an op means three things, each looked up by a different layer:

* its channel handler, in :data:`pyprune.analysis.CHANNEL_HANDLERS` (or none: the
  op is a barrier, and no channel is pruned across it);
* whether it is serializable, i.e. in the allowlists of
  :mod:`pyprune.encode.graph_json` (``MODULE_TYPES``, ``FUNCTIONS``, ``METHODS``);
* its MAC rule, in :data:`pyprune.ir.accounting.MAC_COUNTERS` (module types only).

Those registries stay where they are, below this package, but are filled only
from here, so one declaration states all three and they cannot drift apart.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import nn

from ..analysis import registry as channel_registry
from ..analysis.registry import ChannelHandler, module_handler
from ..encode import graph_json
from ..ir import accounting
from ..ir.accounting import MacCounter

Kind = Literal["module", "function", "method"]

BARRIER = "barrier"
"""``handler=BARRIER``: the op has no channel handler; channels stop at it."""

INHERITED = "inherited"
"""``handler=INHERITED`` (module types only): no handler of its own; the one
registered for its nearest base class applies (found through the MRO)."""

HandlerSpec = Union[ChannelHandler, Literal["barrier", "inherited"]]


@dataclass(frozen=True)
class OpSupport:
    """What pyprune supports about one op. Build with :func:`module`,
    :func:`function` or :func:`method`.

    ``target`` is what the graph holds (the module type, the callable, or the
    method name); ``name`` is what a graph document says (the class name, the
    stable function name such as ``"torch.nn.functional.relu"``, the method name).
    """

    kind: Kind
    target: Any
    name: str
    handler: HandlerSpec
    serializable: bool
    macs: MacCounter | None = None

    def __post_init__(self) -> None:
        where = f"{self.kind} {self.name!r}"
        if self.kind == "module":
            if not (isinstance(self.target, type) and issubclass(self.target, nn.Module)):
                raise TypeError(f"{where}: target must be an nn.Module subclass, not {self.target!r}")
            if self.name != self.target.__name__:
                raise ValueError(f"{where}: a module type's name is its class name ({self.target.__name__!r})")
        elif self.kind == "function":
            if not callable(self.target):
                raise TypeError(f"{where}: target must be callable, not {self.target!r}")
            if not all(part.isidentifier() for part in self.name.split(".")):
                raise ValueError(f"{where}: a function's name is a dotted qualified name")
        elif self.kind == "method":
            if self.target != self.name or not self.name.isidentifier() or keyword.iskeyword(self.name):
                raise ValueError(f"{where}: a method is declared by its name, an identifier")
        else:
            raise ValueError(f"unknown op kind {self.kind!r}; one of {', '.join(channel_registry.KINDS)}")
        if not isinstance(self.handler, ChannelHandler) and self.handler not in (BARRIER, INHERITED):
            raise TypeError(f"{where}: handler must be a ChannelHandler, BARRIER or INHERITED, "
                            f"not {self.handler!r}")
        if self.handler == INHERITED and self.kind != "module":
            raise ValueError(f"{where}: only module types inherit a handler (through the MRO)")
        if not isinstance(self.serializable, bool):
            raise TypeError(f"{where}: serializable must be True or False")
        if self.macs is not None and self.kind != "module":
            raise ValueError(f"{where}: MACs are counted for module calls only")

    @property
    def key(self) -> tuple[str, Any]:
        return self.kind, self.target


def module(cls: type[nn.Module], handler: HandlerSpec, *, serializable: bool,
           macs: MacCounter | None = None) -> OpSupport:
    """Declare module type ``cls`` (its handler also covers subclasses with none of their own)."""
    return OpSupport("module", cls, cls.__name__, handler, serializable, macs)


def function(name: str, fn: Callable[..., Any], handler: HandlerSpec, *, serializable: bool) -> OpSupport:
    """Declare ``fn`` for ``call_function`` nodes, under the stable ``name``."""
    return OpSupport("function", fn, name, handler, serializable)


def method(name: str, handler: HandlerSpec, *, serializable: bool) -> OpSupport:
    """Declare tensor method ``name`` for ``call_method`` nodes."""
    return OpSupport("method", name, name, handler, serializable)


_DECLARED: dict[tuple[str, Any], OpSupport] = {}


def declared() -> tuple[OpSupport, ...]:
    """Every declaration registered now, in registration order."""
    return tuple(_DECLARED.values())


def _registered_elsewhere(op: OpSupport) -> list[str]:
    """What the lower registries already hold for ``op``'s target, which only an
    undeclared registration could have put there."""
    found = []
    if op.target in channel_registry.CHANNEL_HANDLERS[op.kind]:
        found.append("a channel handler")
    if op.kind == "module":
        if graph_json.MODULE_TYPES.get(op.name) is op.target:
            found.append("the module type allowlist")
        if op.target in accounting.MAC_COUNTERS:
            found.append("a MAC rule")
    elif op.kind == "function":
        if any(fn is op.target for fn in graph_json.FUNCTIONS.values()):
            found.append("the function allowlist")
    elif op.name in graph_json.METHODS:
        found.append("the method allowlist")
    return found


def _check(ops: tuple[OpSupport, ...]) -> None:
    seen: set[tuple[str, Any]] = set()
    for op in ops:
        if op.key in _DECLARED or op.key in seen:
            raise ValueError(f"{op.kind} {op.name!r} is already declared ({_DECLARED.get(op.key, op)})")
        seen.add(op.key)
        found = _registered_elsewhere(op)
        if found:
            raise ValueError(f"{op.kind} {op.name!r} already has {', '.join(found)}, registered without a "
                             "pyprune.ops declaration; declare it in one place instead")
        if op.kind == "module" and op.serializable and op.name in graph_json.MODULE_TYPES:
            raise ValueError(f"module type name {op.name!r} is already allowlisted for another class")
        if op.kind == "function" and op.serializable and op.name in graph_json.FUNCTIONS:
            raise ValueError(f"function name {op.name!r} is already allowlisted for another callable")


def _apply(op: OpSupport) -> None:
    if op.handler == INHERITED and module_handler(op.target) is None:
        raise ValueError(f"module {op.name!r} is declared to inherit a channel handler, but no base class "
                         "of it has one (declare the base first, or say BARRIER)")
    _DECLARED[op.key] = op  # first, so that a failure below is undone by _withdraw
    if isinstance(op.handler, ChannelHandler):
        register = {"module": channel_registry.register_module, "function": channel_registry.register_function,
                    "method": channel_registry.register_method}[op.kind]
        register(op.handler, op.target)
    if op.serializable:
        if op.kind == "module":
            graph_json.allow_module_type(op.target)
        elif op.kind == "function":
            graph_json.allow_function(op.name, op.target)
        else:
            graph_json.allow_method(op.name)
    if op.macs is not None:
        accounting.register_mac_counter(op.target)(op.macs)


def _withdraw(op: OpSupport) -> None:
    # _check refused anything the lower registries held before, so every entry
    # for this target is this declaration's own.
    channel_registry.unregister(op.kind, op.target)
    if op.kind == "module":
        graph_json.disallow_module_type(op.target)
        accounting.unregister_mac_counter(op.target)
    elif op.kind == "function":
        if graph_json.FUNCTIONS.get(op.name) is op.target:
            graph_json.disallow_function(op.name)
    else:
        graph_json.disallow_method(op.name)
    _DECLARED.pop(op.key, None)


def register(*ops: OpSupport) -> None:
    """Declare ``ops``: register each one's channel handler, allowlist entry and
    MAC rule. All or nothing: an op already declared, or already present in a
    lower registry, refuses the whole call."""
    _check(ops)
    done: list[OpSupport] = []
    try:
        for op in ops:
            done.append(op)
            _apply(op)
    except Exception:
        for op in reversed(done):
            _withdraw(op)
        raise


def unregister(*ops: OpSupport) -> None:
    """Undo :func:`register` for ``ops``, each of which must be declared now."""
    for op in ops:
        if _DECLARED.get(op.key) != op:
            raise KeyError(f"{op.kind} {op.name!r} is not declared as {op}")
    for op in reversed(ops):
        _withdraw(op)


@contextmanager
def registered(*ops: OpSupport) -> Iterator[tuple[OpSupport, ...]]:
    """Declare ``ops`` for the duration of a ``with`` block (tests, experiments)."""
    register(*ops)
    try:
        yield ops
    finally:
        unregister(*ops)
