"""The one table of passes. Pipeline parsing (:func:`create_pass`), ``pyprune
passes``, ``pyprune opt --help``, the compile search's stages and its ``--levels``
flags all read it, so a pass registered here (from any module, a test included)
is usable everywhere at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .base import GraphPass, check_levels, constrains_training, shares_weights

PASSES: dict[str, type[GraphPass]] = {}

P = TypeVar("P", bound=type[GraphPass])


def register_pass(cls: P) -> P:
    """Class decorator: make ``cls`` (a :class:`GraphPass` with a ``name``) known by
    its name. Its declared options must be exactly its constructor's arguments."""
    if not (isinstance(cls, type) and issubclass(cls, GraphPass)) or not getattr(cls, "name", None):
        raise TypeError(f"register_pass takes a GraphPass subclass with a name, got {cls!r}")
    if cls.name in PASSES:
        raise ValueError(f"pass {cls.name!r} is registered twice")
    if cls.knob is not None:
        cls.option(cls.knob.option)  # the knob turns a declared option
        check_levels(cls, cls.knob.ladder)
    PASSES[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    PASSES.pop(name, None)


@contextmanager
def registered(cls: type[GraphPass]) -> Iterator[type[GraphPass]]:
    """Register ``cls`` for the duration of a ``with`` block (tests, plugins)."""
    register_pass(cls)
    try:
        yield cls
    finally:
        unregister_pass(cls.name)


def pass_class(name: str) -> type[GraphPass]:
    try:
        return PASSES[name]
    except KeyError:
        raise ValueError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES)) or 'none'}") from None


def create_pass(name: str, **options: Any) -> GraphPass:
    """Instantiate the pass called ``name``; unknown names and options are errors
    that name them, raised before any work."""
    cls = pass_class(name)
    cls.check_options(options)
    return cls(**options)


def searchable_passes() -> list[str]:
    """Names of the passes with a search knob: what ``compile --order`` takes."""
    return [name for name, cls in PASSES.items() if cls.knob is not None]


def parse_levels(name: str, text: str) -> tuple[Any, ...]:
    """``"0.1,0.2"`` as the values of pass ``name``'s knob option (ints for an int
    option), for ``--levels NAME=V,V``; ranges are checked where the stage is made."""
    cls = pass_class(name)
    if cls.knob is None:
        raise ValueError(f"pass {name!r} has no search knob; passes with one: {', '.join(searchable_passes())}")
    kinds = cls.option(cls.knob.option).kinds
    kind = int if kinds == (int,) else float
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} levels: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} levels: expected at least one value")
    return values


def describe_pass(cls: type[GraphPass]) -> dict[str, Any]:
    """Everything the table says about one pass, as JSON-able data."""
    doc = (cls.__doc__ or "").strip().splitlines()
    knob = cls.knob
    return {
        "name": cls.name,
        "summary": doc[0] if doc else "",
        "options": [o.to_dict() for o in cls.options],
        "knob": None if knob is None else {"option": knob.option, "ladder": list(knob.ladder),
                                           "more_aggressive": "higher" if knob.increasing else "lower",
                                           "flag": knob.flag},
        "changes_outputs": cls.changes_outputs,
        "constrains_training": constrains_training(cls),
        "training_constraint": cls.training_constraint,
        "shares_weights": shares_weights(cls),
        "gains_from_sparsity_training": cls.gains_from_sparsity_training,
        "examples": [{"pipeline": p, "does": d} for p, d in cls.examples],
    }


def describe_passes() -> list[dict[str, Any]]:
    return [describe_pass(cls) for cls in PASSES.values()]
