"""The compile's report: assembled once as one dict (:func:`build_report`), then
rendered as ``report.json`` (everything), ``report.md`` (a readable summary) and
``pareto.png`` (size against accuracy)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..version import __version__
from ..files import atomic_write
from ..passes import weight_layers
from ..search import Candidate, Evaluator, SearchOutcome, State
from .final import fp32_bytes

if TYPE_CHECKING:
    from .config import CompileConfig
    from .final import FinalModel


def build_report(ev: Evaluator, base: State, baseline: Candidate, outcome: SearchOutcome, final: "FinalModel",
                 onnx: dict[str, Any], config: "CompileConfig", test_set: Any, target: float,
                 settings: dict[str, Any], search_seconds: float, elapsed: float, processes: int) -> dict[str, Any]:
    """Everything a compile found, in the order ``report.json`` lists it."""
    chosen = final.state
    met = final.met_target
    original = fp32_bytes(base.gm)
    candidates = [c.to_dict() for c in ev.journal]
    measured = [c for c in candidates if c["stage"] != "baseline"]
    report = {
        "pyprune": __version__, "model": ev.meta["arch"],
        "settings": {**settings, "budget_minutes": config.budget_minutes},
        "target": {**config.target.to_dict(), "accuracy": target},
        "data": {"name": config.data.name, "val_from": config.val_from, "val_split": ev.data.val.name,
                 "val_n": len(ev.data.val), "screen_n": len(ev.data.screen), "test_split": test_set.name,
                 "test_n": len(test_set), "train_n": len(ev.data.train)},
        "baseline": {"val_accuracy": baseline.accuracy, "test_accuracy": final.baseline_test_accuracy,
                     "params": baseline.params, "fp32_bytes": original, "ppz_bytes": baseline.size_bytes},
        "chosen": {"pipeline": chosen.pipeline if met else "", "key": chosen.key, "met_target": met,
                   "val_accuracy": final.val_accuracy, "search_val_accuracy": chosen.candidate.accuracy if met else
                   baseline.accuracy, "test_accuracy": final.test_accuracy,
                   "params": sum(p.numel() for p in chosen.gm.parameters()), "file_bytes": final.file_bytes,
                   "fp32_bytes": original, "compression": original / final.file_bytes,
                   "parts": final.inspection["total"]["parts"], "unconfirmed": final.unconfirmed},
        "search": {
            "kind": config.search, "order": list(outcome.order),
            "candidates": len(measured),
            "screened": sum(c["phase"] == "screen" for c in measured),
            "finetuned": sum(c["phase"] == "finetune" for c in measured),
            "validated": sum(c["phase"] == "val" for c in measured),
            "failed": sum(c["status"] != "ok" for c in measured),
            "cache_hits": ev.journal.hits, "seconds": search_seconds,
            # distillation's teacher batches answered from memory / computed (MemoizedTeacher)
            "teacher_batches": {"reused": getattr(ev.teacher, "reused", 0), "computed": getattr(ev.teacher, "computed", 0)},
            "budget_minutes": config.budget_minutes, "budget_exhausted": outcome.budget_exhausted,
            "stages": [s.to_dict() for s in outcome.stages], "l1": outcome.l1, "orders": outcome.orders,
            "moves": outcome.moves, "kept_on_screen": outcome.kept_on_screen,
        },
        "bnfold": final.bnfold,
        "onnx": {**onnx, "bytes_vs_ppz": onnx["bytes"] / final.file_bytes} if onnx.get("bytes") else onnx,
        "layers": layer_table(base.gm, chosen.gm, final.inspection, set(chosen.codebook_layers())),
        "candidates": candidates,
    }
    report["total_seconds"] = elapsed
    report["processes"] = processes
    return report


def _teacher_line(batches: dict[str, int] | None) -> list[str]:
    if not batches or not (batches["reused"] or batches["computed"]):
        return []  # no distillation
    return [f"- distillation: the teacher's outputs computed for {batches['computed']:,} batches, "
            f"remembered for {batches['reused']:,} more (every fine-tune replays the same seeded batches)"]


def layer_table(base: fx.GraphModule, final: fx.GraphModule, inspection: dict[str, Any],
                quantized: set[str]) -> list[dict[str, Any]]:
    """One row per conv/linear layer of the original model: channels before and
    after, sparsity, bits per weight code (32 where not quantized) and the bytes
    its tensors take in the file."""
    stored = {t["name"]: t for t in inspection["tensors"]}
    rows = []
    for name in weight_layers(base):
        before = base.get_submodule(name)
        try:
            after = final.get_submodule(name)
        except AttributeError:
            after = None
        w = after.weight.detach() if after is not None else None
        nonzero = w[w != 0] if w is not None else None
        distinct = int(torch.unique(nonzero).numel()) if nonzero is not None and nonzero.numel() else 0
        shared = name in quantized and w is not None
        tensors = [t for n, t in stored.items() if n.rsplit(".", 1)[0] == name]
        rows.append({
            "layer": name,
            "op": type(before).__name__,
            "in_before": _channels(before, "in"), "in_after": _channels(after, "in"),
            "out_before": _channels(before, "out"), "out_after": _channels(after, "out"),
            "params_before": before.weight.numel(), "params_after": w.numel() if w is not None else 0,
            "sparsity": 1.0 - (nonzero.numel() / w.numel()) if w is not None and w.numel() else 1.0,
            "bits": max(1, math.ceil(math.log2(max(distinct, 1)))) if shared else 32,
            "codes": distinct if shared else None,
            "bytes": sum(t["bytes"] for t in tensors),
            "fp32_bytes_before": 4 * sum(p.numel() for p in before.parameters(recurse=False)),
        })
    return rows


def _channels(m: nn.Module | None, side: str) -> int:
    if m is None:
        return 0
    if isinstance(m, nn.Linear):
        return m.in_features if side == "in" else m.out_features
    return m.in_channels if side == "in" else m.out_channels


def write_json(path: Path, report: dict[str, Any], force: bool = True) -> Path:
    text = json.dumps(report, indent=1, allow_nan=False)
    return atomic_write(path, lambda f: f.write(text.encode()), force=force)


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _onnx_line(onnx: dict[str, Any] | None) -> str:
    if not onnx:
        return "ONNX: not exported."
    if onnx.get("error"):
        return f"ONNX: **not written** ({onnx['error']})."
    if onnx.get("skipped"):
        return f"ONNX: not written ({onnx['skipped']}; `pyprune export-onnx model.ppz --form compact -o model.onnx` writes it from the file)."
    v = onnx.get("verification")
    check = (f"verified in onnxruntime {v['onnxruntime']} on {v['data']}: max logit difference "
             f"{v['max_abs_diff']:.2g}, same top-1 on all {v['n']} images" if v else "not verified")
    ratio = f", {onnx['bytes_vs_ppz']:.2f}x the `.ppz`" if "bytes_vs_ppz" in onnx else ""
    return (f"ONNX: `model.onnx`, compact form (codes + codebook for {onnx['codebook_tensors']} weights), "
            f"{_kib(onnx['bytes'])}{ratio}; {check}.")


def render_markdown(report: dict[str, Any]) -> str:
    chosen, base, search = report["chosen"], report["baseline"], report["search"]
    target = report["target"]
    lines = [f"# pyprune compile: {report['model']}", ""]
    if not chosen["met_target"]:
        lines += ["> **Warning:** no compressed candidate met the target within the budget; the file holds the "
                  "baseline model, packed losslessly.", ""]
    lines += [
        "| | baseline | compiled |", "| --- | ---: | ---: |",
        f"| pipeline | (none) | `{chosen['pipeline'] or '(none)'}` |",
        f"| val top-1 ({report['data']['val_split']}, {report['data']['val_n']} images) | "
        f"{base['val_accuracy']:.4f} | {chosen['val_accuracy']:.4f} |",
        f"| test top-1 ({report['data']['test_split']}, {report['data']['test_n']} images) | "
        f"{base['test_accuracy']:.4f} | {chosen['test_accuracy']:.4f} |",
        f"| parameters | {base['params']:,} | {chosen['params']:,} |",
        f"| size | {_kib(base['fp32_bytes'])} fp32 ({_kib(base['ppz_bytes'])} as lossless .ppz) | "
        f"{_kib(chosen['file_bytes'])} (`model.ppz`) |",
        f"| compression (the original model's fp32 bytes / file bytes, as `pyprune inspect` reports it) | 1.00x | "
        f"**{chosen['compression']:.2f}x** |",
        "",
        _onnx_line(report.get("onnx")),
        "",
        f"Target: {target['accuracy']:.4f} val top-1 ({'baseline minus ' + str(target['value']) if target['kind'] == 'max_drop' else 'absolute'}). "
        f"Validation data: {report['data']['val_from']} (`--val-from {report['data']['val_from']}`); the search never "
        f"saw the test images.",
        "",
        "## Per layer", "",
        "| layer | op | in | out | sparsity | bits | bytes | fp32 bytes before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["layers"]:
        lines.append(f"| {r['layer']} | {r['op']} | {r['in_before']} → {r['in_after']} | "
                     f"{r['out_before']} → {r['out_after']} | {r['sparsity']:.1%} | {r['bits']} | {r['bytes']:,} | "
                     f"{r['fp32_bytes_before']:,} |")
    bnfold = report.get("bnfold")
    if bnfold:
        if bnfold["applied"]:
            saved = bnfold["bytes_before"] - bnfold["bytes_after"]
            lines += ["", f"BatchNorm folded for inference (`bnfold`, {'float16' if bnfold['float16'] else 'float32'} "
                      f"scale and shift): {saved:,} bytes saved ({bnfold['bytes_before']:,} → "
                      f"{bnfold['bytes_after']:,}), val top-1 {bnfold['val_accuracy']:.4f} still meets the target. "
                      "The file is for inference; `--keep-batchnorm` writes the trainable form."]
        else:
            lines += ["", "BatchNorm kept: folding it missed the target or saved nothing ("
                      + "; ".join(f"{'float16' if t['float16'] else 'float32'}: val {t['val_accuracy']:.4f}, "
                                  f"{t['bytes']:,} bytes" for t in bnfold["tried"]) + ")."]
    parts = chosen.get("parts")
    if parts:
        lines += ["", "## Where the bytes are", "", "| part | bytes | share |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {n:,} | {n / chosen['file_bytes']:.1%} |" for name, n in parts.items()]
        lines += [f"| file | {chosen['file_bytes']:,} | 100.0% |", "", "![where the bytes are](bytes.png)"]
    lines += ["", "## Search", "",
              f"- strategy: {search['kind']}, order {' → '.join(search['order'])} then Huffman storage",
              f"- candidates measured: {search['candidates']} ({search['screened']} screened, "
              f"{search['finetuned']} fine-tuned, {search['validated']} validated without training, "
              f"{search['failed']} failed); cache hits: {search['cache_hits']}",
              *_teacher_line(search.get("teacher_batches")),
              f"- search time {search['seconds']:.1f}s, total {report['total_seconds']:.1f}s"
              + (" — **time budget exhausted**" if search["budget_exhausted"] else "")]
    if search.get("moves") is not None:
        lines += _marginal_lines(search)
    else:
        for s in search.get("stages", []):
            lines.append(f"- {s['stage']}: chose {s['level'] if s['level'] is not None else 'none'} "
                         f"(screened boundary {s['screened']}, recoverable bound {s['recoverable']}, "
                         f"margin {s['margin']:.3f}; {s['measured']} deciding measurements)")
    recovery = search.get("final_recovery")
    if recovery:
        lines.append(f"- final recovery ({recovery['epochs']:g} epochs): val {recovery['val_before']:.4f} -> "
                     + (f"{recovery['val_after']:.4f}, kept" if recovery["kept"] else
                        f"not kept ({recovery['reason']})"))
    if search.get("l1"):
        l1 = search["l1"]
        lines.append(f"- sparsity training (L1 {l1['strength']:g}, {l1['epochs']:g} epochs): slim boundary "
                     f"{l1['boundary_without']} without vs {l1['boundary_with']} with; "
                     f"{'paid off, used' if l1['paid_off'] else 'did not pay off, not used'}")
    orders = search.get("orders") or []
    if orders:
        best = min(orders, key=lambda o: o["size_bytes"])
        lines.append(f"- order chosen: {' → '.join(search['order'])}, because on the screen-only proxy (each stage "
                     f"as far as its screen meets the target, no training) it ended smallest, "
                     f"{_kib(best['size_bytes'])} of {len(orders)} orders tried:")
    elif search.get("kind") != "grid":
        lines.append(f"- order: {' → '.join(search['order'])}, as given (--order; --explore-order compares them all)")
    for o in orders:
        lines.append(f"  - {' → '.join(o['order'])}: {_kib(o['size_bytes'])}")
    lines += ["", "![size against accuracy](pareto.png)", ""]
    return "\n".join(lines)


_PHASES = {"alone": "each technique alone (screened boundary)", "together": "all together at a common share",
           "trade": "one stage further, best bytes per point first", "swap": "one stage backed off, another further",
           "settle": "a smaller screened answer verified"}


def _marginal_lines(search: dict[str, Any]) -> list[str]:
    """The marginal search's trail: what each phase tried and what it accepted."""
    lines = []
    for s in search.get("stages", []):
        lines.append(f"- {s['stage']}: alone up to {s['screened'] if s['screened'] is not None else 'nothing'} "
                     f"on the screen; chose {s['level'] if s['level'] is not None else 'off'}")
    lines += ["", "| phase | move | setting | val (estimate if screened) | KiB | measured | accepted | "
                  "bytes per point |", "| --- | --- | --- | ---: | ---: | --- | --- | ---: |"]
    seen, repeats = set(), 0
    for m in search["moves"]:
        if m["phase"] == "alone" and not m["verified"]:
            continue  # the bisection's screens: summed up by the stage lines above
        acc = f"{m['accuracy']:.4f}" if m["accuracy"] is not None else "failed"
        rate = f"{m['rate']:,.0f}" if m.get("rate") is not None else ""
        # the search asks again after every accepted move; what it knew, it does not measure again
        result = (tuple(m["setting"]), m["verified"], m["accuracy"], m["bytes"])
        again = " (again)" if result in seen else ""
        repeats += bool(again)
        seen.add(result)
        lines.append(f"| {m['phase']} | {m['kind']} | {m.get('levels', m['setting'])} | {acc} | {m['bytes'] / 1024:.1f} | "
                     f"{'yes' if m['verified'] else 'screen'}{again} | {'yes' if m['accepted'] else ''} | {rate} |")
    lines += [""] + [f"- {phase}: {what}" for phase, what in _PHASES.items()
                     if any(m["phase"] == phase for m in search["moves"])]
    if repeats:
        lines.append(f"- (again): {repeats} rows repeat an earlier row's result from the search's memory; "
                     "they took no time")
    if search.get("kept_on_screen"):
        lines.append("- the budget ran out before any setting was verified; the smallest screened answer was "
                     "verified after it")
    return lines


