"""The short fuzz run in CI (the long one is ``make fuzz``): structure-aware mutants of
both model-file kinds through ``inspect``, ``info`` and ``eval``, in worker processes,
with nothing but exit 0 or a one-line error naming the file allowed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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


def _child(code: str) -> subprocess.Popen:
    """A Python process that runs ``code`` after saying it has started."""
    child = subprocess.Popen([sys.executable, "-c", f"print('ready', flush=True)\n{code}"], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "ready\n"
    return child


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="CPU time is read from /proc")
def test_a_hang_is_cpu_time_spent_on_one_mutant_not_time_waited_by_a_starved_worker() -> None:
    sleeper = _child("import time; time.sleep(60)")
    spinner = _child("import time\nwhile True: pass")
    try:
        # a worker that waited 5 s without computing is starved or blocked: a hang only
        # after WALL_FACTOR deadlines of the clock
        idle = harness.Worker(SimpleNamespace(pid=sleeper.pid), None, 1, time.monotonic() - 5,
                              harness.cpu_seconds(sleeper.pid))
        assert not idle.overdue(deadline=2.0)
        idle.started -= 2.0 * harness.WALL_FACTOR
        assert idle.overdue(deadline=2.0)
        # one that computed for a deadline's CPU seconds hangs, whatever the clock says
        busy = harness.Worker(SimpleNamespace(pid=spinner.pid), None, 1, time.monotonic(),
                              harness.cpu_seconds(spinner.pid))
        waited = time.monotonic()
        while harness.cpu_seconds(spinner.pid) - busy.cpu_started < 0.5 and time.monotonic() - waited < 60:
            time.sleep(0.05)
        busy.started = time.monotonic()
        assert busy.overdue(deadline=0.4) and not busy.overdue(deadline=5.0)
    finally:
        for child in (sleeper, spinner):
            child.kill()
            child.wait()
    # a process that is gone has no CPU time to read: the clock decides
    assert harness.cpu_seconds(sleeper.pid) is None
    gone = harness.Worker(SimpleNamespace(pid=sleeper.pid), None, 1, time.monotonic() - 3, None)
    assert gone.overdue(deadline=2.0) and not gone.overdue(deadline=5.0)
