"""torchvision classifiers: ``--arch torchvision:NAME`` loading, the passes on five
ImageNet architectures, and the .ppz round trip.

Nothing here downloads: every model is built with ``weights=None``. The nets are
traced and run at 64x64 (all five accept it; their specs say 224x224) to stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pyprune.api import LoadedModel, load_model, model_info, save_model
from pyprune.cli import main
from pyprune.ir import propagate_shapes, trace
from pyprune.models import ModelLoadError, torchvision_spec
from pyprune.models.registry import DEFAULT_MEAN, DEFAULT_STD
from pyprune.passes import slim as S
from tests.passes.test_slim import randomize_bn
from tests.passes_helpers import compressed

ARCHS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "densenet121"]
SHAPE = (3, 64, 64)
PIPELINE = "slim(ratio=0.3),mask(sparsity=0.5),quant(bits=4)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# vgg16_bn's classifier holds 120M weights: masking and quantizing them takes ~40 s.
ARCHS_FAST_PIPELINE = [pytest.param(a, marks=pytest.mark.slow) if a == "vgg16_bn" else a for a in ARCHS]


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, *SHAPE), generator=torch.Generator().manual_seed(1))


def _reference(arch: str, seed: int = 0) -> nn.Module:
    """torchvision's own model, seeded, with spread BN gammas and calibrated statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    return randomize_bn(model, (4, *SHAPE), seed=seed)


def _conv_linear_weights(module: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --- (a) loading ---------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "state_dict"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "densenet121"])
def test_weights_reproduce_torchvision_outputs(tmp_path: Path, arch: str, wrap: str) -> None:
    ref = _reference(arch, seed=3)
    state = ref.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if wrap == "plain" else {"state_dict": state, "epoch": 7}, path)

    loaded = load_model(arch=f"torchvision:{arch}", weights=str(path), seed=99)  # other seed: weights must win
    assert (loaded.name, loaded.input_shape) == (f"torchvision:{arch}", (3, 224, 224))
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert type(loaded.module) is type(ref)
    got = loaded.module.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded.module.eval()(_x()), ref.eval()(_x()))


def test_spec_and_num_classes() -> None:
    spec = torchvision_spec("torchvision:ResNet18")  # names match case-insensitively, as zoo names do
    assert (spec.name, spec.input_shape, spec.mean, spec.std) == \
        ("torchvision:resnet18", (3, 224, 224), DEFAULT_MEAN, DEFAULT_STD)
    assert DEFAULT_MEAN == IMAGENET_MEAN and DEFAULT_STD == IMAGENET_STD
    assert load_model(arch="torchvision:resnet18", num_classes=37).module.fc.out_features == 37


def test_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    # torchvision's weight enums call their own imported name.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    with pytest.raises(AssertionError, match="tried to download"):  # the trap is armed
        torchvision.models.get_model("mobilenet_v2", weights="DEFAULT")
    torch.manual_seed(0)
    want = torchvision.models.mobilenet_v2(num_classes=10)
    got = load_model(arch="torchvision:mobilenet_v2", seed=0).module  # random init, seeded like want
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown torchvision model 'resnet19'; did you mean "
                                             r"torchvision:resnet18.*e\.g\. torchvision:resnet18, torchvision:resnet50"):
        load_model(arch="torchvision:resnet19")


def test_other_architectures_weights_say_which_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(_reference("resnet18").state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"(?s)missing keys .*\(80\):\n    layer1\.2\.conv1\.weight"):
        load_model(arch="torchvision:resnet34", weights=str(path))
    with pytest.raises(ModelLoadError, match=r"unexpected keys .*\(1\):\n    layer4\.1\.bn2\.running_var_extra"):
        load_model(arch="torchvision:resnet18", weights=str(_with_extra_key(path)))
    with pytest.raises(ModelLoadError, match=r"mis-shaped keys \(2\):\n    fc\.weight: checkpoint \(10, 512\) "
                                             r"vs model \(1000, 512\)\n    fc\.bias"):
        load_model(arch="torchvision:resnet18", weights=str(path), num_classes=1000)


