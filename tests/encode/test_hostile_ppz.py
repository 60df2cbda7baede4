"""Hostile .ppz model files (issue 19, defect 1): a file whose table declares tensors
its graph does not hold, or more decoded bytes than its size allows, is refused before
anything is allocated, and reading it costs no more memory than the honest file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pyprune import api
from pyprune.encode import GraphFormatError, graph_json, ppz
from pyprune.encode.model_ppz import inspect_model, load_ppz

# fc.weight declared (1, 20M): 80 MB of float32 zeros, which CSR codes in ~320 KB
BOMB_SHAPE = (1, 20_000_000)


class ZeroHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3)
        self.fc = nn.Linear(64, 1, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture()
def honest(tmp_path: Path) -> Path:
    return api.save_model(api.LoadedModel(ZeroHead(), "zerohead", input_shape=(3, 8, 8)), tmp_path / "honest.ppz")


def swap_tensor(honest: Path, out: Path, name: str, tensor: torch.Tensor) -> Path:
    """``honest`` with one tensor replaced, its graph (manifest) kept: a well-formed
    container whose table no longer fits the model it describes."""
    manifest, tensors = ppz.unpack(honest)
    manifest.pop("tensors")  # the table pack writes
    ppz.pack(out, manifest, {**tensors, name: tensor})
    return out


@pytest.fixture()
def bomb(honest: Path, tmp_path: Path) -> Path:
    return swap_tensor(honest, tmp_path / "bomb.ppz", "fc.weight", torch.zeros(BOMB_SHAPE))


def test_the_bomb_is_well_formed_and_declares_far_more_than_its_size(bomb: Path) -> None:
    _, rows, decoded = ppz.table_bytes(bomb.read_bytes())
    assert dict((r.name, r.shape) for r in rows)["fc.weight"] == BOMB_SHAPE
    assert decoded > 200 * bomb.stat().st_size


@pytest.mark.parametrize("read", [load_ppz, inspect_model], ids=["load", "inspect"])
def test_a_table_that_does_not_fit_the_graph_is_refused_before_decoding(bomb: Path, monkeypatch, read) -> None:
    def decoded(*args, **kwargs):
        pytest.fail("decoded a file whose table fits no graph")
    monkeypatch.setattr(ppz, "unpack_bytes", decoded)
    monkeypatch.setattr(ppz, "inspect_bytes", decoded)
    with pytest.raises(GraphFormatError,
                       match=r"bomb\.ppz: .*mis-shaped .*fc\.weight: file \(1, 20000000\) vs graph \(1, 64\)"):
        read(bomb)


def test_a_file_that_decodes_past_the_bound_is_refused_with_both_sizes(bomb: Path, honest: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(ppz, "MIN_DECODED_CAP", 1 << 20)  # as for a bigger file: the ratio decides
    monkeypatch.setattr(ppz, "DECODED_PER_FILE_BYTE", 64)
    for read in (load_ppz, inspect_model):
        with pytest.raises(ppz.DecodedSizeError, match=r"decode to 80,0\d\d,\d{3} bytes, more than the [\d,]+ allowed "
                                                       r"for a [\d,]+-byte file \(--max-decoded-mb raises the bound\)"):
            read(bomb)
    # an honest file under a bound set too low is refused the same way, and loads under its own
    with pytest.raises(ppz.DecodedSizeError):
        load_ppz(honest, max_bytes=64)
    gm, _ = load_ppz(honest, max_bytes=1 << 20)
    assert torch.equal(gm.fc.weight, torch.zeros(1, 64))


PEAK = textwrap.dedent("""
    import resource, sys
    from pyprune.cli import main
    code = main(sys.argv[1:])
    print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def _peak_kib(*argv: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=True).stdout
    code, peak = out.split()[-2:]
    return int(code), int(peak)


