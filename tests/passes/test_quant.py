import copy
import json

import numpy as np
import pytest
import torch

from pyprune.api import load_model
from pyprune.cli import main
from pyprune.ir import PassManager, example_input, trace
from pyprune.opt import constraint_hooks
from pyprune.passes import build_pipeline, create_pass
from pyprune.passes.mask import weight_layers
from pyprune.passes.quant import codebooks, kmeans_1d, quantize_weight, tie_hooks
from pyprune.passes.quant import ste_projection as quant_ste

from .test_mask import ZOO, Tiny, one_thread, tune, weights, zoo_graph  # noqa: F401  (fixture)


def clusters(w: torch.Tensor):
    """(zero set, distinct non-zero values, cluster index of every non-zero weight)."""
    values, inverse = torch.unique(w[w != 0], return_inverse=True)
    return w == 0, values, inverse


def partition(inverse: torch.Tensor) -> torch.Tensor:
    """Cluster labels renumbered by first appearance: equal iff the groupings are equal,
    whatever the order of the values (centroids may cross while they train)."""
    _, first = np.unique(inverse.numpy(), return_index=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return torch.from_numpy(rank[inverse.numpy()])


def reference_kmeans(x: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """Lloyd's algorithm with deep compression's linear initialisation, by brute force."""
    c = np.linspace(x.min(), x.max(), k)
    for _ in range(iters):
        assign = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        new = np.array([x[assign == j].mean() for j in range(c.size) if (assign == j).any()])
        if new.shape == c.shape and np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c


def test_linear_init_recovers_three_known_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.5, 3.0])
    x = torch.cat([c + 0.01 * torch.randn(200, generator=g) for c in centres])
    x = x[torch.randperm(x.numel(), generator=g)]
    for init in ("linear", "density", "kmeans++"):
        c, labels = kmeans_1d(x, 3, init)
        assert torch.allclose(c.float(), centres, atol=0.005), init
        assert (c[labels] - x.double()).abs().max() < 0.05  # every value went to its own centre


@pytest.mark.parametrize("k", [2, 5, 16])
def test_kmeans_matches_a_brute_force_reference(k):
    x = np.random.default_rng(k).standard_t(3, size=500)  # heavy tails, like weights
    c, labels = kmeans_1d(torch.from_numpy(x), k)
    np.testing.assert_allclose(c.numpy(), reference_kmeans(x, k), rtol=0, atol=1e-9)
    assign = np.argmin(np.abs(x[:, None] - c.numpy()[None, :]), axis=1)
    assert np.array_equal(labels.numpy(), assign)  # a fixed point: each value at its nearest centroid


def test_kmeans_edge_cases_and_determinism():
    c, labels = kmeans_1d(torch.tensor([2.0, -1.0, 2.0, 7.0]), 8)  # fewer distinct values than k
    assert c.tolist() == [-1.0, 2.0, 7.0] and labels.tolist() == [1, 0, 1, 2]
    c, labels = kmeans_1d(torch.zeros(0), 4)
    assert c.numel() == 0 and labels.numel() == 0
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a, b, other = (kmeans_1d(x, 8, "kmeans++", seed=s)[0] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_quantize_weight_small_layers():
    w = torch.zeros(3, 4)
    assert quantize_weight(w, 2) == [] and torch.equal(w, torch.zeros(3, 4))  # all zero: untouched
    w = torch.tensor([[0.3]])
    assert quantize_weight(w, 1) == [pytest.approx(0.3)] and w.item() == pytest.approx(0.3)
    w = torch.tensor([0.0, 1.0, 0.0, 1.0, 2.5])
    assert quantize_weight(w, 3) == [1.0, 2.5] and w.tolist() == [0.0, 1.0, 0.0, 1.0, 2.5]
    # -1 and 1 share a centroid at exactly 0: it must not join the mask
    w = torch.tensor([-1.0, 1.0, 5.0, 6.0, 7.0, 0.0])
    codebook = quantize_weight(w, 1)
    assert 0.0 not in codebook and len(codebook) == 2 and torch.equal(w == 0, torch.tensor([0, 0, 0, 0, 0, 1.0]) == 1)
    assert w[2:5].tolist() == [6.0, 6.0, 6.0]


@pytest.mark.parametrize("arch", ZOO)
def test_after_mask_every_weight_is_zero_or_a_codebook_value(arch):
    gm = zoo_graph(arch)
    create_pass("mask", sparsity=0.8)(gm)
    zeros = {n: w == 0 for n, w in weights(gm).items()}
    twin = copy.deepcopy(gm)
    record = create_pass("quant", bits=5)(gm).record
    json.dumps(record)  # the record goes into the saved file's provenance
    assert set(record["layers"]) == set(zeros)
    for name, w in weights(gm).items():
        zero, values, _ = clusters(w)
        assert torch.equal(zero, zeros[name]), name
        info = record["layers"][name]
        assert info["bits"] == 5 and values.numel() == info["distinct"] <= 32
        assert values.tolist() == info["codebook"] == record["codebooks"][name]
        assert w.dtype == torch.float32 and 0.0 not in info["codebook"]
    create_pass("quant", bits=5)(twin)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(weights(gm).values(), weights(twin).values()))
    assert {n: v.tolist() for n, v in codebooks(gm, record).items()} == record["codebooks"]


