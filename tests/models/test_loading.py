"""Loading weights, user models and pickled modules; resolve_model's argument forms."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from pyprune.models import (
    ModelLoadError,
    build_model,
    build_user_model,
    get_spec,
    load_pickled_module,
    load_state_dict_file,
    load_weights,
    resolve_model,
)
from pyprune.models.resnet_cifar import ResNetCifar


def _resnet20(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet20")
    # Non-trivial BN statistics, so the round trip checks buffers too.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# --- state dict files -------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix", "wrapped_prefix"])
def test_state_dict_round_trip(tmp_path: Path, wrap: str) -> None:
    src = _resnet20(seed=1)
    state = src.state_dict()
    if wrap in ("module_prefix", "wrapped_prefix"):
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {
        "plain": state,
        "module_prefix": state,
        "state_dict": {"state_dict": state, "epoch": 3, "best_prec1": 91.0},
        "wrapped_prefix": {"state_dict": state},
        "model": {"model": state, "optimizer": {}},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)

    loaded = load_state_dict_file(path)
    assert set(loaded) == set(src.state_dict())
    dst = _resnet20(seed=2)
    assert not _same_outputs(src, dst)
    assert load_weights(dst, path) is dst
    assert _same_outputs(src, dst)


def test_load_weights_from_mapping_and_without_batch_counters() -> None:
    src = _resnet20(seed=1)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = _resnet20(seed=2)
    load_weights(dst, state)  # absent num_batches_tracked is not a mismatch
    assert _same_outputs(src, dst)


def _bad_state() -> dict[str, torch.Tensor]:
    state = dict(_resnet20(seed=1).state_dict())
    del state["layer2.1.conv1.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    state["linear.weight"] = torch.zeros(100, 64)
    return state


def test_mismatch_names_every_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save(_bad_state(), path)
    model = _resnet20(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelLoadError) as info:
        load_weights(model, path)
    msg = str(info.value)
    assert "missing" in msg and "layer2.1.conv1.weight" in msg
    assert "unexpected" in msg and "layer9.0.conv1.weight" in msg
    assert "linear.weight" in msg and "(100, 64)" in msg and "(10, 64)" in msg
    assert str(path) in msg
    # Nothing was copied before the check failed.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_strict_still_rejects_wrong_shapes() -> None:
    state = _bad_state()
    with pytest.raises(ModelLoadError, match="linear.weight"):
        load_weights(_resnet20(seed=2), state, strict=False)
    state["linear.weight"] = torch.zeros(10, 64)
    model = load_weights(_resnet20(seed=2), state, strict=False)
    assert torch.equal(model.linear.weight, torch.zeros(10, 64))


def test_long_key_lists_are_truncated() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_weights(build_model("resnet56"), {"x": torch.zeros(1)})
    msg = str(info.value)
    assert "missing keys" in msg and "more" in msg
    assert msg.count("\n") < 40


def test_whole_pickled_module_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(_resnet20(seed=1), path)
    with pytest.raises(ModelLoadError, match="--trust-pickle") as info:
        load_state_dict_file(path)
    assert "whole" in str(info.value)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    for i, content in enumerate([b"this is not a checkpoint", b"\x99\x00garbage", b""]):
        junk = tmp_path / f"junk{i}.pt"
        junk.write_bytes(content)
        with pytest.raises(ModelLoadError, match=f"junk{i}.pt is not a readable PyTorch checkpoint"):
            load_state_dict_file(junk)
    with pytest.raises(ModelLoadError, match="not found.*nowhere.pt"):
        load_state_dict_file(tmp_path / "nowhere.pt")
    not_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(ModelLoadError, match="not a state dict of tensors"):
        load_state_dict_file(not_tensors)


# --- pickled whole modules --------------------------------------------------

def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    src = _resnet20(seed=1)
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    with pytest.raises(ModelLoadError) as info:
        load_pickled_module(path, trust_pickle=False)
    assert "--trust-pickle" in str(info.value) and "code" in str(info.value)
    loaded = load_pickled_module(path, trust_pickle=True)
    assert isinstance(loaded, ResNetCifar)
    assert _same_outputs(src, loaded)


def test_pickled_module_that_is_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(_resnet20(seed=1).state_dict(), path)
    with pytest.raises(ModelLoadError, match="--arch"):
        load_pickled_module(path, trust_pickle=True)


# --- user models ------------------------------------------------------------

USER_SOURCE = textwrap.dedent(
    """
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    def factory(width=4):
        return Net(num_classes=10, width=width)

    def not_a_module():
        return 3

    def broken():
        raise RuntimeError("boom")

    class Zoo:
        small = staticmethod(lambda: Net(width=2))

    CONSTANT = 5
    """
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh importable module (unique name) defining Net, factory, ..."""
    name = f"user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_factory_and_class(user_module: str) -> None:
    model = build_user_model(f"{user_module}:factory", width=6)
    assert model.conv.out_channels == 6
    assert build_user_model(f"{user_module}:Net", num_classes=3).fc.out_features == 3
    assert build_user_model(f"{user_module}:Zoo.small").conv.out_channels == 2