@pytest.mark.parametrize("command", ["info", "inspect"])
def test_reading_the_bomb_costs_no_more_memory_than_the_honest_file(honest: Path, bomb: Path, command: str) -> None:
    code, honest_peak = _peak_kib(command, str(honest))
    assert code == 0
    code, bomb_peak = _peak_kib(command, str(bomb))
    assert code == 2 and bomb_peak < 1.1 * honest_peak, (bomb_peak, honest_peak)


# --- model files that lie about their tensors or their meta (defect 5) ------------------

def _resave(honest: Path, out: Path, meta_update: dict | None = None, tensors_update: dict | None = None,
            graph_update=None) -> Path:
    manifest, tensors = ppz.unpack(honest)
    manifest.pop("tensors")
    manifest["meta"].update(meta_update or {})
    manifest["meta"] = {k: v for k, v in manifest["meta"].items() if v is not None}  # None: drop the key
    if graph_update:
        graph_update(manifest["graph"])
    ppz.pack(out, manifest, {**tensors, **(tensors_update or {})})
    return out


def test_a_float_tensor_relabelled_int32_is_refused_naming_it(honest: Path, tmp_path: Path) -> None:
    _, tensors = ppz.unpack(honest)
    relabelled = tensors["conv.weight"].view(torch.int32)  # the same bytes, another dtype
    bad = _resave(honest, tmp_path / "bad.ppz", tensors_update={"conv.weight": relabelled})
    with pytest.raises(GraphFormatError, match=r"wrong dtype \(1\): conv\.weight: file int32 vs graph float32"):
        load_ppz(bad)