def plot_budget(report: dict[str, Any], path: Path) -> Path:
    """``model.ppz``'s bytes as one stacked bar, a segment per part of the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = report["chosen"]
    parts = {k: v for k, v in chosen["parts"].items() if v > 0}
    fig, ax = plt.subplots(figsize=(7, 2.0), dpi=120)
    left = 0
    colors = plt.get_cmap("tab10").colors
    for (name, n), color in zip(parts.items(), colors):
        ax.barh(0, n / 1024, left=left / 1024, color=color, label=f"{name} ({n / chosen['file_bytes']:.0%})")
        left += n
    ax.set_yticks([])
    ax.set_xlim(0, chosen["file_bytes"] / 1024)
    ax.set_xlabel("KiB", fontsize=7, labelpad=1)
    ax.tick_params(labelsize=7)
    ax.set_title(f"model.ppz: {chosen['file_bytes']:,} bytes", fontsize=9)
    ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.9), frameon=False)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.82, bottom=0.55)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"), force=True)
    finally:
        plt.close(fig)


def _val(candidate: dict[str, Any]) -> float:
    """Val accuracy, or for a screen its paired estimate (what the search judged)."""
    return candidate.get("extra", {}).get("estimate", candidate["accuracy"])


def pareto_front(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates no other beats on both size and accuracy, smallest first
    (ties in size keep the more accurate one)."""
    front: list[dict[str, Any]] = []
    for c in sorted(candidates, key=lambda c: (c["size_bytes"], -c["accuracy"])):
        if not front or c["accuracy"] > front[-1]["accuracy"]:
            front.append(c)
    return front