def _with_extra_key(path: Path) -> Path:
    """The checkpoint with one key resnet18 does not have: an 'unexpected keys' case."""
    state = torch.load(path, weights_only=True)
    state["layer4.1.bn2.running_var_extra"] = torch.zeros(1)
    out = path.with_name("extra.pt")
    torch.save(state, out)
    return out


def test_cli_info_counts_the_loaded_models_parameters(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = _reference("mobilenet_v2")
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    assert main(["info", "--arch", "torchvision:mobilenet_v2", "--weights", str(tmp_path / "w.pt")]) == 0
    params = sum(p.numel() for p in ref.parameters())
    assert f"{params / 1e6:.2f}M parameters" in capsys.readouterr().out


def test_cli_input_size_traces_the_model_at_that_size(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "--arch", "torchvision:resnet18", "--input-size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # the same analysis as a model whose input shape is set by hand
    model = load_model(arch="torchvision:resnet18")
    model.input_shape = (3, 64, 64)
    assert info == model_info(model).to_dict()
    last = [r for r in info["layers"] if r["name"] == "layer4.1.bn2"][0]
    assert last["output_shape"][1:] == [512, 2, 2]  # 64 / 32: ResNet downsamples 32x


@pytest.mark.parametrize("argv, message", [
    (["info", "--arch", "torchvision:resnet18", "--input-size", "0"], "--input-size must be a positive"),
    (["eval", "--arch", "torchvision:resnet18", "--input-size", "64", "--limit", "4", "--data-root", "DATA"],
     "cifar10 images are 3x32x32 (C x H x W), but the model takes 3x64x64"),
])
def test_cli_input_size_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture,
                               request: pytest.FixtureRequest) -> None:
    if "DATA" in argv:
        argv = [str(request.getfixturevalue("data_root")) if a == "DATA" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_saved_models_keep_their_input_size(tmp_path: Path) -> None:
    model = load_model(arch="torchvision:resnet18", num_classes=3)
    save_model(model, tmp_path / "m.ppz")
    with pytest.raises(ValueError, match="keeps the input size"):
        load_model(str(tmp_path / "m.ppz"), input_size=64)


# --- (b) the passes ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_slim_equals_zeroing_the_removed_bn_channels(arch: str) -> None:
    """Two paths to the same function: the slimmed graph, and torchvision's own
    module with the gamma and beta of every removed BatchNorm channel set to zero
    (no folding, so zero is exactly what a removed channel contributes)."""
    ref = _reference(arch)
    x = _x()
    gm = propagate_shapes(trace(copy.deepcopy(ref)), x)
    plan = S.plan(gm, ratio=0.3, fold=False)
    assert plan.removed and plan.achieved_ratio > 0.25

    zeroed = copy.deepcopy(ref)
    removed = [bc for g in plan.removed for bc in plan.analysis.groups[g].bn_channels]
    with torch.no_grad():
        for target, c in removed:
            bn = zeroed.get_submodule(target)
            bn.weight[c] = 0
            bn.bias[c] = 0
    bn_before = {n: m.num_features for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}

    slimmed = S.apply(gm, plan).eval()
    with torch.no_grad():
        original, want, got = ref(x), zeroed(x), slimmed(x)
    assert got.shape == original.shape == (2, 10)
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert (want - original).abs().max().item() > 1e-3  # the removal changed the function

    # Every BatchNorm lost exactly the channels the plan names, no more, no fewer.
    bn_after = {n: m.num_features for n, m in slimmed.named_modules() if isinstance(m, nn.BatchNorm2d)}
    lost = {n: sum(1 for t, _ in removed if t == n) for n in bn_before}
    assert bn_after == {n: bn_before[n] - lost[n] for n in bn_before}
    assert sum(lost.values()) == plan.removed_bn_channels > 0
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in ref.parameters())


# Layers that must shrink, and how their neighbours must agree afterwards.
def _check_structure(arch: str, before: nn.Module, after: nn.Module) -> None:
    get = after.get_submodule
    if arch in ("resnet18", "resnet50"):
        assert get("layer1.0.conv1").out_channels == get("layer1.0.bn1").num_features < 64
        assert get("layer1.0.conv2").in_channels == get("layer1.0.bn1").num_features
        if arch == "resnet50":  # the residual stream: block output and shortcut stay the same width
            assert get("layer1.0.conv3").out_channels == get("layer1.0.downsample.0").out_channels
        assert get("fc").in_features == get("layer4.1.bn2" if arch == "resnet18" else "layer4.2.bn3").num_features
    elif arch == "vgg16_bn":
        assert get("features.0").out_channels == get("features.1").num_features < 64
        assert get("features.3").in_channels == get("features.1").num_features
        # The 7x7 average pool is flattened: each kept channel keeps its 49 features.
        assert get("classifier.0").in_features == 49 * get("features.41").num_features
    elif arch == "mobilenet_v2":
        # The depthwise conv stays depthwise at the width of the expansion it filters.
        dw, expand = get("features.2.conv.1.0"), get("features.2.conv.0.1").num_features
        assert dw.groups == dw.in_channels == dw.out_channels == expand < 96
        assert get("features.2.conv.2").in_channels == expand
    elif arch == "densenet121":
        # A dense layer's input is the concatenation of everything before it in the block.
        grown = [get(f"features.denseblock1.denselayer{i}.conv2").out_channels for i in range(1, 6)]
        stem = get("features.norm0").num_features
        assert get("features.denseblock1.denselayer6.norm1").num_features == stem + sum(grown)
        assert get("features.denseblock1.denselayer6.conv1").in_channels == stem + sum(grown) < 64 + 5 * 32
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(after) < params(before)


@pytest.mark.parametrize("arch", ARCHS_FAST_PIPELINE)
def test_slim_mask_quant_pipeline(arch: str) -> None:
    ref, model, gm, books = _compressed(arch)
    x = _x()
    with torch.no_grad():
        assert gm.eval()(x).shape == ref(x).shape == (2, 10)
    _check_structure(arch, ref, gm)

    # mask(sparsity=0.5), one global threshold: exactly round(0.5 * N) zeros
    # over the N conv and linear weights the slimmed model has.
    weights = _conv_linear_weights(gm)
    n = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * n)
    # quant(bits=4): every layer's non-zero weights take at most 16 values, its codebook.
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert books.keys() == layers.keys()
    for name, m in layers.items():
        values = torch.unique(m.weight[m.weight != 0].detach())
        assert values.numel() <= 16 and torch.equal(values, books[name])


