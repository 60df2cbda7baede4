"""Pipeline strings in the style of LLVM's ``opt -passes=``.

    slim(ratio=0.4),mask(sparsity=0.8,scope=global),quant(bits=5)

A comma-separated list of ``name`` or ``name(key=value,...)``. Values are read as
Python literals (numbers, booleans, strings, tuples, dicts, None) where they
parse as such, and as bare strings otherwise, so ``scope=global`` works unquoted.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from ..ir import GraphPass
from .registry import create_pass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class PipelineSyntaxError(ValueError):
    """A pipeline string that does not parse; the message points at the column."""

    def __init__(self, text: str, pos: int, problem: str) -> None:
        super().__init__(f"{problem} at column {pos + 1} of the pipeline:\n  {text}\n  {' ' * pos}^")


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v!r}' for k, v in self.options.items())})"


def _split_top_level(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of ``text[start:end]`` separated by commas outside brackets and quotes."""
    spans, depth, quote, begin = [], 0, None, start
    for i in range(start, end):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                raise PipelineSyntaxError(text, i, "unbalanced ')'")
        elif c == "," and depth == 0:
            spans.append((begin, i))
            begin = i + 1
    if depth or quote:
        raise PipelineSyntaxError(text, end - 1, "unclosed bracket or quote")
    spans.append((begin, end))
    return spans


def _value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as global or layer


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse a pipeline string into pass specs; raises :class:`PipelineSyntaxError`."""
    specs = []
    for begin, end in _split_top_level(text, 0, len(text)):
        while begin < end and text[begin].isspace():
            begin += 1
        while end > begin and text[end - 1].isspace():
            end -= 1
        match = _NAME.match(text, begin, end)
        if not match:
            raise PipelineSyntaxError(text, begin, "expected a pass name")
        name, pos, options = match.group(), match.end(), {}
        while pos < end and text[pos].isspace():
            pos += 1
        if pos < end:
            if text[pos] != "(" or text[end - 1] != ")":
                raise PipelineSyntaxError(text, pos, "expected '(' after the pass name and ')' at its end")
            if text[pos + 1:end - 1].strip():
                for kb, ke in _split_top_level(text, pos + 1, end - 1):
                    key, eq, raw = text[kb:ke].partition("=")
                    if not eq or not _NAME.fullmatch(key.strip()):
                        raise PipelineSyntaxError(text, kb, "expected key=value")
                    options[key.strip()] = _value(raw.strip())
        specs.append(PassSpec(name, options))
    return specs


def build_pipeline(text: str) -> list[GraphPass]:
    """Parse ``text`` and instantiate every pass from the registry."""
    return [create_pass(spec.name, **spec.options) for spec in parse_pipeline(text)]
