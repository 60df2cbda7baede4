"""Hostile graph files and zip archives (issue 19): a decompression bomb in any zip
pyprune hands to torch (graph file, state dict, .pt2) is refused from its headers,
before torch allocates the sizes they declare; sparse tensors are refused in one line."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from pyprune import api
from pyprune.encode import GraphFormatError
from pyprune.models import ModelLoadError

from ..fuzz.mutate import declare_entry_size, rezip, zip_entries
from ..fuzz.seeds import small_net
from ..ir.test_from_export import export_to

FOUR_GB = 0xFFFF_FFF0


@pytest.fixture(scope="module")
def model() -> api.LoadedModel:
    return api.LoadedModel(small_net(), "small", input_shape=(3, 32, 32))


@pytest.fixture()
def graph_file(model: api.LoadedModel, tmp_path: Path) -> Path:
    return api.save_model(model, tmp_path / "model.pt")


def lying(src: bytes, entry_suffix: str) -> bytes:
    """``src`` with one entry deflated and its headers declaring it unpacks to 4 GB."""
    entries = zip_entries(src)
    i = next(k for k, (name, _) in enumerate(entries) if name.endswith(entry_suffix))
    return declare_entry_size(rezip(entries, {entries[i][0]}), i, FOUR_GB)


def refuse_any_torch_load(monkeypatch) -> None:
    def fail(*args, **kwargs):
        pytest.fail("torch was given a zip bomb")
    monkeypatch.setattr(torch, "load", fail)
    monkeypatch.setattr(torch.export, "load", fail)


BOMB = r"bomb\.\w+: its zip entries unpack to 4,29\d,\d{3},\d{3} bytes, more than the 268,435,456 allowed .* refused unread"


def test_a_graph_file_that_declares_gigabytes_is_refused_unread(graph_file: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(lying(graph_file.read_bytes(), "data/0"))
    assert zipfile.ZipFile(bomb).infolist()[0].file_size < 1 << 20 < sum(i.file_size for i in zipfile.ZipFile(bomb).infolist())
    refuse_any_torch_load(monkeypatch)
    with pytest.raises((GraphFormatError, ModelLoadError), match=BOMB):
        api.load_model(str(bomb))


def test_a_state_dict_that_declares_gigabytes_is_refused_unread(model: api.LoadedModel, tmp_path: Path,
                                                                monkeypatch) -> None:
    buf = io.BytesIO()
    torch.save(model.module.state_dict(), buf)
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(lying(buf.getvalue(), "data/0"))
    refuse_any_torch_load(monkeypatch)
    with pytest.raises(ModelLoadError, match=BOMB):
        api.load_model(arch="tests.fuzz.seeds:small_net", weights=str(bomb))


def test_a_pt2_that_declares_gigabytes_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    pt2 = export_to(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), (1, 3, 8, 8),
                    tmp_path / "small.pt2")
    bomb = tmp_path / "bomb.pt2"
    bomb.write_bytes(lying(pt2.read_bytes(), ".json"))
    refuse_any_torch_load(monkeypatch)
    with pytest.raises(ModelLoadError, match=BOMB):
        api.load_model(str(bomb))


def test_a_deflated_entry_within_the_bound_still_loads(graph_file: Path, tmp_path: Path) -> None:
    """The bound is on declared sizes, not on compression: a re-zipped honest file loads."""
    entries = zip_entries(graph_file.read_bytes())
    rezipped = tmp_path / "rezipped.pt"
    rezipped.write_bytes(rezip(entries, {name for name, _ in entries}))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(api.load_model(str(rezipped)).module(x), api.load_model(str(graph_file)).module(x),
                               rtol=0, atol=0)


def test_a_sparse_state_tensor_is_refused_in_one_line(graph_file: Path, tmp_path: Path, capsys) -> None:
    payload = torch.load(graph_file, weights_only=True)
    payload["state_dict"]["conv1.weight"] = payload["state_dict"]["conv1.weight"].to_sparse()
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    from pyprune.cli.app import main
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"pyprune info: error: {bad}: state_dict tensors must be dense; these are not: "
                                "conv1.weight (sparse_coo)"], err
