"""The compile's output folder: what may be in it before a compile starts, and
writing what goes into it at the end (``model.onnx`` and the reports; ``model.ppz``
is written by :mod:`.final`). Every file is written atomically, ``report.json``
last, so a folder with a ``report.json`` is complete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..data import ArrayDataset
from .. import export
from ..export import OnnxExportError, VerificationError
from ..files import atomic_write
from .report import plot_budget, plot_pareto, render_markdown, write_json

STATE_DIR = ".compile-state"  # journal and fine-tuned weights of an unfinished compile
OUTPUTS = ("model.ppz", "model.onnx", "model.unverified.onnx", "report.json", "report.md", "pareto.png", "bytes.png")


def check_output(out: Path, resume: bool, force: bool) -> None:
    """Refuse an output folder that holds something a compile must not lose."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    state = out / STATE_DIR / "journal.jsonl"
    if force:
        return
    if resume:
        if not state.is_file():
            raise FileExistsError(f"{out} holds no interrupted compile to resume (no {STATE_DIR}/journal.jsonl); "
                                  "pass --force to start over")
        return
    raise FileExistsError(f"{out} is not empty; pass --resume to continue an interrupted compile, or --force "
                          "to start over (pyprune's own outputs there are replaced)")


def clear_outputs(out: Path) -> None:
    """Remove pyprune's own outputs and state from ``out`` (``--force``); nothing else."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    remove_state(out)


def remove_state(out: Path) -> None:
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def no_onnx(verification: dict[str, Any] | None = None, **why: Any) -> dict[str, Any]:
    """The report's ``onnx`` entry when there is no ``model.onnx``; ``why`` says so
    (``error=`` a failure, ``skipped=`` the flag that asked for none)."""
    return {"path": None, "verified": False, "verification": verification, **why}


def write_compact_onnx(gm: nn.Module, out: Path, val: ArrayDataset, meta: dict[str, Any],
                       n: int) -> dict[str, Any]:
    """The compact ONNX file of the decoded model, verified on ``n`` validation
    images; a failure is reported, not raised, so the search's result is kept."""
    inputs, described = export.verification_inputs(val, n, meta["mean"], meta["std"]) if n else (None, None)
    try:
        return export.write_onnx(gm, out / "model.onnx", "compact", meta["input_shape"], inputs=inputs, data=described,
                          meta=meta, force=True).to_dict()
    except VerificationError as exc:
        return no_onnx(exc.verification.to_dict(), kept=exc.kept, error=f"ONNX verification failed: {exc}")
    except OnnxExportError as exc:
        return no_onnx(error=f"ONNX export failed: {exc}")


def write_reports(report: dict[str, Any], out: Path) -> None:
    """``report.md``, ``pareto.png``, ``bytes.png``, then ``report.json``."""
    text = render_markdown(report)
    atomic_write(out / "report.md", lambda f: f.write(text.encode()), force=True)
    plot_pareto(report, out / "pareto.png")
    plot_budget(report, out / "bytes.png")
    write_json(out / "report.json", report)
