"""Raising torch.export programs into the graph IR (pyprune.ir.from_export), and
reading .pt2 files with nothing unpickled (pyprune.models.exported).

The independent expectation for a whole model is the ``--arch`` path: the same model
traced by torch.fx. Through export it must give the same graph document, the same
state dict, the same outputs, the same slimming plan and the same .ppz size. Small
synthetic modules pin down each handler against an expected graph."""

from __future__ import annotations

import io
import json
import operator
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pyprune import api
from pyprune.cli import main
from pyprune.encode import graph_to_json
from pyprune.ir import example_input, propagate_shapes, trace
from pyprune.ir.from_export import RAISERS, ExportRaiseError, raise_exported
from pyprune.models import ModelLoadError
from pyprune.models.exported import is_exported_program, load_exported_program
from pyprune.passes import slim as S
from tests.passes.test_slim import randomize_bn

# (arch, square input size): every zoo family, and two torchvision classifiers at 64 px.
# ResNet-164's pre-activation bottlenecks are checked in a 29-layer twin (the same
# blocks, 4x faster); ResNet-164 itself with -m slow.
MODELS = [("resnet20", 32), ("tests.export.models:preresnet29", 32), ("vgg11", 32), ("densenet40", 32),
          ("torchvision:resnet18", 64), ("torchvision:mobilenet_v2", 64)]
PIPELINE = "slim(ratio=0.3),mask(sparsity=0.7),quant(bits=4,iters=5)"  # few k-means steps: the same for both paths


def export_to(module: nn.Module, shape: tuple[int, ...], path: Path, **kw) -> Path:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.export.save(torch.export.export(module.eval(), (x,), **kw), path)
    return path


def _both(tmp_path: Path, arch: str, size: int, core_aten: bool = False) -> tuple[api.LoadedModel, api.LoadedModel]:
    """The model by ``--arch`` and through a saved torch.export program (decomposed to
    core ATen with ``core_aten``)."""
    kw = {"input_size": size} if arch.startswith("torchvision:") else {}
    by_arch = api.load_model(arch=arch, seed=0, **kw)
    randomize_bn(by_arch.module, (4, 3, size, size), seed=1)
    x = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    program = torch.export.export(by_arch.module.eval(), (x,))
    if core_aten:
        program = program.run_decompositions()
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert {"aten.convolution.default", "aten._native_batch_norm_legit_no_training.default"} <= ops
    torch.export.save(program, tmp_path / "model.pt2")
    return by_arch, api.load_model(str(tmp_path / "model.pt2"))


def _same_outputs_and_plan(by_arch: api.LoadedModel, by_export: api.LoadedModel) -> None:
    size = by_arch.input_shape[-1]
    x = torch.randn((3, 3, size, size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(by_export.module.eval()(x), by_arch.module.eval()(x))
    shape = example_input(by_arch.input_shape)
    plans = [S.plan(propagate_shapes(trace(m.module), shape), ratio=0.3) for m in (by_arch, by_export)]
    assert plans[0].removed == plans[1].removed and plans[0].removed
    assert [vars(r) for r in plans[0].layers] == [vars(r) for r in plans[1].layers]


def _document(model: api.LoadedModel) -> dict:
    return graph_to_json(trace(model.module))


@pytest.mark.parametrize("arch,size", MODELS + [pytest.param("resnet164", 32, marks=pytest.mark.slow)],
                         ids=[a for a, _ in MODELS] + ["resnet164"])
def test_export_path_equals_arch_path(tmp_path: Path, arch: str, size: int) -> None:
    by_arch, by_export = _both(tmp_path, arch, size)
    assert by_export.input_shape == by_arch.input_shape

    doc_arch, doc_export = _document(by_arch), _document(by_export)
    if arch == "torchvision:resnet18":
        # nn.AdaptiveAvgPool2d((1, 1)) and (1) export the same op: the program cannot
        # say which spelling the model used, and the raised graph takes the short one.
        assert doc_arch["modules"]["avgpool"]["config"] == {"output_size": {"tuple": [1, 1]}}
        doc_arch["modules"]["avgpool"]["config"] = {"output_size": 1}
    assert doc_export == doc_arch

    state_arch, state_export = by_arch.module.state_dict(), by_export.module.state_dict()
    assert list(state_export) == list(state_arch)
    assert all(torch.equal(state_export[k], state_arch[k]) for k in state_arch)
    _same_outputs_and_plan(by_arch, by_export)

    # compressed by the same pipeline, the two give the same .ppz, byte for byte
    if arch == "torchvision:resnet18":
        by_arch.module.avgpool = nn.AdaptiveAvgPool2d(1)  # the spelling above, which the file records
    files = []
    for name, model in (("arch", by_arch), ("export", by_export)):
        model.name = "model"  # the name is the one thing the two paths cannot share (file stem vs --arch)
        result = api.optimize_model(model, api.OptConfig(PIPELINE, eval_split=None))
        files.append(api.save_model(model, tmp_path / f"{name}.ppz", result.graph_module,
                                    codebooks=result.codebooks()).read_bytes())
    assert files[0] == files[1], (len(files[0]), len(files[1]))


@pytest.mark.parametrize("arch,size", [MODELS[0], MODELS[3], MODELS[5]], ids=["resnet20", "densenet40", "mobilenet_v2"])
def test_core_aten_program_gives_the_same_plan(tmp_path: Path, arch: str, size: int) -> None:
    """After run_decompositions(): convolution, _native_batch_norm_legit_no_training
    (and its unused statistics), addmm over a transposed weight, mean for the pool."""
    by_arch, by_export = _both(tmp_path, arch, size, core_aten=True)
    assert {type(m) for m in by_export.module.modules()} >= {nn.Conv2d, nn.BatchNorm2d, nn.Linear}
    _same_outputs_and_plan(by_arch, by_export)


# --- handlers, on small synthetic modules: before (the module) and expected graphs ----

def _raise(module: nn.Module, shape=(2, 4, 8, 8), **kw) -> fx.GraphModule:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return raise_exported(torch.export.export(module.eval(), (x,), **kw))


def _ops(gm: fx.GraphModule) -> list[tuple[str, object]]:
    return [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


class StridedShortcut(nn.Module):
    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))


def test_slices_of_one_index_become_one_getitem() -> None:
    gm = _raise(StridedShortcut())
    (getitem,) = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert getitem.args[1] == (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2))
    assert _ops(gm) == [("call_function", operator.getitem), ("call_function", F.pad)]


class ReadsAfterInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        r = torch.relu_(h)  # h is now relu(conv(x)) for every later reader
        return h + r


def test_in_place_op_is_seen_by_later_readers() -> None:
    module = ReadsAfterInPlace().eval()
    gm = _raise(module)
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), 2 * F.relu(module.conv(x)))
    (add,) = [n for n in gm.graph.nodes if n.target is operator.add]
    relu = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert add.args == (relu, relu) and relu.kwargs == {"inplace": True}


class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.5))

    def forward(self, x):
        return self.gamma * self.conv(x)


def test_free_parameter_is_read_with_get_attr_at_its_name() -> None:
    gm = _raise(LayerScale())
    assert _ops(gm) == [("call_module", "conv"), ("get_attr", "gamma"), ("call_function", operator.mul)]
    assert isinstance(gm.gamma, nn.Parameter) and torch.equal(gm.gamma, torch.full((4, 1, 1), 0.5))


class Flattening(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


def test_reshape_keeps_any_batch_size() -> None:
    module = Flattening().eval()
    gm = _raise(module, shape=(1, 4, 8, 8))  # the example's batch of 1 is specialised in the program
    for batch in (1, 5):
        x = torch.randn(batch, 4, 8, 8)
        with torch.no_grad():
            assert torch.equal(gm(x), module(x))


def test_dynamic_batch_program() -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    module = Flattening().eval()
    gm = _raise(module, shape=(2, 4, 8, 8), dynamic_shapes=({0: batch},))
    x = torch.randn(7, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(gm(x), module(x))


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1))

    def forward(self, x):
        return torch.cumsum(self.inner(x), dim=1).logsumexp(dim=1)


def test_unsupported_ops_are_named_with_their_module_all_at_once() -> None:
    with pytest.raises(ExportRaiseError) as err:
        _raise(Unsupported())
    text = str(err.value)
    assert "aten.cumsum.default" in text and "aten.logsumexp.default" in text
    assert "top-level module (Unsupported)" in text
    assert not any(str(op).startswith("aten.cumsum") for op in RAISERS)


def test_training_mode_program_is_refused() -> None:
    module = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 4, 8, 8)
    ep = torch.export.export(module, (x,))
    with pytest.raises(ExportRaiseError, match=r"model\.eval\(\)"):
        raise_exported(ep)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


def test_program_of_two_inputs_is_refused() -> None:
    ep = torch.export.export(TwoInputs(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)))
    with pytest.raises(ExportRaiseError, match="2 inputs"):
        raise_exported(ep)


# --- reading .pt2 files --------------------------------------------------------

def _small_pt2(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))
    return export_to(model, (1, 3, 8, 8), tmp_path / "small.pt2")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the archive ``src`` with each member's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return dst


def _edit_config(suffix: str, change):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith(suffix):
            return data
        table = json.loads(data)
        change(table["config"])
        return json.dumps(table).encode()
    return edit


def test_small_program_loads_with_shape_and_graph(tmp_path: Path) -> None:
    path = _small_pt2(tmp_path)
    assert is_exported_program(path)
    model = api.load_model(str(path))
    assert model.input_shape == (3, 8, 8) and model.name == "small"
    assert [n.target for n in model.module.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3", "4", "5"]


def test_pickled_weight_is_refused_before_torch_reads_it(tmp_path: Path) -> None:
    def pickled(config: dict) -> None:
        next(iter(config.values()))["use_pickle"] = True

    bad = _rewrite(_small_pt2(tmp_path), tmp_path / "bad.pt2", _edit_config("_weights_config.json", pickled))
    with pytest.raises(ModelLoadError, match="stored as a pickle"):
        load_exported_program(bad)


def test_python_object_constant_is_refused(tmp_path: Path) -> None:
    def custom(config: dict) -> None:
        config["thing"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False}

    bad = _rewrite(_small_pt2(tmp_path), tmp_path / "bad.pt2", _edit_config("_constants_config.json", custom))
    with pytest.raises(ModelLoadError, match="Python object"):
        load_exported_program(bad)


class _Payload:
    pass


def test_sample_inputs_that_need_unpickling_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(((_Payload(),), {}), buffer)
    def edit(name: str, data: bytes) -> bytes:
        return buffer.getvalue() if "/data/sample_inputs/" in name else data

    bad = _rewrite(_small_pt2(tmp_path), tmp_path / "bad.pt2", edit)
    with pytest.raises(ModelLoadError, match="sample inputs"):
        load_exported_program(bad)


def test_other_files_are_not_programs(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)  # a zip too, but not a PT2 archive
    assert not is_exported_program(state)
    assert not is_exported_program(tmp_path / "missing.pt2")


def test_cli_takes_a_program_without_arch_and_refuses_arch_with_it(tmp_path: Path, capsys) -> None:
    path = _small_pt2(tmp_path)
    assert main(["info", str(path)]) == 0
    assert "Linear" in capsys.readouterr().out
    assert main(["info", str(path), "--arch", "resnet20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.export program" in err[0] and "--arch" in err[0]