def test_user_model_from_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cwd_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_SOURCE)
    monkeypatch.chdir(tmp_path)
    try:
        assert isinstance(build_user_model(f"{name}:factory"), nn.Module)
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "target,pattern",
    [
        ("no_colon_here", "package.module:callable"),
        (":factory", "package.module:callable"),
        ("{mod}:", "package.module:callable"),
        ("definitely_missing_pkg_xyz.models:Net", "cannot find module 'definitely_missing_pkg_xyz.models'"),
        ("{mod}:Missing", "has no attribute 'Missing'"),
        ("{mod}:Zoo.large", "Zoo has no attribute 'large'"),
        ("{mod}:CONSTANT", "not a callable"),
        ("{mod}:not_a_module", "returned a int, not a torch.nn.Module"),
        ("{mod}:broken", "boom"),
    ],
)
def test_user_model_errors(user_module: str, target: str, pattern: str) -> None:
    with pytest.raises(ModelLoadError, match=pattern):
        build_user_model(target.format(mod=user_module))


def test_user_module_with_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"needs_dep_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="importing .* failed.*not_installed_dep_xyz"):
        build_user_model(f"{name}:Net")


# --- resolve_model ------------------------------------------------------------

@pytest.fixture
def resnet20_files(tmp_path: Path) -> tuple[nn.Module, Path, Path]:
    src = _resnet20(seed=1)
    weights = tmp_path / "r20.pt"
    whole = tmp_path / "r20-whole.pt"
    torch.save({"state_dict": src.state_dict()}, weights)
    torch.save(src, whole)
    return src, weights, whole


def test_resolve_arch_alone_is_random_init() -> None:
    torch.manual_seed(0)
    a, spec = resolve_model(None, "resnet20", None)
    torch.manual_seed(0)
    b, _ = resolve_model(None, "resnet20", None)
    assert spec is get_spec("resnet20")
    assert _same_outputs(a, b)  # the caller's seed decides the init


def test_resolve_arch_with_weights_or_positional(resnet20_files) -> None:
    src, weights, _ = resnet20_files
    m1, spec1 = resolve_model(None, "resnet20", weights)
    m2, spec2 = resolve_model(weights, "resnet20", None)
    assert spec1 is spec2 is get_spec("resnet20")
    assert _same_outputs(src, m1) and _same_outputs(src, m2)


def test_resolve_num_classes() -> None:
    model, _ = resolve_model(None, "resnet20", None, num_classes=100)
    assert model.linear.out_features == 100


