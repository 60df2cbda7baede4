"""The journal on resume (issue 19, defect 3): a cut tail, records of the wrong shape,
weights files that will not load, and a journal that is not a regular file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pyprune.search.journal import Journal, ResumeMismatch

from .tiny import tiny_base, tiny_evaluator

SETTINGS = {"x": 1}


def _record(key: str, accuracy: float = 0.5) -> dict:
    return {"key": key, "search": "heuristic", "pipeline": "mask(sparsity=0.5)", "stage": "mask", "level": 0.5,
            "phase": "val", "accuracy": accuracy, "n": 100, "meets": True, "size_bytes": 1000, "params": 10,
            "finetune_epochs": 0.0, "seconds": 0.1, "status": "ok", "reason": "", "extra": {}}


def _journal_with(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "journal.jsonl"
    path.write_text("".join([json.dumps({"fingerprint": SETTINGS}) + "\n", *lines]))
    return path


def test_a_cut_tail_is_dropped_and_the_next_record_starts_on_its_own_line(tmp_path: Path, caplog) -> None:
    path = _journal_with(tmp_path, json.dumps(_record("a#val")) + "\n", json.dumps(_record("b#val"))[:37])
    with caplog.at_level(logging.WARNING, logger="pyprune.search.journal"):
        journal = Journal(tmp_path, SETTINGS, resume=True)
    assert "a#val" in journal and "b#val" not in journal
    assert f"{path}: its last line was cut short" in caplog.text
    assert path.read_bytes().endswith(b"\n")
    journal.put(tiny_candidate("c#val"))
    assert {c.key for c in Journal(tmp_path, SETTINGS, resume=True)} == {"a#val", "c#val"}


def tiny_candidate(key: str):
    from pyprune.search.candidates import Candidate

    return Candidate.from_record(_record(key))


@pytest.mark.parametrize("line,problem", [
    ("[1, 2, 3]", "a list, not a record"),
    (json.dumps({**_record("k#val"), "key": ["k"]}), "'key' is ['k'], not str"),
    (json.dumps({**_record("k#val"), "accuracy": "high"}), "'accuracy' is 'high'"),
    (json.dumps({**_record("k#val"), "accuracy": 95}), "not in [0, 1]"),
    (json.dumps({**_record("k#val"), "meets": 1}), "'meets' is 1, not bool"),
    ("{not json", "Expecting property name"),
])
def test_a_bad_record_is_skipped_naming_the_file_and_line(tmp_path: Path, caplog, line: str, problem: str) -> None:
    path = _journal_with(tmp_path, line + "\n", json.dumps(_record("good#val")) + "\n")
    with caplog.at_level(logging.WARNING, logger="pyprune.search.journal"):
        journal = Journal(tmp_path, SETTINGS, resume=True)
    assert [c.key for c in journal] == ["good#val"]
    assert f"{path}, line 2: " in caplog.text and problem in caplog.text and "measured again" in caplog.text


@pytest.mark.parametrize("head", ["", "[]\n", '{"fingerprint": [1]}\n', "garbage\n"])
def test_a_journal_without_its_settings_line_is_refused(tmp_path: Path, head: str) -> None:
    (tmp_path / "journal.jsonl").write_text(head + json.dumps(_record("a#val")) + "\n")
    with pytest.raises(ResumeMismatch, match="line 1 of .*journal.jsonl is not the settings record"):
        Journal(tmp_path, SETTINGS, resume=True)


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_journal_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "journal.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    with pytest.raises(ResumeMismatch, match="journal.jsonl (is not a regular file|is a symbolic link)"):
        Journal(tmp_path, SETTINGS, resume=True)


@pytest.mark.parametrize("poison", ["pickle", "junk", "symlink", "fifo"])
def test_weights_that_will_not_load_are_trained_again(tmp_path: Path, caplog, poison: str) -> None:
    import torch

    journal = Journal(tmp_path, SETTINGS)
    key = "base>mask(sparsity=0.5)@ft"
    path = journal._weights_path(key)
    if poison == "pickle":
        torch.save({"format": object}, path)  # weights_only refuses it
    elif poison == "junk":
        path.write_bytes(b"PK\x03\x04 not a zip")
    elif poison == "symlink":
        os.symlink("/dev/zero", path)
    else:
        os.mkfifo(path)
    with caplog.at_level(logging.WARNING, logger="pyprune.search.journal"):
        assert journal.load_weights(key) is None
    assert str(path) in caplog.text and "trained again" in caplog.text
