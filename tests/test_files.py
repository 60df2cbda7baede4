"""Output files under failure (issue 19, defect 6): a full disk or a failing writer
gives one line naming the path, exit 2, and leaves no partial or empty file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyprune import files
from pyprune.cli import main


class FullDisk:
    """A file opened for writing on a disk with no space left."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


@pytest.fixture()
def full_disk(monkeypatch):
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f
    monkeypatch.setattr(files.os, "fdopen", fdopen)


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_write_names_the_path_and_leaves_nothing(tmp_path: Path, full_disk) -> None:
    with pytest.raises(files.OutputError, match=r"cannot write .*out\.bin: No space left on device"):
        files.atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x" * 100))
    assert _left(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_file(tmp_path: Path, full_disk) -> None:
    (tmp_path / "out.bin").write_bytes(b"old")
    with pytest.raises(files.OutputError):
        files.atomic_write(tmp_path / "out.bin", lambda f: f.write(b"new"), force=True)
    assert _left(tmp_path) == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"old"


def test_torch_save_failing_mid_write_is_an_output_error(tmp_path: Path) -> None:
    def torch_like(f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    with pytest.raises(files.OutputError, match=r"cannot write .*w\.pt: .*PytorchStreamWriter failed writing"):
        files.atomic_write(tmp_path / "w.pt", torch_like)
    assert _left(tmp_path) == []


@pytest.mark.parametrize("suffix", [".ppz", ".pt"])
def test_opt_on_a_full_disk_says_so_in_one_line(tmp_path: Path, full_disk, capsys, suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    code = main(["opt", "--arch", "resnet20", "--passes", "mask(sparsity=0.5)", "--eval-split", "none",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == f"pyprune opt: error: cannot write {out}: No space left on device"
    assert _left(tmp_path) == []


def test_eval_predictions_on_a_full_disk_leave_no_empty_file(tmp_path: Path, full_disk, capsys, data_root) -> None:
    out = tmp_path / "predictions.txt"
    code = main(["eval", "--arch", "resnet20", "--limit", "8", "--data-root", str(data_root), "--no-progress",
                 "--predictions", str(out)])
    assert code == 2 and "cannot write" in capsys.readouterr().err and _left(tmp_path) == []