@functools.lru_cache(maxsize=None)
def _compressed(arch: str):
    """(reference module, LoadedModel, compressed graph, codebooks); shared by the
    pipeline and round-trip tests, which only read them."""
    ref = _reference(arch)
    loaded = LoadedModel.from_spec(copy.deepcopy(ref), torchvision_spec(arch), arch)
    model = dataclasses.replace(loaded, input_shape=SHAPE)
    gm, books = compressed(model, PIPELINE)
    return ref, model, gm, books


# --- (c) the .ppz round trip ----------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "densenet121"])
def test_ppz_round_trip_is_bit_identical(tmp_path: Path, arch: str) -> None:
    _, model, gm, books = _compressed(arch)
    path = save_model(model, tmp_path / "m.ppz", gm=gm, provenance=[PIPELINE], codebooks=books)
    back = load_model(str(path))
    assert (back.name, back.mean, back.std, back.input_shape) == \
        (f"torchvision:{arch}", IMAGENET_MEAN, IMAGENET_STD, SHAPE)
    want, got = gm.state_dict(), back.module.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    with torch.no_grad():
        assert torch.equal(back.module(_x()), gm.eval()(_x()))


def test_uncompressed_graph_round_trip(tmp_path: Path) -> None:
    """A model saved straight from --arch torchvision:NAME (no passes) reloads with
    no --arch and gives the same outputs."""
    loaded = dataclasses.replace(load_model(arch="torchvision:densenet121", seed=1), input_shape=SHAPE)
    back = load_model(str(save_model(loaded, tmp_path / "d.ppz")))
    with torch.no_grad():
        assert torch.equal(back.module(_x()), loaded.module.eval()(_x()))
