"""Where datasets live: ``--data-root``, then ``$PYPRUNE_DATA``, then ``./data``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PYPRUNE_DATA"
DEFAULT_ROOT = Path("data")


@dataclass(frozen=True)
class DataRoot:
    path: Path
    source: str  # "--data-root", "$PYPRUNE_DATA" or "default": quoted in error messages

    def describe(self) -> str:
        return f"{self.path} (from {self.source})"


def resolve_data_root(data_root: str | os.PathLike | None = None) -> DataRoot:
    """Pick the data root by precedence: an explicit flag beats the environment,
    which beats the default ``./data``."""
    if data_root:
        return DataRoot(Path(data_root).expanduser(), "--data-root")
    env = os.environ.get(ENV_VAR)
    if env:
        return DataRoot(Path(env).expanduser(), f"${ENV_VAR}")
    return DataRoot(DEFAULT_ROOT, "default")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not under the chosen root; the message says where we looked."""
