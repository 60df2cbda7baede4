"""Finding and fetching pretrained checkpoints, with a fake download function (no network)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pyprune.models import ModelLoadError, pretrained
from pyprune.models.pretrained import (
    PRETRAINED,
    PretrainedCheckpoint,
    default_cache_dir,
    default_search_dirs,
    find_or_fetch_pretrained,
)

REAL_RESNET20 = PRETRAINED["resnet20"]  # taken before the fixture below swaps it
GOOD = b"pretend these are resnet20 weights"
FAKE = PretrainedCheckpoint("resnet20", "resnet20-fake.th", hashlib.sha256(GOOD).hexdigest())


@pytest.fixture(autouse=True)
def fake_table(monkeypatch: pytest.MonkeyPatch) -> None:
    # Point resnet20 at small fake bytes so tests need neither network nor real files.
    monkeypatch.setitem(PRETRAINED, "resnet20", FAKE)


class FakeDownload:
    """Stands in for torch.hub.download_url_to_file; records calls, writes given bytes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.calls: list[tuple[str, str, str | None]] = []

    def __call__(self, url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        self.calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(self.payload)


def test_table_matches_published_checksums() -> None:
    # The real table (the autouse fixture replaced resnet20 only).
    assert pretrained.PRETRAINED["resnet56"].sha256 == (
        "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"
    )
    assert pretrained.PRETRAINED["resnet32"].url == (
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
        "pretrained_models/resnet32-d509ac18.th"
    )
    assert REAL_RESNET20.sha256.startswith("12fca82f") and REAL_RESNET20.filename == "resnet20-12fca82f.th"
    for arch, ckpt in pretrained.PRETRAINED.items():
        if arch != "resnet20":
            assert ckpt.filename == f"{arch}-{ckpt.sha256[:8]}.th"


def test_present_good_file_is_used_without_download(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (b / FAKE.filename).write_bytes(GOOD)
    dl = FakeDownload(GOOD)
    got = find_or_fetch_pretrained("resnet20", [a, b], tmp_path / "cache", download=True, _download_fn=dl)
    assert got == b / FAKE.filename
    assert dl.calls == []


def test_present_bad_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / FAKE.filename).write_bytes(b"tampered")
    dl = FakeDownload(GOOD)
    with pytest.raises(ModelLoadError, match="wrong sha256") as info:
        find_or_fetch_pretrained("resnet20", [tmp_path], tmp_path / "cache", download=True, _download_fn=dl)
    assert str(tmp_path / FAKE.filename) in str(info.value)
    assert dl.calls == []  # never overwritten by a download either


def test_absent_without_download_names_folders(tmp_path: Path) -> None:
    a, cache = tmp_path / "models", tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        find_or_fetch_pretrained("resnet20", [a], cache, download=False)
    msg = str(info.value)
    assert str(a) in msg and str(cache) in msg and "--download" in msg


def test_absent_with_download_fetches_and_verifies(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "nested"
    dl = FakeDownload(GOOD)
    got = find_or_fetch_pretrained("resnet20", [tmp_path / "empty"], cache, download=True, _download_fn=dl)
    assert got == cache / FAKE.filename and got.read_bytes() == GOOD
    assert dl.calls == [(FAKE.url, str(cache / FAKE.filename), FAKE.sha256)]
    assert FAKE.url.endswith("/pretrained_models/resnet20-fake.th")
    # Found in the cache next time, without downloading again.
    again = FakeDownload(GOOD)
    assert find_or_fetch_pretrained("resnet20", [], cache, download=True, _download_fn=again) == got
    assert again.calls == []


def test_download_with_wrong_bytes_is_rejected(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="sha256"):
        find_or_fetch_pretrained("resnet20", [], cache, download=True, _download_fn=FakeDownload(b"evil"))
    assert not (cache / FAKE.filename).exists()


def test_download_failure_is_reported(tmp_path: Path) -> None:
    def offline(url: str, dst: str, hash_prefix: str | None = None) -> None:
        raise OSError("network unreachable")

    with pytest.raises(ModelLoadError, match="network unreachable"):
        find_or_fetch_pretrained("resnet20", [], tmp_path, download=True, _download_fn=offline)


def test_unknown_arch_lists_known() -> None:
    with pytest.raises(ModelLoadError, match="vgg19.*resnet20, resnet32, resnet44, resnet56"):
        find_or_fetch_pretrained("vgg19", [], Path("/nonexistent"), download=False)


def test_defaults_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("PYPRUNE_MODELS", f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("PYPRUNE_CACHE", str(tmp_path / "cache"))
    assert default_search_dirs() == [a, b]
    assert default_cache_dir() == tmp_path / "cache"
    b.mkdir()
    (b / FAKE.filename).write_bytes(GOOD)
    assert find_or_fetch_pretrained("resnet20") == b / FAKE.filename
    monkeypatch.delenv("PYPRUNE_MODELS")
    monkeypatch.delenv("PYPRUNE_CACHE")
    assert default_search_dirs() == []
    assert default_cache_dir() == Path.home() / ".cache" / "pyprune" / "models"


@pytest.mark.shared
def test_real_shared_checkpoints_verify(shared_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRETRAINED, "resnet20", REAL_RESNET20)
    path = shared_checkpoint("resnet20")
    got = find_or_fetch_pretrained("resnet20", [path.parent], path.parent / "no-cache", download=False)
    assert got.resolve() == path.resolve()