def test_bits_by_kind_and_by_layer():
    gm = zoo_graph("resnet20")
    record = build_pipeline("quant(conv_bits=3,linear_bits=2,layers={'conv1':0,'layer1.0.conv1':1},"
                            "init=density)")[0](gm).record
    assert "conv1" not in record["layers"] and len(torch.unique(gm.conv1.weight)) == 432
    assert record["layers"]["layer1.0.conv1"]["distinct"] == 2
    assert record["layers"]["linear"]["bits"] == 2 and record["layers"]["linear"]["distinct"] <= 4
    assert record["layers"]["layer3.2.conv2"]["bits"] == 3 and record["layers"]["layer3.2.conv2"]["distinct"] <= 8


@pytest.mark.parametrize("options,message", [
    ({"bits": 17}, "bits"), ({"bits": 2.5}, "bits"), ({"init": "random"}, "init"), ({"iters": 0}, "iters"),
    ({"layers": {"nope": 4}}, "nope"), ({"conv_bits": -1}, "conv_bits"),
])
def test_refusals(options, message):
    with pytest.raises(ValueError, match=message):
        create_pass("quant", **options)(zoo_graph("resnet20"))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_tie_hooks_reduce_the_gradients_of_each_cluster(reduce):
    gm = trace(Tiny())
    with torch.no_grad():
        gm.conv.weight.copy_(torch.tensor([0.0, 0.5, -0.25, 1.0]).repeat(14)[:54].view(3, 2, 3, 3))
    hooks = tie_hooks(gm, ["conv"], reduce=reduce)
    gm(torch.randn(2, 2, 5, 5)).sum().backward()
    raw = gm.conv.weight.grad.clone().view(-1)
    for h in hooks.after_backward:
        h(gm)
    w, g = gm.conv.weight.detach().view(-1), gm.conv.weight.grad.view(-1)
    assert torch.all(g[w == 0] == 0)
    for v in (0.5, -0.25, 1.0):
        members = raw[w == v]
        expected = members.sum() if reduce == "sum" else members.mean()
        assert torch.allclose(g[w == v], expected.expand(members.numel()))
    with torch.no_grad():
        gm.conv.weight.add_(torch.randn(3, 2, 3, 3))
    for h in hooks.after_step:
        h(gm)
    zero, values, inverse = clusters(gm.conv.weight.detach().view(-1))
    assert torch.equal(zero, w == 0) and values.numel() == 3


def test_centroid_fine_tuning_keeps_clusters_and_masks():
    gm = zoo_graph("resnet20")
    passes = build_pipeline("mask(sparsity=0.8,regrow=False),quant(bits=4,grad=mean)")
    for p in passes:
        p(gm)
    before = {n: clusters(w) for n, w in weights(gm).items()}
    free = copy.deepcopy(gm)
    tune(gm, hooks=constraint_hooks(passes, gm))
    moved = 0
    for name, w in weights(gm).items():
        zero, values, inverse = clusters(w)
        assert torch.equal(zero, before[name][0]), name
        assert values.numel() <= 16 and torch.equal(partition(inverse), partition(before[name][2])), name
        moved += not torch.equal(values, before[name][1])
    assert moved > len(before) // 2  # the centroids did train
    record_layers = passes[1].quantized
    assert all(v.numel() <= 16 for v in codebooks(gm, record_layers).values())

    tune(free)  # without the hooks the sharing is lost at once
    assert all(clusters(w)[1].numel() > 16 for w in weights(free).values())


