import builtins
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from pyprune.api import load_model, save_model
from pyprune.cli import main
from pyprune.ir import ChannelAffine
from pyprune.encode import (MODULE_TYPES, GraphFormatError, graph_from_json, graph_state_dict, graph_to_json,
                            is_graph_file, load_graph_module, module_config, save_graph_module)
from pyprune.ir import trace
from pyprune.models import available_models, build_model


def weird_op(x):
    return x * 2


fx.wrap("weird_op")  # keeps weird_op a call_function node outside the allowlist

TORCHVISION = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0"]


def signature(gm: fx.GraphModule) -> list[tuple[str, object]]:
    return [(n.op, n.target) for n in gm.graph.nodes]


def round_trip(gm: fx.GraphModule, path: Path, x: torch.Tensor) -> fx.GraphModule:
    gm.eval()
    save_graph_module(gm, path, meta={"arch": "test"})
    assert is_graph_file(path)
    loaded, meta = load_graph_module(path)
    assert meta == {"arch": "test"} and not loaded.training
    assert signature(loaded) == signature(gm)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    return loaded


@pytest.mark.parametrize("name", available_models())
def test_zoo_round_trip(tmp_path, name):
    torch.manual_seed(0)
    gm = trace(build_model(name))
    _randomize_bn(gm)
    round_trip(gm, tmp_path / "m.pgraph", torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_round_trip(tmp_path, name):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(getattr(torchvision.models, name)(num_classes=10))
    path = tmp_path / "m.pgraph"
    round_trip(gm, path, torch.randn(2, 3, 64, 64))
    path.unlink()  # vgg11_bn is 0.5 GB


def _randomize_bn(gm: nn.Module) -> None:
    # Fresh BN statistics are 0/1: random ones check that buffers really travel.
    for m in gm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


def test_hand_slimmed_resnet20(tmp_path):
    """What the slim pass does: narrower convs/BNs, and the option-A shortcut's
    F.pad amounts edited so that 11 channels pad up to 32."""
    torch.manual_seed(0)
    gm = trace(build_model("resnet20"))
    conv = lambda i, o, s=1: nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False)  # noqa: E731
    gm.conv1, gm.bn1 = conv(3, 11), nn.BatchNorm2d(11)
    for i, mid in enumerate((5, 7, 9)):
        block = gm.get_submodule(f"layer1.{i}")
        block.conv1, block.bn1, block.conv2, block.bn2 = conv(11, mid), nn.BatchNorm2d(mid), conv(mid, 11), \
            nn.BatchNorm2d(11)
    gm.get_submodule("layer2.0").conv1 = conv(11, 32, 2)
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    pads[0].args = (pads[0].args[0], (0, 0, 0, 0, 10, 11))
    gm.recompile()
    _randomize_bn(gm)
    x = torch.randn(2, 3, 32, 32)
    loaded = round_trip(gm, tmp_path / "slim.pgraph", x)
    assert loaded.conv1.out_channels == 11 and loaded.get_submodule("layer1.1.conv1").out_channels == 7
    assert loaded(x).shape == (2, 10)


