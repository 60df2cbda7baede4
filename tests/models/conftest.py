"""Fixtures for the model tests: the shared checkpoints, by architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from pyprune.models.pretrained import PRETRAINED


@pytest.fixture
def shared_checkpoint(models_dir: Path) -> Callable[[str], Path]:
    """``shared_checkpoint(arch)``: path of the shared checkpoint; skips the test when absent."""

    def get(arch: str) -> Path:
        path = models_dir / PRETRAINED[arch].filename
        if not path.is_file():
            pytest.skip(f"shared checkpoint not present: {path}")
        return path

    return get