def _short(pipeline: str) -> str:
    """A pipeline's settings without pass option names, for a plot label."""
    return re.sub(r"\w+=", "", pipeline or "")


def plot_pareto(report: dict[str, Any], path: Path) -> Path:
    """Every candidate, size against val accuracy, with the target line and the
    chosen model marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ok = [c for c in report["candidates"] if c["status"] == "ok" and c["accuracy"] is not None and c["size_bytes"]]
    steps = report["settings"].get("screen_steps", 0)
    how = f"{steps} fine-tuning steps" if steps else "no training"
    styles = {"screen": ("o", "none", "tab:gray", f"screened (val estimate from a subset, {how})"),
              "val": ("s", "tab:blue", "tab:blue", "validated (no training)"),
              "finetune": ("D", "tab:blue", "tab:blue", "fine-tuned"),
              }
    for phase, (marker, face, edge, label) in styles.items():
        pts = [c for c in ok if c["phase"] == phase and c["stage"] not in ("baseline",)]
        if pts:
            ax.scatter([c["size_bytes"] / 1024 for c in pts], [_val(c) for c in pts], marker=marker,
                       facecolors=face, edgecolors=edge, s=28, label=label, alpha=0.8)
    base, chosen = report["baseline"], report["chosen"]
    ax.scatter([base["ppz_bytes"] / 1024], [base["val_accuracy"]], marker="^", color="black", s=60,
               label="baseline (lossless .ppz)", zorder=3)
    ax.scatter([chosen["file_bytes"] / 1024], [chosen["val_accuracy"]], marker="*", color="tab:red", s=220,
               label=f"chosen ({chosen['compression']:.1f}x)", zorder=4)
    ax.axhline(report["target"]["accuracy"], color="tab:red", linestyle="--", linewidth=1,
               label=f"target {report['target']['accuracy']:.4f}")
    front = pareto_front([c for c in ok if c["phase"] != "screen"])
    if front:
        ax.step([c["size_bytes"] / 1024 for c in front], [c["accuracy"] for c in front], where="post",
                color="tab:blue", linewidth=1, alpha=0.6, label="front of the measured candidates")
        for c in front:
            ax.annotate(_short(c["pipeline"]), (c["size_bytes"] / 1024, c["accuracy"]), fontsize=5,
                        xytext=(3, 3), textcoords="offset points", color="tab:blue")
    ax.annotate(_short(chosen["pipeline"]) or "baseline", (chosen["file_bytes"] / 1024, chosen["val_accuracy"]),
                fontsize=6, xytext=(4, -9), textcoords="offset points", color="tab:red")
    ax.set_xscale("log")
    ax.set_xlabel("model file size (KiB, log scale)")
    ax.set_ylabel("val top-1")
    ax.set_title(f"{report['model']}: candidates of the {report['search']['kind']} search")
    accs = [_val(c) for c in ok] + [report["target"]["accuracy"]]
    ax.set_ylim(max(0.0, min(accs) - 0.02), min(1.0, max(accs) + 0.02))
    ax.grid(True, which="both", alpha=0.3)
    # outside the axes, so that it hides no point
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()

    def write(f) -> None:
        fig.savefig(f, format="png")

    try:
        return atomic_write(path, write, force=True)
    finally:
        plt.close(fig)
