"""End-to-end inference speed of a compiled ResNet-56 against the dense original.

Models, all in eval mode under ``torch.inference_mode`` on ``--threads`` threads:

* original: the uncompressed pretrained ResNet-56 (``load_model(arch="resnet56",
  pretrained=True)``), the reference every speedup is relative to;
* compiled (as loaded): the ``.ppz`` as ``pyprune eval`` runs it, without the runtime;
* runtime dense / sparse / auto: the ``.ppz`` through :func:`pyprune.runtime.load_runtime`
  (BatchNorm folded, ReLUs fused; auto measures its per-layer choice at the batch
  size of the row, without the cache; from 8 images on, runs of sparse convolutions
  keep their activations in the lanes layout). Quantized sparse weights stay in memory
  as codes (code and gap bits per non-zero); "runtime auto, fp32 CSR" holds them as fp32 CSR instead, the
  baseline of the codes' speed and memory. A runtime model runs as one native program
  (``pyprune/runtime/program.py``) where every node of its graph lowers (at batch 1;
  the lanes layout's layers, from 8 images on, do not), else node by node on its
  torch.fx graph; "runtime auto, fx graph" is forced onto the graph, the program's
  baseline.

After the timings it prints the bytes every model holds in memory (all tensors of its
state, weights and biases) beside the .ppz's tensor sections, and with
``--check-predictions DIR`` it writes the top-1 class of every test image as the
compiled model predicts it as loaded and through runtime auto at each batch size,
then compares the files with ``cmp``.

For each batch size (latency at 1, throughput at 64) every model runs on the same
random input; within each repeat the models take turns, so load from other
processes hits them alike; the table gives medians. The MAC ratios are the limits
a kernel could reach: slimming removes whole channels (dense MACs), masking makes
the remaining weights sparse (non-zero MACs).

    python bench/end_to_end.py [--ppz runs/resnet56-final/model.ppz] [--threads 2] [--check-predictions DIR]

Without the .ppz it builds a stand-in: the pretrained ResNet-56 after
slim(ratio=0.35),mask(sparsity=0.7),quant(bits=4) with no fine-tuning, and says so.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from pyprune.api import LoadedModel, evaluate_model, inspect_file, load_model, save_model, trace_model
from pyprune.ir import layer_stats
from pyprune.passes import build_pipeline
from pyprune.passes.quant import codebooks
from pyprune.runtime import backend, load_runtime
from pyprune.runtime.measure import time_modules

DEFAULT_PPZ = Path("runs/resnet56-final/model.ppz")
STAND_IN = "slim(ratio=0.35),mask(sparsity=0.7),quant(bits=4)"


def stand_in(folder: Path) -> Path:
    """The pretrained ResNet-56 compressed by :data:`STAND_IN` without fine-tuning."""
    model = load_model(arch="resnet56", pretrained=True)
    gm = trace_model(model)
    books = {}
    for p in build_pipeline(STAND_IN):
        result = p(gm)
        gm = result.graph_module
        if p.name == "quant":
            books = codebooks(gm, result.record)
    return save_model(model, folder / "resnet56-stand-in.ppz", gm=gm, codebooks=books)


def compiled_or_stand_in(ppz: Path, folder: Path) -> tuple[Path, str]:
    """``ppz`` when it exists, else the stand-in written into ``folder``; and a line
    saying which, for the benchmark's output."""
    if ppz.is_file():
        return ppz, f"compiled model: {ppz}"
    return stand_in(folder), (f"{ppz} not found: STAND-IN model, pretrained resnet56 + {STAND_IN} WITHOUT "
                              "fine-tuning (its accuracy is not a compile result; its speed is representative)")


def macs(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, float]:
    """(dense MACs, non-zero MACs) per image: each layer's MACs times its weight density."""
    gm = trace_model(LoadedModel(module, "model", input_shape=input_shape))
    dense = nonzero = 0.0
    for row in layer_stats(gm):
        if row.macs:
            weight = gm.get_submodule(row.name).weight
            dense += row.macs
            nonzero += row.macs * (weight != 0).float().mean().item()
    return int(dense), nonzero