class Odd(nn.Module):
    """Unusual widths, view with computed sizes, cat, a buffer and a parameter read
    by get_attr, slices with Ellipsis, inf, a dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.conv1d = nn.Conv1d(7, 5, 1)
        self.fc = nn.Linear(5 * 4 * 4 + 7, 3)
        self.act = nn.LeakyReLU(0.3)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 7).view(1, 7, 1, 1))
        self.register_buffer("shift", torch.randn(7), persistent=False)
        self.gain = nn.Parameter(torch.tensor(1.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x))) * self.scale + self.shift.view(1, -1, 1, 1)
        z = self.conv1d(y.flatten(2)).view(x.size(0), 5, 8, 8)[..., ::2, 1::2].reshape(x.shape[0], -1)
        pooled = F.adaptive_max_pool2d(y, 1).flatten(1)
        out = torch.cat([z, pooled], dim=1).to(torch.float32).clamp(max=float("inf"))
        return self.fc(out) * self.gain


def test_odd_module_round_trip(tmp_path):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Odd())
    doc = graph_to_json(gm)
    # fx folds self.shift.view(...) into a plain tensor attribute, _tensor_constant0.
    assert doc["attrs"] == {"scale": "buffer", "_tensor_constant0": "buffer", "gain": "parameter"}
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    loaded = round_trip(gm, tmp_path / "odd.pgraph", torch.randn(2, 3, 8, 8))
    assert isinstance(loaded.gain, nn.Parameter)


SAMPLES = {
    "Conv1d": nn.Conv1d(3, 5, 3, stride=2, bias=False), "Conv2d": nn.Conv2d(4, 6, (3, 1), groups=2, padding="same"),
    "ConvTranspose2d": nn.ConvTranspose2d(3, 5, 2, stride=2, output_padding=1, dilation=2),
    "BatchNorm1d": nn.BatchNorm1d(5, affine=False), "BatchNorm2d": nn.BatchNorm2d(5, momentum=None),
    "LayerNorm": nn.LayerNorm((4, 4), bias=False), "GroupNorm": nn.GroupNorm(2, 6), "Linear": nn.Linear(7, 3),
    "ReLU": nn.ReLU(inplace=True), "ReLU6": nn.ReLU6(), "LeakyReLU": nn.LeakyReLU(0.2), "PReLU": nn.PReLU(3),
    "ELU": nn.ELU(0.5), "SiLU": nn.SiLU(), "GELU": nn.GELU("tanh"), "Hardswish": nn.Hardswish(),
    "Hardsigmoid": nn.Hardsigmoid(), "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "Softmax": nn.Softmax(1),
    "Dropout": nn.Dropout(0.3), "Dropout2d": nn.Dropout2d(), "Identity": nn.Identity(), "Flatten": nn.Flatten(2),
    "MaxPool2d": nn.MaxPool2d(3, 2, 1, ceil_mode=True), "AvgPool2d": nn.AvgPool2d(2, count_include_pad=False),
    "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d((2, 3)), "AdaptiveMaxPool2d": nn.AdaptiveMaxPool2d(1),
    "ZeroPad2d": nn.ZeroPad2d((1, 0, 2, 0)), "Upsample": nn.Upsample(scale_factor=2.0, mode="nearest"),
    "ChannelAffine": ChannelAffine(5),
}


def test_every_allowlisted_module_type_rebuilds_from_its_config():
    assert set(SAMPLES) == set(MODULE_TYPES)
    for name, module in SAMPLES.items():
        gm = fx.GraphModule({"m": module}, _single_call("m"))
        doc = graph_to_json(gm)  # also checks the rebuilt module against the original
        assert doc["modules"]["m"]["type"] == name
        loaded = graph_from_json(json.loads(json.dumps(doc)), graph_state_dict(gm))
        assert repr(loaded.m) == repr(module)


def _single_call(target: str) -> fx.Graph:
    graph = fx.Graph()
    graph.output(graph.call_module(target, (graph.placeholder("x"),)))
    return graph


def test_config_keeps_tuples_and_flags():
    config = module_config(nn.Conv2d(3, 5, 3, bias=False), "conv")
    assert config["kernel_size"] == {"tuple": [3, 3]} and config["bias"] is False


def test_unknown_module_type_at_save_names_it():
    class Mystery(nn.Module):
        def forward(self, x):
            return x + 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = Mystery()

        def forward(self, x):
            return self.odd(x)

    gm = trace(Net(), leaf_modules=[Mystery])
    with pytest.raises(GraphFormatError, match=r"node 'odd' \(call_module odd\).*Mystery.*not in the allowlist"):
        graph_to_json(gm)


def test_subclass_of_allowlisted_type_is_refused():
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return x

    gm = fx.GraphModule({"m": MyReLU()}, _single_call("m"))
    with pytest.raises(GraphFormatError, match="MyReLU"):
        graph_to_json(gm)


def test_unknown_function_at_save_names_op_and_node(tmp_path):
    gm = fx.symbolic_trace(lambda x: weird_op(x) + 1)
    with pytest.raises(GraphFormatError, match=r"cannot serialize node 'weird_op' \(call_function .*weird_op\)"
                                               r": not in the allowlist"):
        save_graph_module(gm, tmp_path / "x.pgraph")
    assert not (tmp_path / "x.pgraph").exists() and not list(tmp_path.iterdir())


def test_unsupported_value_names_node_and_type():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, torch.ones(1))))
    with pytest.raises(GraphFormatError, match=r"node 'add' .*torch\.Tensor"):
        graph_to_json(fx.GraphModule({}, graph))


def test_encodes_distinct_value_kinds():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.flatten, (x,), {"start_dim": 1})
    n = graph.call_method("to", (y,), {"dtype": torch.float64, "memory_format": torch.preserve_format})
    s = graph.call_function(builtins.getattr, (n, "shape"))
    graph.output((n, [s, (1, 1.0, True, None)], {"a": slice(None, 3, None), "b": float("-inf"),
                                                  "c": float("nan"), "d": ..., "e": torch.device("cpu")}))
    gm = fx.GraphModule({}, graph)
    doc = json.loads(json.dumps(graph_to_json(gm), allow_nan=False))
    assert doc["nodes"][-1]["args"][0]["tuple"][1] == [{"node": "getattr_1"}, {"tuple": [1, 1.0, True, None]}]
    loaded = graph_from_json(doc, {})
    out, (shape, consts), extra = loaded(torch.ones(2, 3, 4))
    assert out.dtype == torch.float64 and shape == (2, 12) and consts == (1, 1.0, True, None)
    assert type(consts[1]) is float and type(consts[2]) is bool
    assert extra["a"] == slice(None, 3) and extra["b"] == float("-inf") and extra["c"] != extra["c"]
    assert extra["d"] is Ellipsis and extra["e"] == torch.device("cpu")


def test_getattr_only_for_safe_attributes():
    graph = fx.Graph()
    graph.output(graph.call_function(builtins.getattr, (graph.placeholder("x"), "__class__")))
    with pytest.raises(GraphFormatError, match="getattr is allowed only for"):
        graph_to_json(fx.GraphModule({}, graph))


def _saved_resnet20(tmp_path) -> tuple[Path, dict, dict]:
    torch.manual_seed(0)
    path = save_graph_module(trace(build_model("resnet20")), tmp_path / "r20.pgraph")
    obj = torch.load(path, weights_only=True)
    return path, obj, json.loads(obj["graph"])


def _node(doc: dict, target: str) -> dict:
    return next(n for n in doc["nodes"] if n["target"] == target)


def _tamper(path: Path, obj: dict, doc: dict) -> Path:
    torch.save({**obj, "graph": json.dumps(doc)}, path)
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: _node(d, "torch.flatten").update(target="os.system"), "function 'os.system' is not in the allowlist"),
    (lambda d: d["modules"]["conv1"].update(type="Evil"), "module type 'Evil' is not in the allowlist"),
    (lambda d: d["nodes"].insert(-1, {"name": "m", "op": "call_method", "target": "__call__", "args": [],
                                      "kwargs": {}}), "method '__call__' is not in the allowlist"),
    (lambda d: d["nodes"][0].update(target="x=__import__('os').system('true')"), "placeholder target"),
    (lambda d: d["modules"].update({'a")or(print("pwned': d["modules"].pop("conv1")}), "bad module name"),
    (lambda d: d["modules"]["conv1"]["config"].update(out_channels=10**12), r"mis-shaped.*conv1\.weight"),
    (lambda d: d["modules"]["conv1"]["config"].update(evil=1), "takes no argument"),
    (lambda d: d["nodes"][1]["args"].append({"pickle": "x"}), "unknown or malformed value tag 'pickle'"),
    (lambda d: d["nodes"].reverse(), "not defined before it"),
    (lambda d: d.update(version=2), "newer pyprune"),
    (lambda d: d["nodes"][1].update(kwargs={"a=1;b": 1}), "identifiers"),
])
def test_tampered_document_is_refused(tmp_path, edit, message):
    path, obj, doc = _saved_resnet20(tmp_path)
    edit(doc)
    with pytest.raises(GraphFormatError, match=message):
        load_graph_module(_tamper(path, obj, doc))


def test_state_dict_mismatch_lists_keys(tmp_path):
    path, obj, doc = _saved_resnet20(tmp_path)
    state = dict(obj["state_dict"])
    del state["bn1.running_mean"]
    state["extra"] = torch.zeros(1)
    torch.save({**obj, "state_dict": state}, path)
    with pytest.raises(GraphFormatError, match=r"missing \(1\): bn1\.running_mean; unexpected \(1\): extra"):
        load_graph_module(path)


class Payload:
    """Unpickling this runs code that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",))


