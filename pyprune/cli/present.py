"""How the command line shows results: plain-text tables and summary lines. Kept
apart from parsing, so each command reads as: parse, call the API, present."""

from __future__ import annotations

from typing import Any

from ..text import format_table


def info_table(info: Any, all_nodes: bool) -> str:
    """``pyprune info``: one row per layer (every graph node with ``all_nodes``)."""
    shown = [r for r in info.layers if all_nodes or r.params or r.macs]
    rows = [(r.name, r.op, "x".join(map(str, r.output_shape[1:])) if r.output_shape else "-",
             f"{r.params:,}", f"{r.bytes:,}", f"{r.macs:,}") for r in shown]
    rows.append(("total", "", "", f"{info.total.params:,}", f"{info.total.bytes:,}", f"{info.total.macs:,}"))
    return "\n".join([
        f"{info.name}: {len(info.layers)} graph nodes, {len(shown)} shown",
        format_table(("layer", "op", "output", "params", "bytes", "MACs"), rows),
        f"{info.total.params / 1e6:.2f}M parameters, {info.total.bytes / 2**20:.2f} MiB, "
        f"{info.total.macs / 1e6:.1f}M MACs per image"])


def inspect_table(report: dict[str, Any], show_all: bool) -> str:
    """``pyprune inspect``: per tensor, how it is stored (1-D vectors only with
    ``show_all``); the totals; where the bytes are; each Huffman stream against its
    entropy."""
    rows = []
    for t in report["tensors"]:
        if not show_all and len(t["shape"]) <= 1:
            continue
        rows.append((t["name"], "x".join(map(str, t["shape"])), t["encoding"], f"{t['density']:.3f}",
                     t["code_bits"] if t["code_bits"] is not None else "-", t["gap_bits"] or "-",
                     f"{t['code_bytes']:,}", f"{t['gap_bytes']:,}", f"{t['bytes']:,}", f"{t['fp32_bytes']:,}",
                     f"{t['fp32_bytes'] / t['bytes']:.1f}x" if t["bytes"] else "-"))
    total = report["total"]
    rows.append(("total", "", "", f"{total['density']:.3f}", "", "", f"{total['code_bytes']:,}",
                 f"{total['gap_bytes']:,}", f"{total['bytes']:,}", f"{total['fp32_bytes']:,}",
                 f"{total['fp32_bytes'] / max(total['bytes'], 1):.1f}x"))
    lines = [format_table(("tensor", "shape", "encoding", "density", "code bits", "gap bits", "code bytes",
                           "gap bytes", "bytes", "fp32 bytes", "ratio"), rows)]
    hidden = sum(len(t["shape"]) <= 1 for t in report["tensors"])
    if hidden and not show_all:
        lines.append(f"({hidden} 1-D tensors (BatchNorm vectors, biases, counters) not listed: --all lists them)")
    lines.append(f"file {total['file_bytes']:,} bytes, container version {total['version']}")
    lines.append(compression_line(total))
    lines.append(budget_table(total["parts"], total["file_bytes"]))
    for stream in ("codes", "gaps"):
        bits, entropy = total[f"{stream}_payload_bits"], total[f"{stream}_entropy_bits"]
        symbols = sum(t[stream]["symbols"] for t in report["tensors"] if t[stream])
        if symbols:
            lines.append(f"{stream} stream: Huffman {bits / 8:,.0f} bytes ({bits / symbols:.3f} bits/symbol) vs "
                         f"entropy {entropy / 8:,.0f} bytes ({entropy / symbols:.3f} bits/symbol) over "
                         f"{symbols:,} symbols")
    return "\n".join(lines)


def compression_line(total: dict[str, Any]) -> str:
    """Each ratio with what it is against: fp32 bytes (float tensors at 4 bytes, the
    rest at their own size) over the file's bytes."""
    own = (f"{total['compression']:.2f}x against this file's own tensors as float32 "
           f"({total['fp32_bytes']:,} bytes)")
    if "compression_vs_original" not in total:
        return f"compression {own}"
    return (f"compression {total['compression_vs_original']:.2f}x against the original model as float32 "
            f"({total['original_fp32_bytes']:,} bytes, recorded when the file was written); {own}")


def budget_table(parts: dict[str, int], file_bytes: int) -> str:
    """Where the bytes are: one row per part of the file, with its share."""
    rows = [(name, f"{n:,}", f"{n / max(file_bytes, 1):.1%}") for name, n in parts.items()]
    rows.append(("file", f"{file_bytes:,}", "100.0%"))
    return format_table(("part", "bytes", "share"), rows, left=1)


def _default(value: Any) -> str:
    return "-" if value is None else str(value)


def passes_table(passes: list[dict[str, Any]]) -> str:
    """``pyprune passes``: per pass, a line of what it does and what it declares, then
    a table of its options."""
    blocks = []
    for p in passes:
        knob = p["knob"]
        facts = ["changes outputs" if p["changes_outputs"] else "keeps outputs"]
        if p["constrains_training"]:
            facts.append(f"fine-tuning keeps it: {p['training_constraint'] or 'yes'}")
        if p["shares_weights"]:
            facts.append("stores codebooks")
        lines = [f"{p['name']}: {p['summary']}", "  " + "; ".join(facts)]
        if knob:
            ladder = ",".join(map(str, knob["ladder"]))
            flag = f"; --levels {p['name']}=..." + (f" or {knob['flag']}" if knob["flag"] else "")
            lines.append(f"  compile stage: turns {knob['option']} ({knob['more_aggressive']} is more aggressive), "
                         f"ladder {ladder}{flag}")
        rows = [(o["name"], o["allowed"], _default(o["default"]), o["help"]) for o in p["options"]]
        if rows:
            lines += ["  " + line for line in format_table(("option", "values", "default", "meaning"),
                                                           rows, left=4).splitlines()]
        width = max((len(e["pipeline"]) for e in p["examples"]), default=0)
        lines += [f"  e.g. {e['pipeline']:<{width}}  {e['does']}" for e in p["examples"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def pipeline_help(passes: list[dict[str, Any]]) -> str:
    """The part of ``pyprune opt --help`` that lists the passes, from the registry."""
    lines = ["Pipelines (--passes), in the style of LLVM's opt -passes=: comma-separated name(key=value,...).",
             "`pyprune passes` lists every pass with its options, defaults and search ladder."]
    for p in passes:
        lines.append("")
        for e in p["examples"]:
            # a long example gets its description on the next line
            lines += [f"  {e['pipeline']:<36s}{e['does']}"] if len(e["pipeline"]) < 36 else \
                [f"  {e['pipeline']}", f"  {'':36s}{e['does']}"]
        lines.append(f"Options of {p['name']}: " + ", ".join(
            o["name"] + (f" ({'|'.join(map(str, o['choices']))})" if o["choices"] else "") for o in p["options"]))
    kept = [f"{p['name']}: {p['training_constraint']}" for p in passes if p["constrains_training"]]
    if kept:
        lines += ["", "Fine-tuning after a pass keeps the constraints of every earlier pass that has one ("
                  + "; ".join(kept) + ")."]
    return "\n".join(lines)


def history_line(model: Any) -> str | None:
    """What a saved model had been through, for a command that compresses it again."""
    if not model.history:
        return None
    text = f"{model.name} was compressed before: {'; '.join(model.history)}. This run starts from it"
    if any(step.startswith("BatchNorm folded") for step in model.history):
        text += (" (its BatchNorm is folded, so slim has no gammas to rank: compile --keep-batchnorm keeps them for "
                 "a later run)")
    return text + "."
