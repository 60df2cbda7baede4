"""torchvision's functional ops that its classifiers call in ``forward``.

Registered only once torchvision is in the process (see :data:`pyprune.ops.DEFERRED`):
importing it costs about a second, which commands that never meet a torchvision model
should not pay."""

from __future__ import annotations

from torchvision.ops.stochastic_depth import stochastic_depth

from .identity import PASS_THROUGH
from .registry import OpSupport, function

OPS: tuple[OpSupport, ...] = (
    # efficientnet, convnext: drops whole samples (or the whole batch) in training and
    # is the identity in inference, so each channel maps to itself and zeros stay zero.
    function("torchvision.ops.stochastic_depth.stochastic_depth", stochastic_depth, PASS_THROUGH,
             serializable=True),
)
