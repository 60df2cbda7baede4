"""torchvision's ImageNet classifiers as ``--arch torchvision:NAME``.

``torchvision_spec("resnet18")`` returns a :class:`ModelSpec` whose builder is
``torchvision.models.get_model(NAME, weights=None, num_classes=...)``: always
randomly initialised, never downloading anything (torchvision fetches weights
only when ``weights`` names them). The user's own weights are loaded afterwards
by :func:`pyprune.models.loading.resolve_model`, like any zoo checkpoint.

These specs are made on demand rather than registered: torchvision has ~80
classifiers, and ``pyprune models`` lists pyprune's own zoo. Their input shape is
ImageNet's (3, 224, 224) and their normalisation the ImageNet statistics, which
is what torchvision's published weights (and recipes) use.
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

from .registry import DEFAULT_MEAN, DEFAULT_STD, ModelSpec

__all__ = ["TORCHVISION_PREFIX", "is_torchvision_arch", "torchvision_models", "torchvision_spec"]

TORCHVISION_PREFIX = "torchvision:"

IMAGENET_INPUT_SHAPE: tuple[int, int, int] = (3, 224, 224)
# Listed first in "unknown name" errors: the families people most often mean.
_EXAMPLES = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "densenet121")


def is_torchvision_arch(arch: str) -> bool:
    """Whether ``arch`` names a torchvision model (``torchvision:NAME``, any case)."""
    return arch.strip().lower().startswith(TORCHVISION_PREFIX)


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models`` only:
    not detection, segmentation or video, whose outputs are not class logits)."""
    import torchvision  # imported here: most commands never need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build(name: str, num_classes: int) -> nn.Module:
    import torchvision

    # weights=None is what keeps this offline; the caller loads the user's weights.
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def torchvision_spec(arch: str) -> ModelSpec:
    """The spec of ``torchvision:NAME`` (``NAME`` alone is accepted too).

    Raises ValueError for a name that is not a torchvision classifier, naming
    close matches and a few valid names.
    """
    name = arch.strip()
    if name.lower().startswith(TORCHVISION_PREFIX):
        name = name[len(TORCHVISION_PREFIX):].strip()
    name = name.lower()  # torchvision's names are all lower case
    known = torchvision_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}? " if close else ""
        raise ValueError(
            f"unknown torchvision model {name!r}; {hint}valid names are those of "
            f"torchvision.models.list_models(module=torchvision.models) ({len(known)} in all), e.g. "
            f"{', '.join(TORCHVISION_PREFIX + n for n in _EXAMPLES if n in known)}"
        )
    return ModelSpec(
        name=TORCHVISION_PREFIX + name,
        builder=functools.partial(_build, name),
        input_shape=IMAGENET_INPUT_SHAPE,
        mean=DEFAULT_MEAN,
        std=DEFAULT_STD,
        description=f"torchvision.models.{name} (weights=None; load your own with --weights)",
    )
