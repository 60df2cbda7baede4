"""The zoo: every model builds, runs, traces with torch.fx, and has the published size."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pyprune.models import available_models, build_model, load_state_dict_file
from pyprune.models.resnet_cifar import ZeroPadShortcut, resnet_cifar

ZOO = [
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164",
    "vgg11", "vgg13", "vgg16", "vgg19", "densenet40", "densenet100",
]


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    # Built once per session: DenseNets take a second or two to build and run
    # on 2 cores. Tests must not modify the returned model.
    torch.manual_seed(0)
    return build_model(name).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_holds_the_whole_zoo() -> None:
    assert sorted(ZOO) == available_models()


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_fx_trace_agree(name: str) -> None:
    model = _model(name)
    x = _x()
    with torch.no_grad():
        eager = model(x)
        traced = torch.fx.symbolic_trace(model)
        out = traced(x)
    assert eager.shape == (2, 10)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "vgg11", "densenet40"])
def test_num_classes(name: str) -> None:
    model = build_model(name, num_classes=100)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 100
    if name == "resnet20":  # one forward is enough; the others share the plumbing
        with torch.no_grad():
            assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


# Parameter counts. Exact where the number is known independently (the
# published checkpoints' size, VGG-19's 20,035,018, DenseNet-40's 1,019,722
# counted by hand from the architecture, DenseNet-BC-100's 769,162 as listed by
# osmr/imgclsmob for CIFAR-10); relative where only the rounded published
# figure is known.
EXACT_PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "vgg19": 20_035_018,
    "densenet40": 1_019_722,
    "densenet100": 769_162,
}


@pytest.mark.parametrize("name,count", sorted(EXACT_PARAMS.items()))
def test_exact_param_counts(name: str, count: int) -> None:
    assert _n_params(_model(name)) == count


@pytest.mark.parametrize(
    "name,low,high",
    [
        ("resnet110", 1.70e6, 1.75e6),          # He et al.: 1.7M
        ("resnet164", 1.70e6 * 0.97, 1.70e6 * 1.03),  # network slimming: 1.70M
        ("vgg19", 20.04e6 * 0.99, 20.04e6 * 1.01),
        ("densenet40", 1.02e6 * 0.97, 1.02e6 * 1.03),
        ("densenet100", 0.765e6, 0.80e6),        # DenseNet-BC (k=12): 0.77M-0.8M
    ],
)
def test_published_param_counts(name: str, low: float, high: float) -> None:
    assert low <= _n_params(_model(name)) <= high


def test_option_a_shortcut_traces_to_getitem_and_pad() -> None:
    graph = torch.fx.symbolic_trace(_model("resnet20")).graph
    pads = [n for n in graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert len(pads) == 2  # first block of stages 2 and 3
    for pad in pads:
        src = pad.args[0]
        assert src.op == "call_function" and src.target is operator.getitem
        assert src.args[1] == (slice(None), slice(None), slice(None, None, 2), slice(None, None, 2))
    assert [p.args[1] for p in pads] == [(0, 0, 0, 0, 8, 8), (0, 0, 0, 0, 16, 16)]
    # Traced through, not kept as an opaque leaf module.
    assert not any(n.op == "call_module" and "shortcut" in str(n.target) for n in graph.nodes)


def test_zero_pad_shortcut_values() -> None:
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = ZeroPadShortcut(2)(x)
    assert y.shape == (2, 8, 2, 2)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert not y[:, :2].any() and not y[:, 6:].any()
    assert list(ZeroPadShortcut(2).parameters()) == []


def test_cat_nodes_in_densenet_trace() -> None:
    graph = torch.fx.symbolic_trace(_model("densenet40")).graph
    cats = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 36


def test_bad_depths_rejected() -> None:
    with pytest.raises(ValueError):
        resnet_cifar(21)


def _resnet20_expected_keys() -> dict[str, tuple[int, ...]]:
    """ResNet-20's state dict written out from the shared README, independently of the code."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{s}"] = (c,)

    bn("bn1", 16)
    in_c = 16
    for stage, width in ((1, 16), (2, 32), (3, 64)):
        for i in range(3):
            keys[f"layer{stage}.{i}.conv1.weight"] = (width, in_c, 3, 3)
            bn(f"layer{stage}.{i}.bn1", width)
            keys[f"layer{stage}.{i}.conv2.weight"] = (width, width, 3, 3)
            bn(f"layer{stage}.{i}.bn2", width)
            in_c = width
    keys["linear.weight"] = (10, 64)
    keys["linear.bias"] = (10,)
    return keys


def _without_batch_counters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def test_resnet20_keys_match_hand_written_list() -> None:
    expected = _resnet20_expected_keys()
    assert len(expected) == 97
    assert _without_batch_counters(_model("resnet20")) == expected


@pytest.mark.shared
@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet44", "resnet56"])
def test_resnet_keys_match_shared_checkpoints(arch: str, shared_checkpoint) -> None:
    raw = torch.load(shared_checkpoint(arch), map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("module.") for k in raw)
    ckpt = {k[len("module."):]: tuple(v.shape) for k, v in raw.items()}
    assert _without_batch_counters(_model(arch)) == ckpt
    # And through the loader, which strips the prefix itself.
    assert {k: tuple(v.shape) for k, v in load_state_dict_file(shared_checkpoint(arch)).items()} == ckpt
    if arch == "resnet20":
        assert ckpt == _resnet20_expected_keys()
