"""The pass protocol: what every registered pass declares about itself.

Modelled on torch.fx's ``PassBase`` (``requires`` / ``call`` / ``ensures``) and on
LLVM's pass registry, where one table feeds pipeline parsing, ``--print-passes``
and the search. A pass class declares:

* ``name``: what pipelines call it (``mask(sparsity=0.8)``);
* ``options``: one :class:`Option` per constructor argument, with its type, default,
  range or choices and a line of help. Pipeline parsing, ``pyprune passes`` and the
  constructor's own checks all read this table;
* ``knob`` (optional): the option the compile search turns, and its default
  ladder from least to most aggressive (:class:`Knob`);
* ``changes_outputs``: whether the pass changes the model's outputs on purpose
  (the pass manager's numeric check skips those);
* its training constraints, through :meth:`GraphPass.training_hooks`: hooks that
  keep what the pass did (exact zeros, tied weights) through fine-tuning, which the
  engine in :mod:`pyprune.train` runs without knowing any pass;
* :meth:`GraphPass.codebook_layers`: layers whose weights the pass tied to a
  codebook, which the ``.ppz`` container stores with one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import fx

from ..ir import PassResult
from .constraints import TrainHooks

_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list", tuple: "tuple"}


@dataclass(frozen=True)
class Range:
    """An interval of numbers; ``None`` is unbounded. Integers print as ``0..16``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self, integer: bool = False) -> str:
        if integer and not self.low_open and not self.high_open:
            if self.high is None:
                return f">= {self.low:g}" if self.low is not None else "any"
            if self.low is None:
                return f"<= {self.high:g}"
            return f"{self.low:g}..{self.high:g}"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else "any"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Option:
    """One option of a pass: name, accepted Python type(s), default, help, and the
    values allowed (a numeric ``range`` or a tuple of ``choices``). ``None`` is
    accepted when the default is ``None``."""

    name: str
    kind: type | tuple[type, ...]
    default: Any
    help: str
    range: Range | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    @property
    def type_name(self) -> str:
        return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in self.kinds)

    def allowed(self) -> str:
        """The values allowed, in words: ``int in 0..16``, ``one of global, layer``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        text = self.type_name
        if self.range is not None:
            bounds = self.range.describe(integer=self.kinds == (int,))
            text += (" " if bounds[0] in "<>" else " in ") + bounds
        return text

    def _type_ok(self, value: Any) -> bool:
        if isinstance(value, bool):
            return bool in self.kinds
        if isinstance(value, int) and float in self.kinds:
            return True  # sparsity=1 means 1.0
        return isinstance(value, tuple(k for k in self.kinds if k is not bool)) or \
            (dict in self.kinds and isinstance(value, Mapping))

    def check(self, value: Any, owner: str) -> Any:
        """``value`` if this option allows it; else a ValueError naming the option."""
        if value is None and self.default is None:
            return value
        article = "an" if self.type_name[0] in "aeiou" else "a"
        if not self._type_ok(value):
            raise ValueError(f"{owner} {self.name} must be {article} {self.allowed()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{owner} {self.name} must be {self.allowed()}, got {value!r}")
        if self.range is not None and isinstance(value, (int, float)) and \
                (not math.isfinite(value) or value not in self.range):
            raise ValueError(f"{owner} {self.name} must be {article} {self.allowed()}, got {value!r}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "default": self.default, "help": self.help,
                "allowed": self.allowed(), "choices": list(self.choices) if self.choices is not None else None,
                "range": None if self.range is None else
                {"low": self.range.low, "high": self.range.high, "low_open": self.range.low_open,
                 "high_open": self.range.high_open}}


@dataclass(frozen=True)
class Knob:
    """The option a search turns, and its default ladder, least aggressive first.

    ``increasing``: larger values are more aggressive (a ratio, a sparsity); False
    for options where fewer is more (bits). ``range`` narrows the option's own range
    to the settings worth searching (``quant(bits=0)`` is valid but means "off", so
    its knob starts at 1). ``flag`` is an extra compile flag for this ladder besides
    ``--levels NAME=...`` (kept for the flags users already have in scripts).

    ``absolute``: the setting names the result, not a change, so applying a more
    aggressive setting to a model already at a milder one gives that setting
    (``mask(sparsity=0.8)`` on a 70%-sparse model leaves it 80% sparse). A search may
    then push such a stage further on an already compressed, fine-tuned model. A
    relative knob (slim's ratio: a share of the channels still there) must be
    applied once, to a model where the stage is off."""

    option: str
    ladder: tuple[Any, ...]
    increasing: bool = True
    range: Range | None = None
    flag: str | None = None
    absolute: bool = True
    # The option of {layer: value} overrides that set single layers apart from the
    # knob's one value (None: the pass has none), for per-layer searches.
    per_layer: str | None = None
    # Whether one layer pushed one position further shows on a screen (a thousand
    # images). False where it moves top-1 by less than a screen's noise, so a
    # per-layer search learns nothing from single-layer screens and ranks layers by
    # what they save instead, letting screens of many layers together decide how many.
    layer_screens: bool = True

    def aggressiveness(self, value: Any) -> Any:
        """A sort key: the least aggressive setting sorts first."""
        return value if self.increasing else -value


class GraphPass:
    """Base class of the registered passes, following torch.fx's ``PassBase``:
    ``__call__`` runs :meth:`requires`, :meth:`call` and :meth:`ensures`.

    A subclass sets the class attributes below and implements :meth:`call`. Its
    constructor takes the options as keyword arguments; the default one here
    checks them against ``options`` and stores them as attributes, so a pass that
    needs nothing more than its options has no constructor to write."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    knob: ClassVar[Knob | None] = None
    changes_outputs: ClassVar[bool] = False
    # Network slimming's sparsity training (L1 on BatchNorm gammas) before this pass
    # lets its knob go further; compile's --slim-l1 is tried for such a stage.
    gains_from_sparsity_training: ClassVar[bool] = False
    # What fine-tuning keeps of the pass's result (see training_hooks), in words.
    training_constraint: ClassVar[str] = ""
    # the pass can reach its result during a fine-tune (gradually()), e.g. gradual pruning
    gradual: ClassVar[bool] = False
    # (pipeline, what it does), shown by `pyprune passes` and `pyprune opt --help`
    examples: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, **options: Any) -> None:
        values = self.check_options(options)
        for key, value in values.items():
            setattr(self, key, value)

    @classmethod
    def option(cls, name: str) -> Option:
        for o in cls.options:
            if o.name == name:
                return o
        raise KeyError(f"pass {cls.name!r} has no option {name!r}")

    @classmethod
    def check_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """All options, defaults filled in, each checked against its declaration."""
        unknown = [k for k in given if k not in {o.name for o in cls.options}]
        if unknown:
            names = [o.name for o in cls.options]
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"bad options for pass {cls.name!r}: unknown option {unknown[0]!r} ({hint}its options: "
                             f"{', '.join(names) or 'none'})")
        return {o.name: o.check(given.get(o.name, o.default), cls.name) for o in cls.options}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if isinstance(result, fx.GraphModule):
            result = PassResult(result)
        self.ensures(result.graph_module)
        return result

    def requires(self, gm: fx.GraphModule) -> None:
        """Check the IR is what the pass needs; raise ValueError if not."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        """Check what the pass guarantees; raise if it does not hold."""

    def training_hooks(self, gm: fx.GraphModule) -> TrainHooks:
        """Hooks that keep this pass's result through fine-tuning, captured from
        ``gm`` now. None by default: a pass whose result training may change."""
        return TrainHooks()

    def gradually(self, gm: fx.GraphModule) -> Any:
        """For a pass with ``gradual`` set: an object that reaches this pass's result
        *during* a fine-tune of ``gm`` (``hooks()`` for it, then ``finish(gm)``)."""
        raise NotImplementedError(f"{self.name} is applied before fine-tuning, not during it")

    def codebook_layers(self, gm: fx.GraphModule) -> dict[str, int]:
        """``{layer: bits}`` for each layer whose non-zero weights this pass tied to
        at most ``2**bits`` shared values. None by default."""
        return {}

    def summary(self, record: Mapping[str, Any]) -> str | None:
        """One line on what the pass did, from its record, for the command line."""
        return None


def constrains_training(cls: type[GraphPass]) -> bool:
    """Whether the pass class keeps constraints through fine-tuning."""
    return cls.training_hooks is not GraphPass.training_hooks


def shares_weights(cls: type[GraphPass]) -> bool:
    return cls.codebook_layers is not GraphPass.codebook_layers


def check_levels(cls: type[GraphPass], levels: Sequence[Any]) -> tuple[Any, ...]:
    """``levels`` of the pass's knob, checked and sorted least aggressive first
    (duplicates dropped); a ValueError names the bad ones."""
    knob = cls.knob
    if knob is None:
        raise ValueError(f"pass {cls.name!r} has no search knob, so it cannot be a compile stage")
    if not levels:
        raise ValueError(f"{cls.name}: no levels to search")
    option = cls.option(knob.option)
    domain = knob.range or option.range
    integer = option.kinds == (int,)

    def valid(v: Any) -> bool:
        try:
            option.check(v, cls.name)
        except ValueError:
            return False
        return domain is None or v in domain

    bad = [v for v in levels if not valid(v)]
    if bad:
        what = f"integer {knob.option}" if integer else f"{knob.option} values"
        where = f" in {domain.describe(integer)}" if domain is not None else ""
        raise ValueError(f"{cls.name} levels must be {what}{where}, got {bad}")
    return tuple(sorted(set(levels), key=knob.aggressiveness))
