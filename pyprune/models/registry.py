"""A small, explicit registry of the built-in model zoo.

Each architecture registers a builder with :func:`register_model`; the rest of
pyprune names models only through :func:`get_spec` / :func:`build_model`, so a
name means the same network everywhere (CLI, API, tests).

Normalisation is part of a model's spec because it belongs to the weights, not
to the data set: the pretrained CIFAR ResNets expect inputs scaled to [0, 1]
and normalised with the ImageNet statistics mean (0.485, 0.456, 0.406), std
(0.229, 0.224, 0.225). The other zoo models have no published weights here and
are trained by pyprune itself, so they use the same default: one preprocessing
for the whole zoo means one data pipeline serves every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

__all__ = [
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "ModelSpec",
    "register_model",
    "get_spec",
    "available_models",
    "build_model",
]

DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What pyprune knows about a zoo model besides its code.

    ``builder(num_classes=...)`` returns a freshly initialised ``nn.Module``.
    ``input_shape`` is one sample's (C, H, W); ``mean``/``std`` are the
    per-channel normalisation the model's weights expect.
    """

    name: str
    builder: Callable[..., nn.Module]
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def build(self, num_classes: int | None = None) -> nn.Module:
        """Build a freshly initialised instance (``num_classes`` defaults to the spec's)."""
        return self.builder(num_classes=self.num_classes if num_classes is None else num_classes)


# Canonical name -> spec, and every accepted name (canonical or alias) -> canonical name.
_SPECS: dict[str, ModelSpec] = {}
_NAMES: dict[str, str] = {}


def _key(name: str) -> str:
    # Names are matched case-insensitively so "ResNet20" on a command line works.
    return name.strip().lower()


def register_model(
    name: str,
    *,
    aliases: tuple[str, ...] = (),
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    mean: tuple[float, ...] = DEFAULT_MEAN,
    std: tuple[float, ...] = DEFAULT_STD,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder(num_classes=...) -> nn.Module`` under ``name``.

    Registering a name (or alias) twice is an error: silently replacing a zoo
    model would make the same name mean two networks.
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        spec = ModelSpec(
            name=_key(name),
            builder=builder,
            num_classes=num_classes,
            input_shape=tuple(input_shape),  # type: ignore[arg-type]
            mean=tuple(mean),
            std=tuple(std),
            description=description,
            aliases=tuple(_key(a) for a in aliases),
        )
        for n in (spec.name, *spec.aliases):
            if n in _NAMES:
                raise ValueError(f"model name {n!r} is already registered (for {_NAMES[n]!r})")
        _SPECS[spec.name] = spec
        for n in (spec.name, *spec.aliases):
            _NAMES[n] = spec.name
        return builder

    return decorator


def available_models() -> list[str]:
    """Canonical names of all registered models, sorted."""
    return sorted(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name`` (or an alias); ValueError listing names if unknown."""
    canonical = _NAMES.get(_key(name))
    if canonical is None:
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    return _SPECS[canonical]


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised zoo model (random weights; seed the RNG before calling)."""
    return get_spec(name).build(num_classes=num_classes)
