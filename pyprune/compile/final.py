"""The chosen model, written and then measured as written: ``model.ppz`` is
packed, decoded again, and the decoded model is what the report's accuracies
and sizes describe, so the report cannot speak of a model the file does not hold."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .. import distributed
from ..data import ArrayDataset
from ..encode import graph_state_dict, inspect, load_ppz, ppz_bytes, save_ppz
from ..encode.ppz import fp32_bytes as tensor_fp32_bytes
from ..passes import create_pass, read_codebooks
from ..search import Evaluator, SearchOutcome, State
from ..train import DivergenceError, evaluate


@dataclass
class FinalModel:
    state: State  # what was chosen: the baseline when nothing met the target
    met_target: bool
    decoded: fx.GraphModule  # model.ppz, read back
    path: Path
    file_bytes: int
    val_accuracy: float
    test_accuracy: float
    baseline_test_accuracy: float
    inspection: dict[str, Any]  # model.ppz's per-tensor storage (pyprune inspect)
    bnfold: dict[str, Any] | None = None  # what folding BatchNorm for inference saved, or why it did not
    # the search's answer when its written file measured below the target (a stale or
    # edited journal, a numerical surprise): {pipeline, search_val_accuracy, file_val_accuracy}
    unconfirmed: dict[str, Any] | None = None


def fp32_bytes(gm: torch.nn.Module) -> int:
    """The model's uncompressed size: its state as ``pyprune inspect`` counts a file's
    (floating-point tensors as float32, others at their own size)."""
    state = graph_state_dict(gm) if isinstance(gm, fx.GraphModule) else gm.state_dict()
    return sum(tensor_fp32_bytes(t.dtype, t.numel()) for t in state.values())


def fold_for_inference(ev: Evaluator, state: State, target: float, meta: dict[str, Any],
                       books: dict[str, torch.Tensor]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """``state``'s model with BatchNorm folded (``bnfold``): with float16 vectors if the
    result still meets ``target`` on val, else with float32 ones if that does, else as
    it was. Returns the model to write and what was tried."""
    shared = list(state.codebook_layers())
    before = len(ppz_bytes(state.gm, meta, books))
    record: dict[str, Any] = {"applied": False, "float16": False, "bytes_before": before, "bytes_after": before,
                              "tried": []}
    for float16 in (True, False):
        gm = copy.deepcopy(state.gm)
        gm = create_pass("bnfold", float16=float16, shared=shared)(gm).graph_module.eval()
        accuracy = ev.accuracy(gm, ev.data.val)
        size = len(ppz_bytes(gm, meta, books))
        record["tried"].append({"float16": float16, "val_accuracy": accuracy, "bytes": size})
        if accuracy >= target and size < before:
            record.update(applied=True, float16=float16, bytes_after=size, val_accuracy=accuracy)
            return gm, record
    return state.gm, record


def recover(ev: Evaluator, state: State, epochs: float, target: float) -> tuple[State, dict[str, Any]]:
    """The chosen model fine-tuned ``epochs`` more (keeping its passes' constraints,
    distilling like every fine-tune of the search), kept only if it still meets
    ``target`` on val and is no worse than before; otherwise ``state`` as it was."""
    record: dict[str, Any] = {"epochs": epochs, "val_before": state.val_accuracy, "val_after": None, "kept": False,
                              "reason": ""}
    start = time.perf_counter()
    try:
        tuned = ev.finetune(state, epochs, key=f"{state.key}>final({epochs!r})@ft")
    except DivergenceError as exc:
        record["reason"] = f"rolled back: {exc}"
        return state, record
    accuracy = ev.accuracy(tuned.gm, ev.data.val)
    record["val_after"], record["seconds"] = accuracy, time.perf_counter() - start
    if accuracy < target:
        record["reason"] = f"val {accuracy:.4f} below the target {target:.4f}: kept the model from before"
        return state, record
    if state.val_accuracy is not None and accuracy < state.val_accuracy:
        record["reason"] = f"val {accuracy:.4f} below {state.val_accuracy:.4f} before it: kept the model from before"
        return state, record
    tuned.candidate, tuned.val_accuracy = state.candidate, accuracy
    record["kept"] = True
    return tuned, record


def write_final(ev: Evaluator, base: State, outcome: SearchOutcome, test_set: ArrayDataset, out: Path,
                target: float, meta: dict[str, Any], fold_batchnorm: bool = True) -> FinalModel:
    """Write ``out/model.ppz`` (rank 0) and measure it: val and test accuracy of the
    decoded file, and the baseline's test accuracy for comparison. A compressed result
    is written with its BatchNorm folded for inference where the target still holds
    (``fold_batchnorm``); the baseline fallback stays lossless."""
    final = outcome.final
    met = final is not base and final.candidate is not None and final.candidate.meets
    if not met:
        return _write(ev, base, base, False, test_set, out, target, meta, fold_batchnorm)
    written = _write(ev, base, final, True, test_set, out, target, meta, fold_batchnorm)
    if written.val_accuracy >= target:
        return written
    # met_target is what the written file measures, whatever the search recorded
    fallback = _write(ev, base, base, False, test_set, out, target, meta, fold_batchnorm)
    fallback.unconfirmed = {"pipeline": final.pipeline, "search_val_accuracy": final.candidate.accuracy,
                            "file_val_accuracy": written.val_accuracy}
    return fallback


def _write(ev: Evaluator, base: State, final: State, met: bool, test_set: ArrayDataset, out: Path, target: float,
           meta: dict[str, Any], fold_batchnorm: bool) -> FinalModel:
    books = read_codebooks(final.gm, final.codebook_layers())
    file_meta = {**meta, "original_fp32_bytes": fp32_bytes(base.gm),
                 "provenance": [{"compile": final.pipeline, "target": target}]}
    written, bnfold = final.gm, None
    if met and fold_batchnorm:
        written, bnfold = fold_for_inference(ev, final, target, file_meta, books)
        if bnfold["applied"]:
            file_meta["provenance"][0]["bnfold"] = {"float16": bnfold["float16"]}
    path = out / "model.ppz"
    if distributed.is_main():
        save_ppz(written, path, file_meta, books, force=True)
    distributed.barrier()
    decoded, _ = load_ppz(path)  # measure what was written, not what is in memory
    mean, std = ev.data.mean, ev.data.std
    val_acc = evaluate(decoded, ev.data.val, mean, std, progress=False).accuracy
    test_acc = evaluate(decoded, test_set, mean, std, progress=False).accuracy
    base_test = evaluate(base.gm, test_set, mean, std, progress=False).accuracy
    return FinalModel(final, met, decoded, path, path.stat().st_size, val_acc, test_acc, base_test, inspect(path),
                      bnfold)