def held_bytes(module: nn.Module) -> int:
    """Bytes of every tensor a model holds (parameters and buffers, shared ones once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def check_predictions(path: Path, batches: list[int], folder: Path) -> None:
    """The compiled model's test predictions as loaded and through runtime auto at each
    batch size (at 1 it runs as one native program, from 8 on in the lanes layout),
    written to files and compared with cmp."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    runs = [("as-loaded", load_model(str(path)), 256)] + [
        (f"runtime-auto-b{batch}", load_runtime(path, runtime="auto", batch_size=batch, use_cache=False), batch)
        for batch in batches]
    for name, model, batch in runs:
        result = evaluate_model(model, "cifar10", "test", batch_size=batch, progress=False)
        files[name] = folder / f"{name}.txt"
        files[name].write_text("".join(f"{c}\n" for c in result.predictions.tolist()))
        executor = f", run as {model.module.plan.executor}" if hasattr(model.module, "plan") else ""
        print(f"{name}: top-1 {result.accuracy:.4f} on {result.n} test images{executor} -> {files[name]}")
    loaded = files.pop("as-loaded")
    for other in files.values():
        same = subprocess.run(["cmp", str(loaded), str(other)]).returncode == 0
        print(f"cmp {loaded} {other}: {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ppz", type=Path, default=DEFAULT_PPZ, help="compiled ResNet-56 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per model (default: 50 at batch 1, "
                                                          "scaled down for larger batches, at least 10)")
    p.add_argument("--auto-repeats", type=int, default=5, help="per-layer timings of --runtime auto")
    p.add_argument("--check-predictions", type=Path, metavar="DIR",
                   help="write and cmp the test predictions as loaded and through runtime auto (needs the data)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path, note = compiled_or_stand_in(args.ppz, Path(tmp))
        original = load_model(arch="resnet56", pretrained=True).module.eval()
        compiled = load_model(str(path))
        input_shape = compiled.input_shape
        print(note)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sparse kernels: {backend()}")

        base_macs, _ = macs(original, input_shape)
        dense_macs, nonzero_macs = macs(compiled.module, input_shape)
        rows = []
        batches = [int(b) for b in args.batches.split(",")]
        for batch in batches:
            models: dict[str, nn.Module] = {"original (dense, uncompressed)": original,
                                            "compiled, as loaded": compiled.module.eval()}
            plans = {}
            for runtime, codes, program in (("dense", True, True), ("sparse", True, True), ("auto", True, False),
                                            ("auto", True, True), ("auto", False, True)):
                rt = load_runtime(path, runtime=runtime, batch_size=batch, repeats=args.auto_repeats,
                                  use_cache=False, codes=codes, program=program).module
                name = f"compiled, runtime {runtime}" + ("" if codes else ", fp32 CSR") + \
                    ("" if program else ", fx graph")
                models[name] = rt
                plans[name] = rt.plan
            x = torch.randn(batch, *input_shape)
            with torch.inference_mode():
                ref = models["compiled, as loaded"](x)
                diffs = {name: (m(x) - ref).abs().max().item() for name, m in models.items() if "runtime" in name}
            repeats = args.repeats or max(10, 50 // batch)
            ms = time_modules(list(models.values()), x, repeats=repeats, warmup=3)
            base = ms[0]
            for (name, _), t in zip(models.items(), ms):
                rows.append((name, batch, t, batch / t * 1e3, base / t))
            auto = plans["compiled, runtime auto"]
            n_sparse = sum(layer.choice != "dense" for layer in auto.layers)
            n_lanes = sum(layer.choice == "lanes" for layer in auto.layers)
            print(f"batch {batch}: {repeats} repeats; auto chose sparse for {n_sparse}/{len(auto.layers)} layers "
                  f"({n_lanes} in lanes, {auto.lanes_conversions} conversions), run as {auto.executor}; "
                  "max |runtime - as loaded| "
                  + ", ".join(f"{k.removeprefix('compiled, ')} {v:.1e}" for k, v in diffs.items()))
            memory = {name: held_bytes(m) for name, m in models.items()}

        print()
        print("| model | batch | ms/batch | images/s | speedup vs original |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, batch, t, ips, speedup in rows:
            print(f"| {name} | {batch} | {t:.2f} | {ips:,.0f} | {speedup:.2f}x |")
        print()
        print(f"MACs per image: original {base_macs / 1e6:.1f}M; compiled {dense_macs / 1e6:.1f}M dense "
              f"({base_macs / dense_macs:.2f}x fewer: the limit for dense kernels), {nonzero_macs / 1e6:.1f}M "
              f"non-zero ({base_macs / nonzero_macs:.2f}x fewer: the limit for sparse kernels)")
        sections = sum(t["bytes"] for t in inspect_file(path)["tensors"])
        print()
        print(f"Bytes held in memory at batch {batches[-1]} (every tensor of the model's state), against the .ppz's "
              f"{sections:,} bytes of tensor sections:")
        print("| model | bytes | vs .ppz sections |")
        print("| --- | ---: | ---: |")
        for name, held in memory.items():
            print(f"| {name} | {held:,} | {held / sections:.2f}x |")
        if args.check_predictions:
            print()
            check_predictions(path, batches, args.check_predictions)


if __name__ == "__main__":
    main()
