"""What compile_model refuses before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune import api
from pyprune.encode import GraphFormatError


class Unsavable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.special.erfcx(self.conv(x)).mean((2, 3))  # traced, but not in the graph format


def test_a_model_the_file_cannot_hold_is_refused_before_the_data_is_read(tmp_path: Path) -> None:
    model = api.LoadedModel(Unsavable(), "unsavable")
    config = api.CompileConfig(api.Target(max_drop=0.01), tmp_path / "out",
                               data=api.DataSpec("cifar10", str(tmp_path / "no-data-here")))
    with pytest.raises(GraphFormatError, match=r"model\.ppz could not hold this model: .*erfcx"):
        api.compile_model(model, config)
    assert not (tmp_path / "out").exists()


class LayerNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.layer_norm(self.conv(x).permute(0, 2, 3, 1), (4,)).mean((1, 2))


def test_functional_layer_norm_is_saved_and_read_back(tmp_path: Path) -> None:
    model = api.LoadedModel(LayerNormed().eval(), "ln", input_shape=(3, 8, 8))
    path = api.save_model(model, tmp_path / "ln.pt")
    loaded = api.load_model(str(path)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_the_recovery_model_is_checked_and_a_resume_must_match_it(tmp_path: Path) -> None:
    target = api.Target(max_drop=0.01)
    with pytest.raises(ValueError, match="--recovery-model must be additive or proportional, got 'hopeful'"):
        api.CompileConfig(target, tmp_path / "out", recovery="hopeful")
    model = api.LoadedModel(Unsavable(), "unsavable")
    additive = api.CompileConfig(target, tmp_path / "out").fingerprint(model)
    proportional = api.CompileConfig(target, tmp_path / "out", recovery="proportional").fingerprint(model)
    # the default leaves the fingerprint of earlier journals as it was
    assert "recovery" not in additive and proportional == {**additive, "recovery": "proportional"}
