"""Run mutants through the CLI in worker processes and sort what happens.

Each mutant is written to a file and given to the commands a user would run on it
(``inspect``, ``info``, ``eval`` on eight test images), in-process in a worker, so a
worker that dies is a crash and one that spends the deadline's seconds of CPU on one
mutant (or, waiting without computing, :data:`WALL_FACTOR` times them on the clock) is a
hang; both are killed and replaced. CPU time, not the clock, because a worker starved by
other work on the machine is slow, not stuck. Every command must end in one of two ways:

* ``ok``: exit 0 (the mutation left a model pyprune can load and run);
* ``clean``: exit 2 with one line on stderr, ``pyprune CMD: error: ...``, naming the file.

Anything else is a finding: ``traceback`` (an exception escaped the CLI), ``unnamed``
(a clean line that does not name the file), ``noisy`` (more than one line, e.g. a
warning), ``exit`` (another exit code), ``crash``, ``hang``; ``harness`` is a mutant the
mutator failed to make. Findings are written to
the output folder with the mutant's number, which makes them again (``mutate.mutant``).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import resource
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

GOOD = ("ok", "clean")
FINDINGS = ("traceback", "unnamed", "noisy", "exit", "crash", "hang", "harness")
EVAL = ["--split", "test", "--limit", "8", "--batch-size", "8", "--threads", "1", "--no-progress"]
COMMANDS = {
    "ppz": [["inspect"], ["info"], ["eval", *EVAL]],
    "graph": [["info"], ["eval", *EVAL]],
}
SUFFIX = {"ppz": ".ppz", "graph": ".pt"}


def verdict(code: int | None, err: str, path: Path, command: str) -> str:
    """How one command ended, from its exit code and stderr (see the module docstring)."""
    if code is None:
        return "traceback"
    if code == 0:
        return "ok"
    lines = err.strip().splitlines()
    if code != 2:
        return "exit"
    if len(lines) != 1 or not lines[0].startswith(f"pyprune {command}: error: "):
        return "noisy"
    return "clean" if path.name in lines[0] else "unnamed"


def run_command(argv: list[str], path: Path) -> tuple[str, str]:
    """``pyprune argv path`` in this process: (verdict, stderr or traceback)."""
    from pyprune.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code: int | None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([argv[0], str(path), *argv[1:]])
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - any escape is the finding
        code = None
        err.write(traceback.format_exc())
    return verdict(code, err.getvalue(), path, argv[0]), err.getvalue()


def _reset_peak_rss() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM), so the
    peak measured is that of pyprune reading one mutant, not of making it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; never reset


def _worker(conn: Connection, kind: str, seeds: dict[str, bytes], run_seed: int, folder: str) -> None:
    import torch

    from .mutate import mutant

    torch.set_num_threads(1)
    names = sorted(seeds)
    path = Path(folder) / f"mutant-{os.getpid()}{SUFFIX[kind]}"
    while True:
        number = conn.recv()
        if number is None:
            return
        try:
            path.write_bytes(mutant(kind, seeds[names[number % len(names)]], number, run_seed))
            _reset_peak_rss()
        except Exception:  # noqa: BLE001 - a fault of the mutator, not of pyprune
            conn.send((number, [("harness", traceback.format_exc())], 0))  # the mutator's memory is not pyprune's
            continue
        results = [run_command(argv, path) for argv in COMMANDS[kind]]
        conn.send((number, results, _peak_rss_bytes()))


@dataclass
class Worker:
    process: Any
    conn: Connection
    number: int | None = None
    started: float = 0.0
    cpu_started: float | None = None

    def overdue(self, deadline: float) -> bool:
        """Whether the mutant in hand has taken ``deadline`` seconds of this worker's
        CPU, or ``WALL_FACTOR`` times that on the clock (a deadlock computes nothing);
        where CPU time cannot be read, ``deadline`` on the clock."""
        wall = time.monotonic() - self.started
        cpu = cpu_seconds(self.process.pid)
        if cpu is None or self.cpu_started is None:
            return wall > deadline
        return cpu - self.cpu_started > deadline or wall > WALL_FACTOR * deadline


#: How many deadlines of wall-clock time a worker may wait without using its CPU.
WALL_FACTOR = 4


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` and all its threads, from
    ``/proc`` (None where there is none, or the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Summary:
    kind: str
    seeds: dict[str, bytes] = field(repr=False, default_factory=dict)
    run_seed: int = 0
    mutants: int = 0
    outcomes: Counter = field(default_factory=Counter)  # per command run
    loaded: int = 0  # mutants every command accepted
    refused: int = 0  # mutants refused cleanly
    findings: list[tuple[int, str, str]] = field(default_factory=list)  # (number, verdict, detail)
    peak_rss: int = 0  # the highest of any worker while pyprune read one mutant
    peak_number: int | None = None
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        return len(self.findings)


class Pool:
    """Worker processes fed one mutant number at a time, each watched for a deadline."""

    def __init__(self, kind: str, seeds: dict[str, bytes], run_seed: int, workers: int, folder: Path) -> None:
        self.ctx = mp.get_context("spawn")  # torch is not fork-safe once its threads exist
        self.args = (kind, seeds, run_seed, str(folder))
        self.workers = [self._start() for _ in range(workers)]

    def _start(self) -> Worker:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        p.start()
        child.close()
        return Worker(p, parent)

    def replace(self, w: Worker) -> None:
        w.process.kill()
        w.process.join()
        self.workers[self.workers.index(w)] = self._start()

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()


def run(kind: str, seeds: dict[str, bytes], numbers: range, folder: Path, workers: int = 2,
        deadline: float = 30.0, run_seed: int = 0, progress: bool = True) -> Summary:
    """Every mutant in ``numbers`` of ``seeds`` (one file kind) through the commands;
    findings are saved under ``folder/findings``."""
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    summary, todo, start = Summary(kind, seeds, run_seed), list(reversed(numbers)), time.monotonic()
    pool = Pool(kind, seeds, run_seed, workers, folder)
    bar = tqdm(total=len(numbers), desc=f"fuzz {kind}", unit="mutant", disable=not progress)
    try:
        while todo or any(w.number is not None for w in pool.workers):
            for w in pool.workers:
                if w.number is None and todo:
                    w.number, w.started, w.cpu_started = todo.pop(), time.monotonic(), cpu_seconds(w.process.pid)
                    w.conn.send(w.number)
            busy = [w for w in pool.workers if w.number is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for w in busy:
                if w.conn in ready and w.conn.poll():
                    try:
                        number, results, rss = w.conn.recv()
                    except (EOFError, OSError):
                        number, results, rss = w.number, None, 0
                else:
                    number, results, rss = w.number, None, 0
                if results is not None:
                    _record(summary, number, results, rss, folder)
                elif not w.process.is_alive():
                    _finding(summary, number, "crash", f"worker exit code {w.process.exitcode}", folder)
                elif w.overdue(deadline):
                    _finding(summary, number, "hang", f"no answer in {deadline:.0f} s of CPU", folder)
                else:
                    continue
                summary.mutants += 1
                bar.update(1)
                if results is None:
                    pool.replace(w)  # the new worker starts idle
                else:
                    w.number = None
    finally:
        bar.close()
        pool.close()
    summary.seconds = time.monotonic() - start
    return summary


def _record(summary: Summary, number: int, results: list[tuple[str, str]], rss: int, folder: Path) -> None:
    for v, _ in results:
        summary.outcomes[v] += 1
    if all(v == "ok" for v, _ in results):
        summary.loaded += 1
    elif all(v in GOOD for v, _ in results):
        summary.refused += 1
    if rss > summary.peak_rss:
        summary.peak_rss, summary.peak_number = rss, number
    for (v, detail), argv in zip(results, COMMANDS[summary.kind]):
        if v not in GOOD:
            _finding(summary, number, v, f"pyprune {argv[0]}: {detail.strip()}", folder)
            return


def _finding(summary: Summary, number: int, kind: str, detail: str, folder: Path) -> None:
    summary.findings.append((number, kind, detail))
    if kind in ("crash", "hang"):
        summary.outcomes[kind] += 1
    out = folder / "findings"
    out.mkdir(exist_ok=True)
    (out / f"{summary.kind}-{number}-{kind}.txt").write_text(detail + "\n")
    if kind in ("crash", "hang"):  # the file that did it, made again from its number
        from .mutate import mutant

        names = sorted(summary.seeds)
        data = mutant(summary.kind, summary.seeds[names[number % len(names)]], number, summary.run_seed)
        (out / f"{summary.kind}-{number}{SUFFIX[summary.kind]}").write_bytes(data)


def headline(detail: str) -> str:
    """One line for a finding: a traceback's exception line, else its first line."""
    lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
    if any("Traceback (most recent call last)" in ln for ln in lines):
        raised = [ln for ln in lines if not ln[0].isspace() and not ln.startswith(("Traceback", "The above", "During"))]
        ours = [ln.strip() for ln in lines if ln.lstrip().startswith("File ") and "/pyprune/" in ln]
        where = f" ({ours[-1]})" if ours else ""
        return (lines[0].split(":")[0] + ": " + raised[-1] + where) if raised else lines[-1]
    return lines[0] if lines else ""


def grouped(summary: Summary) -> list[tuple[str, str, list[int]]]:
    """Findings grouped by (kind, headline), most frequent first: (kind, headline, numbers)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for number, what, detail in summary.findings:
        groups.setdefault((what, headline(detail)[:300]), []).append(number)
    return sorted(((w, h, n) for (w, h), n in groups.items()), key=lambda g: -len(g[2]))


def table(summaries: list[Summary]) -> str:
    """The counts, one row per file kind."""
    cols = ["kind", "mutants", "loaded", "refused", *FINDINGS, "peak MB", "at mutant", "seconds"]
    rows = [[s.kind, s.mutants, s.loaded, s.refused, *(sum(1 for f in s.findings if f[1] == k)
                                                                  for k in FINDINGS),
             f"{s.peak_rss / 2**20:.0f}", s.peak_number, f"{s.seconds:.0f}"] for s in summaries]
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])