@pytest.mark.parametrize("meta,problem", [
    ({"mean": 5}, "meta.mean is 5, not 3 finite numbers"),
    ({"mean": [0.5] * 7}, "meta.mean is .*not 3 finite numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "meta.std is .*every value must be positive"),
    ({"std": [0.2, "x", 0.2]}, "meta.std is .*not 3 finite numbers"),
    ({"input_shape": [3, 20000, 20000]}, "meta.input_shape .* is 1,200,000,000 values per image"),
    ({"input_shape": [3, -8, 8]}, "meta.input_shape is .*not \\(channels, height, width\\) of positive integers"),
    ({"arch": ["x"]}, "meta.arch is"),
])
def test_a_meta_no_model_could_have_is_refused(honest: Path, tmp_path: Path, meta: dict, problem: str) -> None:
    bad = _resave(honest, tmp_path / "bad.ppz", meta_update=meta)
    with pytest.raises(GraphFormatError, match=f"bad\\.ppz: {problem}"):
        api.load_model(str(bad))


def test_arguments_nested_hundreds_deep_are_refused(honest: Path, tmp_path: Path) -> None:
    def nest(graph: dict) -> None:
        value: object = 1
        for _ in range(800):
            value = {"tuple": [value]}
        node = next(n for n in graph["nodes"] if n["op"] in ("call_function", "call_method"))
        node["kwargs"] = {"deep": value}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # for the writer; the reader runs under the usual limit
    try:
        bad = _resave(honest, tmp_path / "bad.ppz", graph_update=nest)
    finally:
        sys.setrecursionlimit(limit)
    # the manifest's JSON parser or the graph decoder refuses it, whichever meets the depth first
    with pytest.raises((GraphFormatError, ppz.CorruptFileError), match="nests its values deeper|RecursionError"):
        load_ppz(bad)


@pytest.mark.parametrize("name", ["self", "__class__", "__dict__"])
def test_node_names_the_generated_code_reserves_are_refused(honest: Path, tmp_path: Path, name: str) -> None:
    def rename(graph: dict) -> None:
        old = graph["nodes"][0]["name"]
        graph["nodes"][0]["name"] = graph["nodes"][0]["target"] = name
        for node in graph["nodes"][1:]:
            node["args"] = [{"node": name} if a == {"node": old} else a for a in node["args"]]
    bad = _resave(honest, tmp_path / "bad.ppz", graph_update=rename)
    with pytest.raises(GraphFormatError, match=f"node name '{name}' is reserved"):
        load_ppz(bad)


@pytest.mark.parametrize("device", ["meta", "cuda:7", {"device": "meta"}])
def test_a_device_the_machine_lacks_is_refused(honest: Path, tmp_path: Path, device) -> None:
    def move(graph: dict) -> None:
        nodes = graph["nodes"]
        x = nodes[0]["name"]
        nodes.insert(1, {"name": "moved", "op": "call_method", "target": "to", "args": [{"node": x}, device],
                         "kwargs": {}})
        for node in nodes[2:]:
            node["args"] = [{"node": "moved"} if a == {"node": x} else a for a in node["args"]]
    bad = _resave(honest, tmp_path / "bad.ppz", graph_update=move)
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(GraphFormatError, match="is not one this machine has"):
        load_ppz(bad)


def expanding(first: list[dict]):
    """A graph edit: the input goes through ``first`` (nodes that take ``{"node": "IN"}``
    and end in one named ``"last"``), then unsqueeze -> expand(100000, ...) -> reshape,
    whose result takes the input's place."""
    def edit(graph: dict) -> None:
        nodes = graph["nodes"]
        x = nodes[0]["name"]
        chain = json.loads(json.dumps(first).replace('"IN"', json.dumps(x)))
        nodes[1:1] = chain + [
            {"name": "wide", "op": "call_method", "target": "unsqueeze", "args": [{"node": "last"} if chain else {"node": x}, 0],
             "kwargs": {}},
            {"name": "huge", "op": "call_method", "target": "expand", "args": [{"node": "wide"}, 100000, -1, -1, -1, -1],
             "kwargs": {}},
            {"name": "flat", "op": "call_method", "target": "reshape", "args": [{"node": "huge"}, -1, 3, 8, 8],
             "kwargs": {}},
        ]
        for node in nodes[4 + len(chain):]:
            node["args"] = [{"node": "flat"} if a == {"node": x} else a for a in node["args"]]
    return edit


EXPANDED = r"node 'huge' makes a \(100000, 1, 3, 8, 8\) activation for one image"


def test_a_graph_that_expands_an_activation_past_the_bound_is_refused_before_it_runs(honest: Path,
                                                                                   tmp_path: Path) -> None:
    """unsqueeze -> expand(100000, ...) asked eval for 12 GB and info for 1.6 GB."""
    bad = _resave(honest, tmp_path / "bad.ppz", graph_update=expanding([]))
    with pytest.raises(GraphFormatError, match=EXPANDED):
        load_ppz(bad)
    code, peak = _peak_kib("info", str(bad))
    assert code == 2 and peak < 1.1 * _peak_kib("info", str(honest))[1]


def meta_strict(x: torch.Tensor) -> torch.Tensor:
    """The identity, except on the meta device, where it fails as an op whose meta kernel
    is missing (or stricter than the CPU's) does."""
    if x.is_meta:
        raise NotImplementedError("no meta kernel")
    return x


@pytest.fixture()
def allow_meta_strict():
    graph_json.allow_function("tests.meta_strict", meta_strict)
    yield
    graph_json.disallow_function("tests.meta_strict")


@pytest.mark.usefixtures("allow_meta_strict")
def test_a_node_that_fails_on_the_meta_device_does_not_end_the_activation_check(honest: Path,
                                                                                tmp_path: Path) -> None:
    """The check runs that node on zeros and goes on: the expansion after it is refused
    before anything is decoded (inspect decodes nothing and runs nothing for real)."""
    strict = [{"name": "last", "op": "call_function", "target": "tests.meta_strict", "args": [{"node": "IN"}],
               "kwargs": {}}]
    bad = _resave(honest, tmp_path / "bad.ppz", graph_update=expanding(strict))
    with pytest.raises(GraphFormatError, match=EXPANDED):
        inspect_model(bad)
    with pytest.raises(GraphFormatError, match=EXPANDED):
        load_ppz(bad)
    def through_strict(graph: dict) -> None:
        x = graph["nodes"][0]["name"]
        for node in graph["nodes"][1:]:
            node["args"] = [{"node": "last"} if a == {"node": x} else a for a in node["args"]]
        graph["nodes"].insert(1, json.loads(json.dumps(strict).replace('"IN"', json.dumps(x)))[0])
    ok = _resave(honest, tmp_path / "ok.ppz", graph_update=through_strict)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(load_ppz(ok)[0](x), load_ppz(honest)[0](x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.complex64, torch.bool])
def test_a_state_tensor_of_another_dtype_is_refused_naming_it(honest: Path, tmp_path: Path, dtype) -> None:
    _, tensors = ppz.unpack(honest)
    bad = _resave(honest, tmp_path / "bad.ppz", tensors_update={"conv.weight": tensors["conv.weight"].to(dtype)})
    with pytest.raises(GraphFormatError, match=r"bad\.ppz: .*wrong dtype \(1\): conv\.weight: file \w+ vs graph float32"):
        load_ppz(bad)


def test_a_model_that_fails_on_its_own_input_is_refused_naming_the_node(honest: Path, tmp_path: Path) -> None:
    """A bfloat16 bias beside a float32 weight passes every table check (bfloat16 is a
    storage dtype for float32 vectors); only running the layer shows it cannot work."""
    _, tensors = ppz.unpack(honest)
    bad = _resave(honest, tmp_path / "bad.ppz", tensors_update={"conv.bias": tensors["conv.bias"].bfloat16()})
    with pytest.raises(GraphFormatError) as info:
        load_ppz(bad)
    message = str(info.value)
    assert re.fullmatch(r"\S*bad\.ppz: node 'conv' \(call_module conv\) fails on one \(1, 3, 8, 8\) input: "
                        r"RuntimeError: .*BFloat16.*", message), message
    assert "\n" not in message  # fx's "While executing ..." is not appended


def test_a_node_argument_that_is_not_a_name_is_refused(honest: Path, tmp_path: Path) -> None:
    def unhashable(graph: dict) -> None:
        graph["nodes"][1]["args"] = [{"node": ["x"]}]
    bad = _resave(honest, tmp_path / "bad.ppz", graph_update=unhashable)
    with pytest.raises(GraphFormatError, match=r"refers to node \['x'\], which is not defined before it"):
        load_ppz(bad)


@pytest.mark.parametrize("read", [load_ppz, inspect_model], ids=["load", "inspect"])
def test_a_corrupt_container_is_refused_naming_the_file_and_the_part(honest: Path, tmp_path: Path, read) -> None:
    data = bytearray(honest.read_bytes())
    data[-3] ^= 0xFF  # in the last section's body: its CRC no longer matches
    bad = tmp_path / "bad.ppz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ppz.CorruptFileError, match=r"^\S*bad\.ppz: section \d+ \('[\w.]+'\): CRC32 mismatch"):
        read(bad)


@pytest.mark.parametrize("meta", [{}, {"input_shape": None}], ids=["own input shape", "default input shape"])
def test_a_graph_whose_output_is_not_scores_is_refused(honest: Path, tmp_path: Path, meta: dict) -> None:
    """Also when the meta gives no input shape: the model is then run at the default
    one LoadedModel gives it (the fuzzer found the check skipped there)."""
    def constant_output(graph: dict) -> None:
        graph["nodes"][-1]["args"] = [7]
    bad = _resave(honest, tmp_path / "bad.ppz", meta_update=meta, graph_update=constant_output)
    with pytest.raises(GraphFormatError, match=r"bad\.ppz: the graph's output for one image is int 7, not a batch"):
        api.load_model(str(bad))


def test_eval_names_the_file_whose_input_shape_the_data_does_not_have(honest: Path, tmp_path: Path,
                                                                       data_root: Path, capsys) -> None:
    from pyprune.cli.app import main
    assert main(["eval", str(honest), "--data-root", str(data_root), "--limit", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pyprune eval: error: cifar10 images are 3x32x32 (C x H x W), but the model in {honest} "
                          "(meta.input_shape) takes 3x8x8") and "\n" not in err, err
