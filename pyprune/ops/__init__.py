"""Op support in one place: for every op pyprune knows, its channel handler (or
none: a barrier), whether it serializes, and its MAC rule.

One module per op family declares its ops as :class:`OpSupport` records in a
tuple ``OPS``; this package registers all of them, when ``pyprune`` is imported,
into the lower registries that consume them: the channel-handler registry of
:mod:`pyprune.analysis`, the allowlists of :mod:`pyprune.encode.graph_json`, and
the MAC table of :mod:`pyprune.ir.accounting`. To support a new op, declare it in
its family (or in a new family added to :data:`FAMILIES`); code outside pyprune
can :func:`register` its own declarations, or use :func:`registered` for a
``with`` block.

Layering: this package may import :mod:`pyprune.analysis`, :mod:`pyprune.encode`
and :mod:`pyprune.ir`; none of them imports it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable

from ..encode.graph_json import BEFORE_DECODE
from ..ir.trace import BEFORE_TRACE
from . import activation, conv, elementwise, identity, linear, norm, pooling, reduction, shape
from .registry import (
    BARRIER,
    INHERITED,
    OpSupport,
    declared,
    function,
    method,
    module,
    register,
    registered,
    unregister,
)
from .rewrite import Rewriter

# Registration order matters only where a module type inherits its handler from a
# base class declared earlier (norm declares _BatchNorm before BatchNorm1d/2d).
FAMILIES = (conv, linear, norm, activation, pooling, identity, elementwise, reduction, shape)

for _family in FAMILIES:
    register(*_family.OPS)
del _family

DEFERRED: dict[str, str] = {"torchvision": "torchvision_ops"}
"""Families for a third-party package's ops: package -> family module (in this
package). Each is registered when its package is first needed: before a trace,
when the package is already imported (the model being traced calls it); before a
graph document is decoded, when the document names one of its functions."""

_DEFERRED_DONE: set[str] = set()


def register_deferred(names: Iterable[str] = ()) -> None:
    """Register the deferred families whose package is imported, or named by one of
    the qualified function ``names`` (a document's), importing it then."""
    names = tuple(names)
    for package, family in DEFERRED.items():
        if package in _DEFERRED_DONE:
            continue
        if package in sys.modules or any(n.startswith(package + ".") for n in names):
            register(*importlib.import_module(f"{__name__}.{family}").OPS)
            _DEFERRED_DONE.add(package)


BEFORE_TRACE.append(register_deferred)
BEFORE_DECODE.append(register_deferred)

__all__ = ["BARRIER", "DEFERRED", "FAMILIES", "INHERITED", "OpSupport", "Rewriter", "declared", "function", "method",
           "module", "register", "register_deferred", "registered", "unregister"]
