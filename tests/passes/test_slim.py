import copy

import pytest
import torch
import torchvision
from torch import nn

from pyprune.ir import PassManager, propagate_shapes, trace
from pyprune.models import available_models, build_model
from pyprune.passes import create_pass
from pyprune.passes import slim as S

TORCHVISION = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "shufflenet_v2_x1_0"]


def randomize_bn(model: nn.Module, shape=(8, 3, 32, 32), seed: int = 0) -> nn.Module:
    """Spread gammas so that the selection is non-trivial, then calibrate the BN
    statistics on a random batch, as training would, so that activations and logits
    stay of order one and a 1e-4 comparison means something."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g))
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        model.train()(torch.randn(shape, generator=g))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def traced(model, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return propagate_shapes(trace(model), x), x


def check_apply_equals_mask(model, shape, ratio):
    gm, x = traced(model, shape)
    params_before = sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        original = gm(x)
    plan = S.plan(gm, ratio=ratio)
    masked = S.mask(copy.deepcopy(gm), plan)
    slimmed = S.apply(gm, plan)
    with torch.no_grad():
        want, got = masked(x), slimmed(x)
    assert got.shape == original.shape
    assert (got - want).abs().max().item() <= 1e-4
    assert (want - original).abs().max().item() > 1e-3  # the plan really changed the model
    assert sum(p.numel() for p in slimmed.parameters()) < params_before
    assert plan.summary()["achieved_ratio"] > 0
    return plan, slimmed


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("arch", available_models())
def test_zoo_apply_equals_mask(arch, ratio):
    torch.manual_seed(0)
    check_apply_equals_mask(randomize_bn(build_model(arch)), (2, 3, 32, 32), ratio)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_apply_equals_mask(arch, ratio):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    check_apply_equals_mask(randomize_bn(model, (8, 3, 64, 64)), (2, 3, 64, 64), ratio)


def test_every_layer_keeps_its_floor():
    gm, _ = traced(randomize_bn(build_model("vgg11")), (1, 3, 32, 32))
    plan = S.plan(gm, ratio=0.95, min_keep=0.25)
    assert all(r.after >= max(1, -(-r.before // 4)) for r in plan.layers)
    assert any(r.after == -(-r.before // 4) for r in plan.layers)  # the floor binds
    extreme = S.plan(gm, ratio=0.99)
    assert all(r.after >= 1 for r in extreme.layers)


def test_layer_ratios_touch_only_that_layer():
    gm, _ = traced(randomize_bn(build_model("resnet20")), (1, 3, 32, 32))
    plan = S.plan(gm, ratio=0.0, layer_ratios={"layer1.0.bn1": 0.5})
    changed = {r.name: (r.before, r.after) for r in plan.layers if r.before != r.after}
    assert changed == {"layer1.0.conv1": (16, 8), "layer1.0.bn1": (16, 8)}
    with pytest.raises(ValueError, match="not a conv, BatchNorm or linear"):
        S.plan(gm, layer_ratios={"layer1.0.relu1": 0.5})


def test_combine_changes_residual_scores():
    gm, _ = traced(randomize_bn(build_model("resnet20")), (1, 3, 32, 32))
    group = S.plan(gm, ratio=0.3).analysis.group_of("layer1.0.bn2", 0)
    gammas = [gm.get_submodule(t).weight[c].item() for t, c in group.bn_channels]
    # Zero-padded shortcuts carry a stage-1 channel through stages 2 and 3: the stem
    # BN and the second BN of all nine blocks write it.
    assert len(gammas) == 10
    for combine, expected in (("max", max(gammas)), ("sum", sum(gammas)), ("mean", sum(gammas) / len(gammas))):
        assert S.plan(gm, ratio=0.3, combine=combine).scores[group.id] == pytest.approx(expected)


def test_option_a_pad_amounts_are_rewritten():
    gm, x = traced(randomize_bn(build_model("resnet20")), (1, 3, 32, 32))
    plan = S.plan(gm, ratio=0.5)
    pads_before = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    S.apply(gm, plan)
    pads_after = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert pads_before == [(0, 0, 0, 0, 8, 8), (0, 0, 0, 0, 16, 16)]
    assert pads_after != pads_before and all(p[:4] == (0, 0, 0, 0) for p in pads_after)


def test_plan_is_inspectable():
    gm, _ = traced(randomize_bn(build_model("resnet20")), (1, 3, 32, 32))
    plan = S.plan(gm, ratio=0.4)
    table = plan.table()
    assert "layer1.0.conv1" in table and "asked 40.0%" in table
    summary = plan.summary()
    assert summary["removed_groups"] == len(plan.removed) and summary["refused"]["graph output"] == 10
    # The ratio counts prunable channel groups, as network slimming counts channels.
    assert len(plan.removed) == round(0.4 * summary["prunable_groups"])


def test_pass_in_the_pass_manager():
    model = randomize_bn(build_model("resnet20"))
    gm, x = traced(model, (2, 3, 32, 32))
    result = PassManager([create_pass("slim", ratio=0.4)], (x,), check_numerics=True).run(gm)
    before, after = result.stats
    assert after.name == "slim" and after.params < before.params and after.macs < before.macs
    assert after.record["mode"] == "apply" and after.record["achieved_ratio"] > 0.3


@pytest.mark.parametrize("options,message", [({"ratio": 1.0}, "ratio"), ({"combine": "min"}, "combine"),
                                             ({"mode": "prune"}, "mode")])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        S.Slim(**options)(traced(build_model("resnet20"), (1, 3, 32, 32))[0])


class Chain1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(self.relu2(self.bn2(self.conv2(x)))), 1))


@pytest.mark.parametrize("fold", [True, False])
def test_fold_keeps_the_constant_of_dead_channels(fold):
    """Channels with gamma = 0 output the constant relu(beta): with folding, removing
    them leaves the model's function exactly as it was."""
    model = randomize_bn(Chain1x1(), (8, 3, 8, 8))
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.9, 0.0, 0.8, 0.0, 0.7, 0.6]))
        model.bn1.bias.copy_(torch.tensor([0.1, 0.5, -0.2, 0.3, 0.2, 0.1]))
    gm, x = traced(model, (4, 3, 8, 8))
    with torch.no_grad():
        original = gm(x)
    plan = S.plan(gm, ratio=0.0, layer_ratios={"bn1": 2 / 6}, fold=fold)
    assert [r.after for r in plan.layers if r.name == "bn1"] == [4]
    masked = S.mask(copy.deepcopy(gm), plan)
    slimmed = S.apply(gm, plan)
    with torch.no_grad():
        got = slimmed(x)
        torch.testing.assert_close(got, masked(x), rtol=0, atol=1e-5)
    assert torch.allclose(got, original, atol=1e-5) == fold


