"""Named passes, so that pipelines can be written as text (``slim(ratio=0.4)``)."""

from __future__ import annotations

from collections.abc import Callable

from ..ir import GraphPass

PassFactory = Callable[..., GraphPass]
PASSES: dict[str, PassFactory] = {}


def register_pass(name: str) -> Callable[[PassFactory], PassFactory]:
    """Register ``factory(**options) -> pass`` under ``name``."""
    def decorator(factory: PassFactory) -> PassFactory:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        PASSES[name] = factory
        return factory
    return decorator


def create_pass(name: str, **options) -> GraphPass:
    """Instantiate the pass called ``name``; unknown names and options are errors."""
    try:
        factory = PASSES[name]
    except KeyError:
        raise ValueError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES)) or 'none'}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for pass {name!r}: {exc}") from exc
