import copy

import numpy as np
import pytest
import torch
from torch import nn

from pyprune.data import ArrayDataset
from pyprune.encode import load_graph_module, save_graph_module
from pyprune.ir import PassManager, example_input, trace
from pyprune.models import build_model
from pyprune.passes import build_pipeline, create_pass
from pyprune.passes.mask import GradualMask, MaskPass, cubic_sparsity, mask_hooks, sensitivity_scan, weight_layers
from pyprune.train import TrainConfig, fine_tune

ZOO = ["resnet20", "vgg11", "densenet40"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny workloads: one intra-op thread avoids waiting on busy cores (5x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zoo_graph(arch: str):
    torch.manual_seed(0)
    return trace(build_model(arch))


def weights(gm, names=None):
    return {n: gm.get_submodule(n).weight.detach().clone() for n in (names or weight_layers(gm))}


def tiny_set(n: int = 64, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (n,), generator=g), "tiny")


def tune(gm, hooks=None, epochs=2):
    """A few SGD steps with momentum and weight decay (64 images, batch 32)."""
    config = TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=32, progress=False)
    fine_tune(gm, tiny_set(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), config, hooks=hooks)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("arch", ZOO)
def test_layer_scope_zeroes_exactly_round_s_n_smallest_per_layer(arch):
    gm = zoo_graph(arch)
    before = weights(gm)
    others = {k: v.clone() for k, v in gm.state_dict().items() if k.removesuffix(".weight") not in before}
    result = create_pass("mask", sparsity=0.7, scope="layer")(gm)
    after = weights(gm)
    for name, w in before.items():
        n = w.numel()
        zero = after[name] == 0
        assert int(zero.sum()) == round(0.7 * n), name
        assert torch.equal(after[name][~zero], w[~zero])  # the survivors are untouched
        if zero.any() and (~zero).any():
            assert w[zero].abs().max() <= w[~zero].abs().min()  # the smallest went
        assert result.record["layers"][name]["zeros"] == int(zero.sum())
    for k, v in others.items():  # biases, BatchNorm
        assert torch.equal(gm.state_dict()[k], v), k
    assert result.record["achieved"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("arch", ZOO)
def test_global_scope_is_one_threshold_matching_numpy(arch):
    gm = zoo_graph(arch)
    before = weights(gm)
    result = create_pass("mask", sparsity=0.8)(gm)
    flat = np.concatenate([w.numpy().ravel() for w in before.values()])
    k = round(0.8 * flat.size)
    ordered = np.sort(np.abs(flat))
    threshold = ordered[k - 1]
    assert ordered[k] > threshold  # random weights: no tie at the threshold
    assert result.record["threshold"] == pytest.approx(float(threshold))
    total_zeros = 0
    for name, w in before.items():
        got = gm.get_submodule(name).weight.detach().numpy() == 0
        want = np.abs(w.numpy()) <= threshold
        assert np.array_equal(got, want), name
        total_zeros += int(got.sum())
    assert total_zeros == k and result.record["achieved"] == pytest.approx(0.8, abs=1e-6)
    layer_sparsities = [r["sparsity"] for r in result.record["layers"].values()]
    assert min(layer_sparsities) < 0.8 < max(layer_sparsities)  # global: layers differ


def test_ties_are_broken_by_index_and_existing_zeros_count_first():
    gm = trace(Tiny())
    with torch.no_grad():
        gm.conv.weight.fill_(0.5)
        gm.conv.weight.view(-1)[[7, 30]] = 0.0
        gm.fc.weight.fill_(-1.0)
    create_pass("mask", sparsity=0.35, scope="layer")(gm)
    conv = gm.conv.weight.detach().view(-1)
    k = round(0.35 * 54)  # 19
    zero = torch.nonzero(conv == 0).view(-1).tolist()
    assert len(zero) == k
    assert zero == sorted([7, 30] + [i for i in range(54) if i not in (7, 30)][:k - 2])
    fc = gm.fc.weight.detach().view(-1)
    assert torch.nonzero(fc == 0).view(-1).tolist() == list(range(round(0.35 * 12)))
    # never un-prunes: asking for less than is there keeps what is there
    create_pass("mask", sparsity=0.1, scope="layer")(gm)
    assert int((gm.conv.weight == 0).sum()) == k


def test_overrides_min_params_and_include():
    gm = zoo_graph("resnet20")
    before = weights(gm)
    p = create_pass("mask", sparsity=0.5, scope="layer", layers={"conv1": 0.25}, min_params=5000)
    record = p(gm).record
    assert record["layers"]["conv1"]["zeros"] == round(0.25 * 432) and record["layers"]["conv1"]["by"] == "override"
    assert "linear" not in record["layers"]  # 640 < min_params
    assert torch.equal(gm.linear.weight, before["linear"])
    assert record["layers"]["layer3.2.conv2"]["zeros"] == round(0.5 * before["layer3.2.conv2"].numel())

    gm = zoo_graph("resnet20")
    record = build_pipeline("mask(sparsity=0.9,include=linear)")[0](gm).record
    assert list(record["layers"]) == ["linear"]
    assert torch.equal(gm.conv1.weight, before["conv1"])


@pytest.mark.parametrize("options,message", [
    ({"sparsity": 1.5}, "sparsity"), ({"scope": "net"}, "scope"), ({"include": "bn"}, "include"),
    ({"layers": {"nope": 0.5}}, "nope"), ({"min_params": -1}, "min_params"), ({"ratio": 0.5}, "bad options"),
])
def test_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        create_pass("mask", **options)(zoo_graph("resnet20"))


def test_masks_survive_save_and_load(tmp_path):
    gm = zoo_graph("resnet20")
    create_pass("mask", sparsity=0.8)(gm)
    zeros = {n: w == 0 for n, w in weights(gm).items()}
    path = save_graph_module(gm, tmp_path / "m.pt")
    loaded, _ = load_graph_module(path)
    for n, z in zeros.items():
        assert torch.equal(loaded.get_submodule(n).weight.detach() == 0, z)


def test_hooks_keep_masked_weights_exactly_zero_through_sgd():
    gm = zoo_graph("resnet20")
    p = create_pass("mask", sparsity=0.8, regrow=False)
    p(gm)
    mask = {n: w == 0 for n, w in weights(gm).items()}
    free = copy.deepcopy(gm)
    tune(gm, hooks=p.training_hooks(gm))
    after = weights(gm)
    for n, z in mask.items():
        assert torch.all(after[n][z] == 0), n
    assert sum(int((after[n] != 0).sum()) for n in mask) == sum(int((~z).sum()) for z in mask.values())
    assert not torch.equal(after["layer2.0.conv1"], weights(free)["layer2.0.conv1"])  # it did train

    tune(free)  # the same training without the hooks revives masked weights
    revived = sum(int((weights(free)[n][z] != 0).sum()) for n, z in mask.items())
    assert revived > 0.5 * sum(int(z.sum()) for z in mask.values())


@pytest.mark.parametrize("options", [dict(sparsity=0.8), dict(sparsity=0.6, scope="layer", layers={"linear": 0.3})])
def test_regrowth_keeps_the_rule_and_its_exact_count_through_sgd(options):
    """Straight-through fine-tuning: every step ends with the pass's own rule applied to
    the latent weights, so the result is a fixed point of the pass (applying it again
    changes nothing), each rule keeps its exact count, and pruned weights did return."""
    gm = zoo_graph("resnet20")
    p = create_pass("mask", **options)
    p(gm)
    before = weights(gm)
    hooks = p.training_hooks(gm)
    assert hooks.projections and not hooks.after_step  # no hook pins the zeros
    tune(gm, hooks=hooks)
    after = weights(gm)
    again = copy.deepcopy(gm)
    create_pass("mask", **options)(again)
    for n, w in after.items():
        assert torch.equal(again.get_submodule(n).weight, w), n
    ruled = [n for n in after if n not in options.get("layers", {})]
    if options.get("scope") == "layer":
        for n in ruled:
            assert int((after[n] == 0).sum()) == round(options["sparsity"] * after[n].numel()), n
    else:
        total = sum(after[n].numel() for n in ruled)
        assert sum(int((after[n] == 0).sum()) for n in ruled) == round(options["sparsity"] * total)
    for n, s in options.get("layers", {}).items():
        assert int((after[n] == 0).sum()) == round(s * after[n].numel())
    returned = sum(int(((before[n] == 0) & (after[n] != 0)).sum()) for n in after)
    assert returned > 0


def test_regrowth_by_hand_a_pruned_weight_that_outgrows_a_kept_one_returns():
    """One SGD step (lr 1, no momentum or decay) on a 4-weight layer at sparsity 0.5: the
    latent weights are the kept ones minus the gradient, the pruned ones (latent 0)
    minus theirs; the two largest |latent| are kept."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.0, -0.4, 0.0]]))
    gm = trace(nn.Sequential(layer))
    p = create_pass("mask", sparsity=0.5)
    p(gm)
    assert torch.equal(gm.get_submodule("0").weight, torch.tensor([[0.5, 0.0, -0.4, 0.0]]))
    x = torch.tensor([[1.0, -2.0, 1.0, 0.1]])
    grad = x.clone()  # d(sum(w * x))/dw
    latent = torch.tensor([[0.5, 0.0, -0.4, 0.0]]) - grad  # [-0.5, 2.0, -1.4, -0.1]
    hooks = p.training_hooks(gm)
    from pyprune.train import LatentWeights  # the engine's straight-through step, driven by hand
    state = LatentWeights(gm, hooks.projections)
    gm(x).sum().backward()
    state.before_step()
    torch.optim.SGD(gm.parameters(), lr=1.0).step()
    state.after_step()
    assert torch.equal(state.latent["0"], latent)
    assert torch.equal(gm.get_submodule("0").weight.detach(), torch.tensor([[0.0, 2.0, -1.4, 0.0]]))


def test_mask_hooks_capture_at_call_time_and_zero_gradients():
    torch.manual_seed(0)
    gm = trace(Tiny())
    with torch.no_grad():
        gm.conv.weight.view(-1)[:10] = 0
    hooks = mask_hooks(gm, ["conv", "fc"])  # fc is dense: no mask to keep
    gm(torch.randn(2, 2, 5, 5)).sum().backward()
    fc_grad = gm.fc.weight.grad.clone()
    for h in hooks.after_backward:
        h(gm)
    assert torch.all(gm.conv.weight.grad.view(-1)[:10] == 0) and torch.all(gm.conv.weight.grad.view(-1)[10:] != 0)
    # a dense layer's gradient is left exactly as it was (some entries may be zero on their
    # own: a ReLU channel dead on this batch of two)
    assert torch.equal(gm.fc.weight.grad, fc_grad)
    with torch.no_grad():
        gm.conv.weight.add_(1.0)
    for h in hooks.after_step:
        h(gm)
    assert torch.all(gm.conv.weight.view(-1)[:10] == 0) and torch.all(gm.conv.weight.view(-1)[10:] != 0)


def test_sensitivity_scan_prunes_one_layer_at_a_time_on_a_copy():
    gm = trace(Tiny())
    original = copy.deepcopy(gm.state_dict())
    seen = []

    def fake_accuracy(model):  # the fraction of non-zero weights of the whole model
        seen.append(model)
        ws = [model.get_submodule(n).weight for n in ("conv", "fc")]
        return sum(int((w != 0).sum()) for w in ws) / sum(w.numel() for w in ws)

    scan = sensitivity_scan(gm, fake_accuracy, sparsities=(0.5, 0.9))
    assert list(scan) == ["conv", "fc"]
    total = 54 + 12
    assert scan["conv"] == [(0.5, (total - 27) / total), (0.9, (total - round(0.9 * 54)) / total)]
    assert scan["fc"] == [(0.5, (total - 6) / total), (0.9, (total - round(0.9 * 12)) / total)]
    assert all(m is not gm for m in seen)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, original[k])
    assert list(sensitivity_scan(gm, fake_accuracy, (0.5,), layers=["fc"])) == ["fc"]


def test_pipeline_runs_in_the_pass_manager():
    gm = zoo_graph("resnet20")
    result = PassManager(build_pipeline("mask(sparsity=0.6,scope=layer)"), (example_input((3, 32, 32)),),
                         check_numerics=True).run(gm)
    assert [s.name for s in result.stats] == ["input", "mask"]
    assert result.stats[1].record["achieved"] == pytest.approx(0.6, abs=1e-3)


def test_mask_and_quant_reach_the_layers_inside_a_leaf_module():
    """A leaf module (--leaf-module) is one opaque call to fx and a barrier to the
    channel analysis, but its Conv and Linear weights are still pruned and shared."""
    from pyprune.analysis import analyze_channels
    from pyprune.ir import propagate_shapes

    from ..ir.test_trace import LeafNet

    gm = propagate_shapes(trace(LeafNet(), leaf_modules=["GatedConv"]), torch.randn(2, 3, 8, 8))
    assert weight_layers(gm) == ["conv1", "gated.conv", "fc"]
    inner = gm.gated.conv.weight
    create_pass("mask", sparsity=0.5, scope="layer")(gm)
    assert int((inner == 0).sum()) == round(0.5 * inner.numel())
    create_pass("quant", bits=2)(gm)
    assert torch.unique(inner[inner != 0]).numel() <= 4 and int((inner == 0).sum()) == round(0.5 * inner.numel())
    bn_group = analyze_channels(gm).group_of("bn1", 0)
    assert not bn_group.prunable and "barrier 'gated' (GatedConv)" in bn_group.reason


def test_cubic_schedule_by_hand():
    assert cubic_sparsity(0.0, 0.8, 0.0) == 0.0 and cubic_sparsity(0.0, 0.8, 1.0) == 0.8
    assert cubic_sparsity(0.0, 0.8, 0.5) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert cubic_sparsity(0.4, 0.8, 0.25) == pytest.approx(0.8 - 0.4 * 0.75 ** 3)
    assert cubic_sparsity(0.2, 0.6, -1.0) == 0.2 and cubic_sparsity(0.2, 0.6, 2.0) == 0.6  # clipped


def zero_sets(gm):
    return {n: w == 0 for n, w in weights(gm).items()}


def test_gradual_mask_follows_the_cubic_schedule_and_never_gives_zeros_back():
    """16 steps, the first 12 a ramp with 4 prunings (after steps 3, 6, 9, 12): after
    each, the global zero count is round(cubic * N) exactly, the zeros so far stay
    zero, and from step 12 on the zeros are the pass's own (round(0.8 N))."""
    gm = zoo_graph("resnet20")
    names = weight_layers(gm)
    total = sum(gm.get_submodule(n).weight.numel() for n in names)
    gradual = GradualMask(MaskPass(0.8), gm, ramp=0.75, prunings=4)
    seen = []
    hooks = gradual.hooks()
    hooks.after_step.append(lambda model: seen.append(zero_sets(model)))
    tune(gm, hooks=hooks, epochs=8)  # 64 images, batch 32: 16 steps
    assert len(seen) == 16
    counts = [sum(int(z.sum()) for z in step.values()) for step in seen]
    want = {3: cubic_sparsity(0, 0.8, 0.25), 6: cubic_sparsity(0, 0.8, 0.5), 9: cubic_sparsity(0, 0.8, 0.75),
            12: 0.8}
    for step, share in want.items():
        assert counts[step - 1] == round(share * total), step
    assert counts[:2] == [0, 0] and len(set(counts[11:])) == 1  # nothing before the first pruning or after the last
    for before, after in zip(seen, seen[1:]):
        assert all(torch.all(after[n][z]) for n, z in before.items())  # a zero stays a zero
    assert gradual.record["zeros"] == round(0.8 * total) and gradual.finish(gm) is gradual.record


def test_gradual_mask_with_one_pruning_at_the_end_is_training_then_the_pass():
    a, b = zoo_graph("resnet20"), zoo_graph("resnet20")
    gradual = GradualMask(MaskPass(0.6, scope="layer"), a, ramp=1.0, prunings=1)
    tune(a, hooks=gradual.hooks(), epochs=2)
    tune(b, epochs=2)
    MaskPass(0.6, scope="layer").call(b)
    for n, w in weights(b).items():
        assert torch.equal(weights(a)[n], w), n


def test_gradual_mask_starts_from_the_zeros_there_and_ramps_overrides_to_their_own_count():
    gm = zoo_graph("resnet20")
    MaskPass(0.3).call(gm)
    start = zero_sets(gm)
    gradual = GradualMask(MaskPass(0.7, layers={"linear": 0.9}), gm, prunings=3)
    first = []
    hooks = gradual.hooks()
    hooks.after_step.append(lambda model: first.append(int((model.linear.weight == 0).sum())) if not first else None)
    tune(gm, hooks=hooks, epochs=8)
    end = zero_sets(gm)
    assert all(torch.all(end[n][z]) for n, z in start.items())
    n_linear = gm.linear.weight.numel()
    assert int(end["linear"].sum()) == round(0.9 * n_linear)
    assert first == [int(start["linear"].sum())]  # the first step prunes nothing: the ramp starts where it is
    ruled = [n for n in end if n != "linear"]
    assert sum(int(end[n].sum()) for n in ruled) == round(0.7 * sum(end[n].numel() for n in ruled))


def test_gradual_mask_refusals():
    gm = zoo_graph("resnet20")
    with pytest.raises(ValueError, match="ramp"):
        GradualMask(MaskPass(0.5), gm, ramp=0.0)
    with pytest.raises(ValueError, match="prunings"):
        GradualMask(MaskPass(0.5), gm, prunings=0)