def test_pickled_payload_is_refused_and_not_run(tmp_path):
    path, obj, _ = _saved_resnet20(tmp_path)
    torch.save({**obj, "meta": Payload(tmp_path / "ran")}, path)
    assert not is_graph_file(path)
    with pytest.raises(GraphFormatError, match="pickled Python objects.*nothing in it was run.*exec"):
        load_graph_module(path)
    assert not (tmp_path / "ran").exists()


def test_other_files_are_not_graph_files(tmp_path):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "sd.pt")
    (tmp_path / "junk").write_bytes(b"junk")
    assert not is_graph_file(tmp_path / "sd.pt") and not is_graph_file(tmp_path / "junk")
    assert not is_graph_file(tmp_path / "missing")
    with pytest.raises(GraphFormatError, match="not a pyprune.graph file"):
        load_graph_module(tmp_path / "sd.pt")


def test_overwrite_needs_force(tmp_path):
    gm = trace(build_model("resnet20"))
    path = save_graph_module(gm, tmp_path / "m.pgraph", meta={"n": 1})
    with pytest.raises(FileExistsError, match="force"):
        save_graph_module(gm, path, meta={"n": 2})
    assert load_graph_module(path)[1] == {"n": 1}
    save_graph_module(gm, path, meta={"n": 2}, force=True)
    assert load_graph_module(path)[1] == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pgraph"]  # no temporary files left