# --- a model slim cannot help says so ------------------------------------------------

class NoBatchNorm(nn.Module):  # squeezenet's case
    def __init__(self):
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


class BatchNormBehindABarrier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(torch.sin(self.bn1(self.conv1(x))))


@pytest.mark.parametrize("model,ratio,expected", [
    (NoBatchNorm(), 0.5, "slim removed nothing: the model has no BatchNorm layer"),
    (BatchNormBehindABarrier(), 0.5, "slim removed nothing: no channel group can be removed (barrier"),
])
def test_slim_says_why_it_removed_nothing(model, ratio, expected):
    gm, _ = traced(model, (2, 3, 8, 8))
    slim = create_pass("slim", ratio=ratio)
    result = slim(gm)
    assert not result.modified
    text = slim.summary(result.record)
    assert text.startswith(expected), text


def test_slim_at_ratio_zero_asks_for_a_higher_ratio():
    gm, _ = traced(randomize_bn(BatchNormThenConv().eval(), (2, 3, 8, 8)), (2, 3, 8, 8))
    slim = create_pass("slim", ratio=0.0)
    result = slim(gm)
    assert slim.summary(result.record) == "slim removed nothing at ratio 0: raise the ratio to remove channels"


class BatchNormThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), \
            nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.bn1(self.conv1(x))))