def test_straight_through_fine_tuning_moves_weights_between_clusters_and_keeps_the_bounds():
    """grad=ste: the zero set of a fixed mask and the number of values per layer hold,
    but weights change cluster (which tied clusters never allow), and the result is a
    fixed point of the projection."""
    gm = zoo_graph("resnet20")
    passes = build_pipeline("mask(sparsity=0.8,regrow=False),quant(bits=3)")
    for p in passes:
        p(gm)
    before = {n: clusters(w) for n, w in weights(gm).items()}
    hooks = constraint_hooks(passes, gm)
    assert len(hooks.projections) == 1 and not hooks.fixes_zeros
    tune(gm, hooks=hooks)
    regrouped = 0
    for name, w in weights(gm).items():
        zero, values, inverse = clusters(w)
        assert torch.equal(zero, before[name][0]), name
        assert values.numel() <= before[name][1].numel() <= 8, name
        regrouped += not torch.equal(partition(inverse), partition(before[name][2]))
    assert regrouped >= 1  # tied clusters never regroup; four steps from the centroids move a few
    projected = weights(gm)
    again = {n: w.clone() for n, w in projected.items()}
    hooks.projections[0].project(again)
    assert all(torch.equal(again[n], projected[n]) for n in hooks.projections[0].layers)


def test_straight_through_projection_by_hand():
    """Values (-1, 1); latent (0.2, -0.3, 0.9, 1.5, 0): assigned (1, 0, 1, 1), the values
    move to their members' means (-0.3, 2.6/3), then 0.2 is nearer -0.3 (the midpoint
    is 0.28): every weight takes its nearest new value, the zero stays."""
    gm = trace(Tiny())
    with torch.no_grad():
        gm.fc.weight.zero_()
        gm.fc.weight.view(-1)[:2] = torch.tensor([-1.0, 1.0])
    projection = quant_ste(gm, ["fc"])
    w = torch.zeros(4, 3)
    w.view(-1)[:5] = torch.tensor([0.2, -0.3, 0.9, 1.5, 0.0])
    weights_ = {"fc": w}
    projection.project(weights_)
    high = (0.2 + 0.9 + 1.5) / 3
    expected = torch.zeros(4, 3)
    expected.view(-1)[:5] = torch.tensor([-0.3, -0.3, high, high, 0.0])
    torch.testing.assert_close(weights_["fc"], expected, rtol=0, atol=1e-7)


def test_tied_clusters_cannot_follow_a_mask_that_regrows():
    gm = zoo_graph("resnet20")
    passes = build_pipeline("mask(sparsity=0.5),quant(bits=4,grad=mean)")
    for p in passes:
        p(gm)
    with pytest.raises(ValueError, match="regrow"):
        constraint_hooks(passes, gm)
    fixed = build_pipeline("mask(sparsity=0.5,regrow=False),quant(bits=4,grad=mean)")
    assert constraint_hooks(fixed, gm).fixes_zeros


def test_pipeline_runs_in_the_pass_manager():
    gm = zoo_graph("resnet20")
    result = PassManager(build_pipeline("mask(sparsity=0.8),quant(bits=5)"), (example_input((3, 32, 32)),),
                         check_numerics=True).run(gm)
    assert [s.name for s in result.stats] == ["input", "mask", "quant"]
    assert result.stats[1].record["achieved"] == pytest.approx(0.8, abs=1e-3)
    assert all(r["distinct"] <= 32 for r in result.stats[2].record["layers"].values())


def test_opt_end_to_end_mask_then_quant(capsys, data_root, tmp_path):
    out = tmp_path / "dc.pt"
    code = main(["opt", "--arch", "resnet20", "--passes", "mask(sparsity=0.8),quant(bits=5)", "--train-limit", "64",
                 "--batch-size", "32", "--finetune-epochs", "1", "--eval-split", "none", "--data-root",
                 str(data_root), "-o", str(out), "--json", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    steps = json.loads(stdout.strip().splitlines()[-1])["steps"]
    assert [s["name"] for s in steps] == ["input", "mask", "quant"]
    gm = load_model(str(out)).module
    names = weight_layers(gm)
    conv = [n for n in names if n != "linear"]
    zeros = sum(int((gm.get_submodule(n).weight == 0).sum()) for n in conv)
    assert zeros / sum(gm.get_submodule(n).weight.numel() for n in conv) == pytest.approx(0.8, abs=0.01)
    for n in names:  # the mask survived both fine-tunings exactly; each layer keeps <= 32 values
        zero, values, _ = clusters(gm.get_submodule(n).weight.detach())
        assert int(zero.sum()) == steps[1]["record"]["layers"][n]["zeros"], n
        assert values.numel() <= 32, n
