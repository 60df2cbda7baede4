"""export_onnx / export_onnx_forms: every zoo model compressed and exported in both
forms, checked, run at two batch sizes and verified; the compact form's codes
decoded back to the PyTorch weights bit for bit; errors."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import pyprune
from pyprune.api import LoadedModel, load_model
from pyprune.export import stored_codes
from pyprune.export import (FORMS, MIN_OPSET, OnnxExportError, export_onnx, export_onnx_forms, session,
                            verification_inputs, verify_onnx)
from pyprune.models.registry import available_models

from ..passes_helpers import compressed
from .models import images, probe, tiny, wobbly

ZOO_PIPELINE = "slim(ratio=0.3),mask(sparsity=0.7),quant(bits=4)"
ATOL = 1e-4


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def opset(proto):
    return {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"]


def trained_like(module: nn.Module, seed: int = 0) -> None:
    """Random BatchNorm gammas and betas, as training leaves them: slim then ranks
    channels by distinct gammas (not a tie of ones), and folding them is no no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))


@torch.no_grad()
def recalibrate(module: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics of the compressed model's own activations on
    ``x``: realistic, non-trivial statistics for the dense form to fold, and logits
    of a sane size even in 164 layers of random weights."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average
    module.train()
    module(x)
    module.eval()


# Models whose blocks CI checks in another model, the same blocks repeated fewer or more
# times (ResNet-32, -44 and -110 are ResNet-20's and -56's basic blocks; VGG-13 and -16
# are VGG-11's and -19's conv-BN-ReLU stages; ResNet-164 and DenseNet-100 have stand-ins
# in tests/export/models.py, 3 to 4x faster to export): the twins run with -m slow.
DEEP_TWINS = {"resnet32", "resnet44", "resnet110", "resnet164", "densenet100", "vgg13", "vgg16"}
SHALLOW_TWINS = ["tests.export.models:preresnet29", "tests.export.models:densenet_bc_shallow"]


@pytest.fixture(scope="module", params=[pytest.param(m, marks=pytest.mark.slow) if m in DEEP_TWINS else m
                                        for m in available_models()] + SHALLOW_TWINS)
def zoo(request):
    """A zoo model from a random initialisation, slimmed, masked and 4-bit quantized,
    exported in both forms by one torch.export. 2 s (ResNet-20) to 28 s (ResNet-164)
    on 2 cores."""
    model = load_model(arch=request.param, seed=0)
    trained_like(model.module)
    gm, books = compressed(model, ZOO_PIPELINE)
    recalibrate(gm, images(32, seed=1, shape=model.input_shape))
    forms = export_onnx_forms(gm, model.input_shape, ("dense", "compact"))
    with torch.no_grad():
        x = images(8, seed=2, shape=model.input_shape)
        logits = gm(x).numpy()
    return SimpleNamespace(name=request.param, model=model, gm=gm, books=books, forms=forms, x=x, logits=logits)


def test_zoo_checks_and_runs_at_any_batch(zoo):
    assert sorted(zoo.forms) == ["compact", "dense"]
    spread = zoo.logits.max(1) - np.sort(zoo.logits, 1)[:, -2]
    # No near-ties: logits within ATOL cannot change the top-1 class, so any top-1
    # difference below is an error, not rounding (random VGGs have small logits).
    assert spread.min() > 2 * ATOL
    for form, exported in zoo.forms.items():
        proto = exported.proto
        assert exported.form == form and proto.metadata_props and {p.key: p.value for p in proto.metadata_props}[
            "pyprune.form"] == form
        onnx.checker.check_model(proto, full_check=True)
        assert opset(proto) >= 17
        (inp,), (out,) = proto.graph.input, proto.graph.output
        assert (inp.name, out.name) == ("input", "logits")
        in_dims, out_dims = dims(inp), dims(out)
        assert isinstance(in_dims[0], str) and in_dims[0] and in_dims[1:] == list(zoo.model.input_shape)
        assert out_dims == [in_dims[0], 10]  # the same symbol: batch in, batch out
        sess = session(exported.serialized())
        for rows in ([0], [1, 5, 7]):
            got = sess.run(None, {"input": zoo.x[rows].numpy()})[0]
            want = zoo.logits[rows]
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{zoo.name} {form} batch {len(rows)}")
            assert np.array_equal(got.argmax(1), want.argmax(1))


def test_zoo_verifies(zoo):
    for form, exported in zoo.forms.items():
        v = verify_onnx(exported.serialized(), zoo.gm, zoo.x, atol=ATOL)
        assert v.passed, f"{zoo.name} {form}: {v.summary()}"
        assert v.n == 8 and v.top1_mismatches == 0 and v.max_abs_diff <= ATOL


def test_zoo_compact_codes_decode_to_the_weights_bit_for_bit(zoo):
    compact = zoo.forms["compact"]
    proto = compact.proto
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights = {layer: zoo.gm.get_submodule(layer).weight.detach().numpy() for layer in zoo.books}
    # One byte per code (two per byte up to 16 values) plus 4 per codebook entry against
    # 4 per weight: every quantized layer but the tiniest is smaller coded.
    def code_bytes(w):
        return (w.size + 1) // 2 if np.unique(w).size <= 16 else w.size

    smaller = {f"{layer}.weight" for layer, w in weights.items() if code_bytes(w) + 4 * np.unique(w).size < 4 * w.size}
    assert {t.name for t in compact.compact} == smaller
    assert all(f"{layer}.weight" in smaller for layer, w in weights.items() if w.size >= 64)
    for layer, w in weights.items():
        name = f"{layer}.weight"
        if name not in smaller:
            assert np.array_equal(inits[name], w)
            continue
        assert name not in inits
        codes, codebook = stored_codes(inits, name, w.shape), inits[f"{name}.codebook"]
        assert codes.dtype == np.uint8 and codes.shape == w.shape and codebook.dtype == np.float32
        # the codebook is the quant pass's codebook, after a zero where the weight has zeros
        book = zoo.books[layer].numpy()
        want = np.concatenate([[0.0], book]).astype(np.float32) if (w == 0).any() else book
        assert np.array_equal(codebook.view(np.uint32), want.view(np.uint32))
        decoded = codebook[codes.astype(np.int64)]
        assert np.array_equal(decoded.view(np.uint32), w.view(np.uint32)), name  # bit-exact
        gather = producer[name]
        cast = producer[gather.input[1]]
        assert (gather.op_type, list(gather.input)[0], cast.op_type, list(cast.input)) == (
            "Gather", f"{name}.codebook", "Cast", [f"{name}.codes"])
        assert [a.i for a in gather.attribute if a.name == "axis"] == [0]
        assert {(n.op_type, list(n.input).index(name)) for n in consumers[name]} <= {("Conv", 1), ("Gemm", 1)}
    dense = zoo.forms["dense"].proto
    assert not {"Cast", "Gather"} & {n.op_type for n in dense.graph.node}
    assert not any(t.name.endswith((".codes", ".codebook")) for t in dense.graph.initializer)


def test_zoo_compact_is_less_than_half_the_dense_bytes(zoo):
    """Codes take 1 byte where fp32 takes 4. The quantized weights are at least 85% of
    the dense file (checked), so coded they are under a quarter of it, which leaves
    the rest of a half for what the compact form adds or keeps: codebooks (<= 17
    floats a layer), BatchNorm left unfolded (4 floats a channel in place of a
    folded bias), other tensors and the graph. Measured: 0.25 (VGG) to 0.37
    (DenseNet-100) of the dense bytes."""
    dense, compact = zoo.forms["dense"].proto.ByteSize(), zoo.forms["compact"].proto.ByteSize()
    coded = zoo.forms["compact"].compact
    assert sum(t.fp32_bytes for t in coded) >= 0.85 * dense
    inits = {t.name: t for t in zoo.forms["compact"].proto.graph.initializer}
    codes = [inits.get(f"{t.name}.codes") or inits[f"{t.name}.packed"] for t in coded]
    assert all(c.data_type == onnx.TensorProto.UINT8 for c in codes)
    # a byte a weight, or a byte per two weights where the codebook has at most 16 entries
    assert sum(len(c.raw_data) for c in codes) == sum((int(np.prod(t.shape)) + 1) // 2 if t.code_dtype == "uint4x2"
                                                      else int(np.prod(t.shape)) for t in coded)
    assert compact < dense / 2


@pytest.mark.shared
def test_pretrained_resnet20_on_cifar_images(data_root, models_dir):
    """The published ResNet-20, compressed, on real CIFAR-10 validation images:
    both forms verify and give PyTorch's top-1 on every image."""
    from pyprune.data import load_dataset

    model = load_model(arch="resnet20", weights=str(models_dir / "resnet20-12fca82f.th"))
    gm, _ = compressed(model, "mask(sparsity=0.5),quant(bits=5)")
    x, description = verification_inputs(load_dataset("cifar10", "val", data_root=data_root, limit=64), 64,
                                          model.mean, model.std)
    with torch.no_grad():
        top1 = gm.eval()(x).argmax(1).numpy()
    labels = load_dataset("cifar10", "val", data_root=data_root, limit=64).labels.numpy()
    assert (top1 == labels).mean() > 0.7  # a working model, so the comparison is of real decisions
    for form, exported in export_onnx_forms(gm, model.input_shape).items():
        v = verify_onnx(exported.serialized(), gm, x, data=description)
        assert v.passed and v.n == 64 and v.data == "cifar10/val[:64]", v.summary()
        assert np.array_equal(session(exported.serialized()).run(None, {"input": x.numpy()})[0].argmax(1), top1)


# ---- options and details ---------------------------------------------------------------


def test_dense_folds_batchnorm_into_the_conv():
    module = probe().eval()
    proto = export_onnx(module, (3, 32, 32), "dense").proto
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    (conv,) = [n for n in proto.graph.node if n.op_type == "Conv"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    bn = module.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    want_w = (module.conv.weight.detach() * scale.view(-1, 1, 1, 1)).numpy()
    want_b = (bn.bias - bn.running_mean * scale).detach().numpy()
    np.testing.assert_allclose(inits[conv.input[1]], want_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(inits[conv.input[2]], want_b, rtol=1e-6, atol=1e-7)


def test_compact_keeps_batchnorm_after_a_coded_conv():
    model = LoadedModel(tiny(), "tiny")
    gm, books = compressed(model, "quant(bits=4)")
    exported = export_onnx(gm, (3, 32, 32), "compact")
    ops = [n.op_type for n in exported.proto.graph.node]
    assert ops.count("BatchNormalization") == 2 and ops.count("Gather") == len(books) == 3
    assert verify_onnx(exported.serialized(), gm, images(8)).passed


def test_opset_17_and_metadata_and_training_mode():
    module = probe().train()
    meta = {"arch": "probe", "mean": [0.5, 0.5, 0.5], "input_shape": [3, 32, 32]}
    exported = export_onnx(module, (3, 32, 32), "dense", opset=17, meta=meta)
    assert module.training  # given back as it was
    assert exported.opset == 17 and opset(exported.proto) == 17
    onnx.checker.check_model(exported.proto, full_check=True)
    props = {p.key: p.value for p in exported.proto.metadata_props}
    assert props == {"pyprune.version": pyprune.__version__, "pyprune.form": "dense", "pyprune.arch": '"probe"',
                     "pyprune.mean": "[0.5, 0.5, 0.5]", "pyprune.input_shape": "[3, 32, 32]"}
    assert {k: json.loads(props[f"pyprune.{k}"]) for k in meta} == meta
    assert verify_onnx(exported.serialized(), module, images(4)).passed


@pytest.mark.parametrize("form", FORMS)
def test_the_same_model_exports_to_the_same_bytes(form):
    model = LoadedModel(tiny(), "tiny")
    gm, _ = compressed(model, "mask(sparsity=0.5),quant(bits=4)")
    first = export_onnx(gm, (3, 32, 32), form).serialized()
    again = export_onnx_forms(gm, (3, 32, 32))[form].serialized()  # one export for both forms: same file
    assert first == again


def test_sparse_initializers_option():
    model = LoadedModel(tiny(), "tiny")
    gm, _ = compressed(model, "mask(sparsity=0.95),quant(bits=4)")
    exported = export_onnx(gm, (3, 32, 32), "compact", sparse_initializers=True)
    proto = exported.proto
    sparse = {s.values.name for s in proto.graph.sparse_initializer}
    assert sparse and sparse == {f"{t.name}.codes" for t in exported.compact if t.sparse}
    for t in exported.compact:  # sparse exactly where uint8 value + int64 index per non-zero is smaller
        w = gm.get_submodule(t.name.removesuffix(".weight")).weight.detach().numpy()
        assert t.sparse == (np.count_nonzero(w) * 9 < w.size)
    d = exported.to_dict()
    assert d["sparse_initializers"] == len(sparse) and d["codebook_tensors"] == len(exported.compact)
    assert d["weights_bytes"] < d["weights_fp32_bytes"] / 4
    onnx.checker.check_model(proto)
    v = verify_onnx(exported.serialized(), gm, images(8), atol=ATOL)
    assert v.passed, v.summary()


# ---- errors ----------------------------------------------------------------------------


def test_an_op_with_no_onnx_mapping_is_named():
    with pytest.raises(OnnxExportError) as info:
        export_onnx(wobbly(), (3, 32, 32))
    message = str(info.value)
    assert "operator pyprune_test.wobble" in message and "no ONNX mapping at opset 18" in message


@pytest.mark.parametrize("bad", [16, MIN_OPSET - 1, 17.0, "18", True])
def test_opsets_below_17_or_not_integers_are_refused_before_exporting(bad):
    # wobbly() cannot be exported: a ValueError (not OnnxExportError) shows the check comes first
    with pytest.raises(ValueError, match=f"opset must be an integer >= {MIN_OPSET}"):
        export_onnx(wobbly(), (3, 32, 32), "dense", opset=bad)


def test_unknown_forms_are_refused():
    with pytest.raises(ValueError, match="form must be one of dense, compact"):
        export_onnx_forms(wobbly(), (3, 32, 32), ("dense", "sparse"))
    assert FORMS == ("dense", "compact")
