"""The short fuzz run in CI (the long one is ``make fuzz``): structure-aware mutants of
both model-file kinds through ``inspect``, ``info`` and ``eval``, in worker processes,
with nothing but exit 0 or a one-line error naming the file allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import harness
from .mutate import mutant
from .seeds import kind_of, make_seeds

MUTANTS = 40  # per kind; ~10 s each, most of it starting the worker


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    paths = make_seeds(tmp_path_factory.mktemp("seeds"))
    return {kind: {n: p.read_bytes() for n, p in paths.items() if kind_of(n) == kind} for kind in ("ppz", "graph")}


@pytest.mark.parametrize("kind", ["ppz", "graph"])
def test_mutants_load_or_are_refused_in_one_line_naming_the_file(kind: str, seeds, data_root: Path,
                                                                 tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYPRUNE_DATA", str(data_root))  # the workers inherit it
    # numbers past those `make fuzz` starts with, so the two runs cover different mutants
    summary = harness.run(kind, seeds[kind], range(10**6, 10**6 + MUTANTS), tmp_path, workers=1, progress=False)
    assert summary.mutants == MUTANTS
    assert not summary.findings, "\n".join(f"{n} {w}: {harness.headline(d)}" for n, w, d in summary.findings)
    # the mutators reach both sides: models that still load, and refusals
    assert summary.loaded > 0 and summary.refused > MUTANTS // 2, summary


@pytest.mark.parametrize("kind", ["ppz", "graph"])
def test_a_mutant_is_a_function_of_its_number(kind: str, seeds) -> None:
    seed = next(iter(seeds[kind].values()))
    made = [mutant(kind, seed, n) for n in range(20)]
    assert made == [mutant(kind, seed, n) for n in range(20)]
    # a mutation can happen to change nothing (a key swapped with itself), rarely
    assert len(set(made) - {seed}) >= 17


@pytest.mark.parametrize("code,err,expected", [
    (0, "", "ok"),
    (2, "pyprune eval: error: /x/m.ppz: section 3: CRC32 mismatch\n", "clean"),
    (2, "pyprune eval: error: section 3: CRC32 mismatch\n", "unnamed"),
    (2, "warning: something\npyprune eval: error: /x/m.ppz: bad\n", "noisy"),
    (1, "pyprune eval: error: /x/m.ppz: bad\n", "exit"),
    (None, "Traceback (most recent call last):\n  ...\nValueError: x\n", "traceback"),
])
def test_verdicts(code, err, expected) -> None:
    assert harness.verdict(code, err, Path("/x/m.ppz"), "eval") == expected


def test_an_escaping_exception_is_a_traceback(tmp_path: Path, monkeypatch) -> None:
    import pyprune.cli.app as app

    def boom(args):
        raise KeyError("escaped")
    monkeypatch.setattr(app, "_run", boom)
    path = tmp_path / "m.ppz"
    path.write_bytes(b"")
    verdict, detail = harness.run_command(["inspect"], path)
    assert verdict == "traceback" and "KeyError: 'escaped'" in detail
    assert harness.headline(detail).startswith("Traceback (most recent call last): KeyError: 'escaped' (File ")


def test_a_missing_file_is_a_clean_refusal(tmp_path: Path) -> None:
    verdict, detail = harness.run_command(["info"], tmp_path / "absent.pt")
    assert verdict == "clean", detail
    assert os.fspath(tmp_path / "absent.pt") in detail