def test_resolve_whole_module(resnet20_files) -> None:
    src, weights, whole = resnet20_files
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        resolve_model(whole, None, None)
    model, spec = resolve_model(whole, None, None, trust_pickle=True)
    assert spec is None and _same_outputs(src, model)
    # A state dict given as MODEL without --arch: the advice is --arch.
    with pytest.raises(ModelLoadError, match="--arch"):
        resolve_model(weights, None, None)


def test_resolve_user_callable(user_module: str, tmp_path: Path) -> None:
    model, spec = resolve_model(None, f"{user_module}:Net", None, num_classes=7)
    assert spec is None and model.fc.out_features == 7  # Net declares num_classes
    model, _ = resolve_model(None, f"{user_module}:factory", None, num_classes=7)
    assert model.fc.out_features == 10  # factory does not, so it is not passed
    path = tmp_path / "user.pt"
    torch.save(model.state_dict(), path)
    again, _ = resolve_model(None, f"{user_module}:factory", path)
    assert torch.equal(again.fc.weight, model.fc.weight)


def test_resolve_errors(resnet20_files, tmp_path: Path) -> None:
    _, weights, _ = resnet20_files
    with pytest.raises(ModelLoadError, match="no model given"):
        resolve_model(None, None, None)
    with pytest.raises(ModelLoadError, match="not both"):
        resolve_model(weights, "resnet20", weights)
    with pytest.raises(ModelLoadError, match="--weights needs --arch"):
        resolve_model(None, None, weights)
    with pytest.raises(ModelLoadError, match="unknown architecture 'resnet21'.*resnet20"):
        resolve_model(None, "resnet21", None)
    missing = tmp_path / "missing.pt"
    for args in ((None, "resnet20", missing), (missing, "resnet20", None), (missing, None, None)):
        with pytest.raises(ModelLoadError, match=f"not found: {missing}"):
            resolve_model(*args)
    with pytest.raises(ModelLoadError, match="(?s)missing keys .*layer1.3.conv1.weight"):
        resolve_model(None, "resnet32", weights)  # wrong depth
    with pytest.raises(ModelLoadError, match="(?s)mis-shaped keys .*linear.weight"):
        resolve_model(None, "resnet20", weights, num_classes=100)


# --- the real checkpoint --------------------------------------------------------

@pytest.mark.shared
def test_load_shared_resnet20(shared_checkpoint) -> None:
    path = shared_checkpoint("resnet20")
    model, spec = resolve_model(None, "resnet20", path)
    assert spec is get_spec("resnet20")
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.linear.weight, raw["module.linear.weight"])
    assert torch.equal(model.layer3[2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


# --- files that are not what the arguments say -------------------------------------

@pytest.mark.parametrize("arch,classes", [("resnet20", 10), ("vgg11", 100)])
def test_state_dict_without_arch_names_the_zoo_architecture_it_fits(tmp_path: Path, arch: str, classes: int) -> None:
    path = tmp_path / "weights.pt"
    torch.save(get_spec(arch).build(num_classes=classes).state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model(str(path), None, None)
    extra = f" --num-classes {classes}" if classes != 10 else ""
    assert f"this looks like {arch}: add --arch {arch}{extra}" in str(err.value)


def test_state_dict_of_no_zoo_architecture_lists_the_zoo(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ModelLoadError, match="name its architecture with --arch") as err:
        resolve_model(str(path), None, None)
    assert "looks like" not in str(err.value)


@pytest.fixture()
def torchscript_file(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())), path)
    return path


@pytest.mark.parametrize("how", ["whole", "trusted", "weights"])
def test_torchscript_is_refused_with_the_formats_that_are_read(torchscript_file: Path, how: str) -> None:
    args = {"whole": (str(torchscript_file), None, None), "trusted": (str(torchscript_file), None, None),
            "weights": (None, "resnet20", str(torchscript_file))}[how]
    with pytest.raises(ModelLoadError) as err:
        resolve_model(*args, trust_pickle=how == "trusted")
    text = str(err.value)
    assert "TorchScript archive" in text and "torch.export.save" in text and ".pt2" in text
