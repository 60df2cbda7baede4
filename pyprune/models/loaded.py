"""A model together with what it takes to feed it: the type every layer above the
zoo passes around (the CLI, the API, compile, the runtime)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .registry import DEFAULT_MEAN, DEFAULT_STD, ModelSpec

DEFAULT_INPUT_SHAPE = (3, 32, 32)


@dataclass
class LoadedModel:
    """A model with its normalisation and input shape. ``.module`` is the
    ``nn.Module``; calling, ``.eval()`` and ``.train()`` act on it."""

    module: nn.Module
    name: str
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE
    # modules tracing keeps as one opaque call (--leaf-module): class or submodule names
    leaf_modules: tuple[str, ...] = ()
    # what was done to it before, for a saved pyprune model: "compile quant(bits=4)", ...
    history: tuple[str, ...] = ()
    # the file it was read from, when it carried its own input shape (a saved model)
    source: str | None = None

    @classmethod
    def from_spec(cls, module: nn.Module, spec: ModelSpec | None, name: str) -> "LoadedModel":
        if spec is None:
            return cls(module, name)
        return cls(module, spec.name, tuple(spec.mean), tuple(spec.std), tuple(spec.input_shape))

    @classmethod
    def from_meta(cls, module: nn.Module, meta: dict[str, Any], fallback_name: str,
                  source: str | None = None) -> "LoadedModel":
        """The model a saved file describes with :meth:`meta`; ``ValueError`` names the
        field of a meta no model could have (the file may be hostile)."""
        shape = _checked_shape(meta.get("input_shape", DEFAULT_INPUT_SHAPE))
        mean = _checked_vector(meta.get("mean", DEFAULT_MEAN), "mean", shape[0], positive=False)
        std = _checked_vector(meta.get("std", DEFAULT_STD), "std", shape[0], positive=True)
        arch = meta.get("arch") or fallback_name
        if not isinstance(arch, str):
            raise ValueError(f"meta.arch is {arch!r:.60}, not a name")
        return cls(module, arch, mean, std, shape, history=_history(meta.get("provenance")), source=source)

    # The module's own verbs, for code that treats the loaded model as the module.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def eval(self) -> "LoadedModel":
        self.module.eval()
        return self

    def train(self, mode: bool = True) -> "LoadedModel":
        self.module.train(mode)
        return self

    @property
    def described(self) -> str:
        """How errors name the model: a saved model's input shape is its file's."""
        return f"the model in {self.source} (meta.input_shape)" if self.source else "the model"

    def meta(self) -> dict[str, Any]:
        """What a saved file (``.ppz``, graph file, ONNX metadata) records about the
        model besides its graph and weights."""
        return {"arch": self.name, "mean": list(self.mean), "std": list(self.std),
                "input_shape": list(self.input_shape)}


def _history(provenance: Any) -> tuple[str, ...]:
    """One line per step a saved file's provenance records (``compile`` writes its
    pipeline, ``opt`` its steps)."""
    if not isinstance(provenance, list):
        return ()
    out = []
    for step in provenance:
        if not isinstance(step, dict):
            continue
        if "compile" in step:
            out.append(f"compile {step['compile'] or '(no pass)'}")
            if step.get("bnfold"):
                out.append("BatchNorm folded into the convolutions")
        elif step.get("name") not in (None, "input"):
            out.append(f"opt {step['name']}")
    return tuple(out)


# One image of a saved model's input at most this many elements (256 MiB as float32).
MAX_INPUT_ELEMENTS = 1 << 26


def _checked_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"meta.input_shape is {shape!r:.80}, not (channels, height, width) of positive integers")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"meta.input_shape {list(shape)} is {math.prod(shape):,} values per image, more than the "
                         f"{MAX_INPUT_ELEMENTS:,} a model input may have")
    return tuple(shape)


def _checked_vector(values: Any, name: str, channels: int, positive: bool) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) != channels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"meta.{name} is {values!r:.80}, not {channels} finite numbers (one per input channel)")
    if positive and not all(v > 0 for v in values):
        raise ValueError(f"meta.{name} is {list(values)}: every value must be positive")
    return tuple(float(v) for v in values)
