"""Shared fixtures. Data comes from $PYPRUNE_DATA (the Makefile points it at
../shared/data) or the shared folder beside the checkout; tests that need it skip
with a reason when neither exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_data_root() -> Path | None:
    for candidate in (os.environ.get("PYPRUNE_DATA"), SHARED / "data"):
        if candidate and (Path(candidate) / "cifar10" / "test.npz").is_file():
            return Path(candidate)
    return None


def shared_models_dir() -> Path | None:
    for candidate in (os.environ.get("PYPRUNE_MODELS"), SHARED / "models"):
        if candidate and any(Path(candidate).glob("resnet20-*.th")):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("shared CIFAR-10 not found ($PYPRUNE_DATA or ../shared/data)")
    return root


@pytest.fixture(scope="session")
def models_dir() -> Path:
    root = shared_models_dir()
    if root is None:
        pytest.skip("shared checkpoints not found ($PYPRUNE_MODELS or ../shared/models)")
    return root