@pytest.fixture(scope="module")
def pretrained_resnet20(models_dir, tmp_path_factory):
    weights = models_dir / "resnet20-12fca82f.th"
    path = tmp_path_factory.mktemp("graph") / "resnet20-slim.pgraph"
    save_model(load_model(arch="resnet20", weights=str(weights)), path, provenance=["none"])
    return path, weights


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_info_reads_a_graph_file(capsys, pretrained_resnet20):
    path, weights = pretrained_resnet20
    code, out, _ = run_cli(capsys, "info", path, "--json")
    assert code == 0
    code, ref, _ = run_cli(capsys, "info", weights, "--arch", "resnet20", "--json")
    assert json.loads(out) == json.loads(ref)


def test_cli_eval_reads_a_graph_file(capsys, pretrained_resnet20, data_root):
    path, weights = pretrained_resnet20
    common = ["--limit", 100, "--json", "--data-root", data_root, "--no-progress"]
    code, out, _ = run_cli(capsys, "eval", path, *common)
    assert code == 0
    code, ref, _ = run_cli(capsys, "eval", weights, "--arch", "resnet20", *common)
    got, want = json.loads(out.splitlines()[-1]), json.loads(ref.splitlines()[-1])
    assert got == want and got["model"] == "resnet20" and got["n"] == 100


def test_graph_file_with_arch_is_an_error(capsys, pretrained_resnet20):
    path, _ = pretrained_resnet20
    code, _, err = run_cli(capsys, "eval", path, "--arch", "resnet20")
    assert code == 2 and "carries its own architecture" in err
    with pytest.raises(ValueError, match="without --arch, --weights or --pretrained"):
        load_model(str(path), weights=str(path))
    model = load_model(str(path))
    assert model.name == "resnet20" and model.input_shape == (3, 32, 32) and model.mean == (0.485, 0.456, 0.406)


# --- module names: the writer and the reader apply one rule, PyTorch's ----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyprune.encode.graph_json import qualname_problem  # noqa: E402


def _accepted_by_pytorch(name: str) -> bool:
    try:
        nn.Module().add_module(name, nn.Identity())
    except (KeyError, TypeError):
        return False
    return True


class _Named(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.add_module(name, nn.Conv2d(2, 3, 1))

    def forward(self, x):
        return next(iter(self.children()))(x) * 2  # no attribute of its own: any name is free


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s and "." not in s))  # one name, not a path
def test_any_module_name_pytorch_accepts_round_trips(tmp_path, name):
    accepted = _accepted_by_pytorch(name)
    if not accepted:
        assert qualname_problem(name) is not None
        return
    model = _Named(name).eval()
    try:
        traced = trace(model)
    except Exception:  # torch.fx's own limits (quotes, backslashes in generated code)
        assert qualname_problem(name) is not None
        return
    if qualname_problem(name) is not None:  # control characters: refused by both sides alike
        with pytest.raises(GraphFormatError):
            graph_to_json(traced)
        return
    path = tmp_path / "named.pt"
    save_graph_module(traced, path, force=True)
    gm, _ = load_graph_module(path)
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(gm(x), model(x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == [name]


@pytest.mark.parametrize("name", ["block1-0", "stage 2", "ünïcode", "0", "a" * 300])
def test_names_regnet_and_friends_use_round_trip(tmp_path, name):
    model = _Named(name).eval()
    save_graph_module(trace(model), tmp_path / "m.pt")
    gm, _ = load_graph_module(tmp_path / "m.pt")
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("name", ["training", "forward", "__dict__", "_modules", "a..b", ""])
def test_reader_refuses_names_no_module_can_have(name):
    assert qualname_problem(name) is not None
