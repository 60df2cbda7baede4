"""The model registry: names, aliases, specs, errors."""

from __future__ import annotations

import pytest
from torch import nn

from pyprune.models import registry
from pyprune.models.registry import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    available_models,
    build_model,
    get_spec,
    register_model,
)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registrations made by a test must not leak into the real zoo.
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(registry, "_NAMES", dict(registry._NAMES))


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        get_spec("resnet21")
    msg = str(info.value)
    assert "resnet21" in msg
    for name in available_models():
        assert name in msg
    with pytest.raises(ValueError):
        build_model("nope")


def test_specs_carry_defaults() -> None:
    spec = get_spec("resnet20")
    assert spec.name == "resnet20"
    assert spec.num_classes == 10
    assert spec.input_shape == (3, 32, 32)
    assert spec.mean == (0.485, 0.456, 0.406) == DEFAULT_MEAN
    assert spec.std == (0.229, 0.224, 0.225) == DEFAULT_STD
    for name in available_models():
        assert get_spec(name).mean == DEFAULT_MEAN and get_spec(name).std == DEFAULT_STD


def test_alias_and_case() -> None:
    assert get_spec("densenet_bc100") is get_spec("densenet100")
    assert get_spec("ResNet20") is get_spec("resnet20")
    assert "densenet_bc100" not in available_models()  # canonical names only


def test_register_and_build(scratch_registry: None) -> None:
    @register_model("tiny", aliases=("tiny_alias",), input_shape=(1, 8, 8))
    def tiny(num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

    assert "tiny" in available_models()
    assert get_spec("tiny_alias").input_shape == (1, 8, 8)
    model = build_model("tiny", num_classes=3)
    assert model[1].out_features == 3


def test_duplicate_registration_rejected(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet20")(lambda num_classes=10: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        register_model("fresh", aliases=("densenet_bc100",))(lambda num_classes=10: nn.Identity())
    assert "fresh" not in available_models()
