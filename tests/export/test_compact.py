"""The compact form's pieces: codebook_encoding, encode_codebooks (before graph ->
expected graph, compared structurally) and sparsify_initializers."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyprune.export import codebook_encoding, encode_codebooks, session, sparsify_initializers

OPSET = 18


def quantized(shape, book, density=None, seed=0):
    """A weight whose values are drawn from ``book`` (zero, if in it, with
    probability 1 - density), and the codes that produced it."""
    rng = np.random.default_rng(seed)
    book = np.asarray(book, np.float32)
    codes = rng.integers(1 if density is not None else 0, len(book), shape)
    if density is not None:
        codes[rng.random(shape) >= density] = 0
    return book[codes], codes


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ---- codebook_encoding ---------------------------------------------------------------


@pytest.mark.parametrize("book", [
    [0.0, -0.5, 0.25, 1.0],                                        # zero first already
    [-3.0, -1e-30, 0.0, 1e-38, 7.5],                               # zero in the middle, denormal-ish
    np.linspace(-1, 1, 255, dtype=np.float32),                     # 255 values, no exact zero
])
def test_codebook_encoding_is_an_exact_round_trip(book):
    weight, _ = quantized((8, 4, 3, 3), book)
    codebook, codes = codebook_encoding(weight)
    assert codebook.dtype == np.float32 and codes.dtype == np.uint8 and codes.shape == weight.shape
    assert np.array_equal(bits(codebook[codes]), bits(weight))  # bit-exact, not merely close
    present = np.unique(weight)
    assert codebook.size == present.size  # no unused entries
    nonzero = present[present != 0]
    want = np.concatenate([[0.0], nonzero]) if (weight == 0).any() else nonzero
    assert np.array_equal(codebook, want.astype(np.float32))  # zero first, then ascending


def test_zero_is_code_zero_exactly_where_the_weight_is_zero():
    weight, _ = quantized((16, 8, 3, 3), [0.0, -0.7, -0.1, 0.3, 0.9], density=0.2)
    codebook, codes = codebook_encoding(weight)
    assert codebook[0] == 0.0 and not np.signbit(codebook[0])
    assert np.array_equal(codes == 0, weight == 0)
    assert 0.15 < np.count_nonzero(codes) / codes.size < 0.25


def test_negative_zero_is_code_zero_too():
    # A pruning mask multiplied into a negative weight leaves -0.0: it compares equal
    # to 0.0, so it is code 0; the round trip is exact by value (-0.0 == 0.0).
    weight = np.array([[-0.0, 0.5, 0.0, -0.25] * 4] * 4, np.float32)
    codebook, codes = codebook_encoding(weight)
    assert np.array_equal(codes == 0, weight == 0) and np.array_equal(codebook[codes], weight)


def test_code_dtype_follows_the_number_of_distinct_values():
    def distinct(k, n, seed=0):
        w = np.random.default_rng(seed).permutation(np.resize(np.arange(1, k + 1, dtype=np.float32), n))
        assert np.unique(w).size == k
        return w

    assert codebook_encoding(distinct(256, 4096))[1].dtype == np.uint8     # the most one byte holds
    assert codebook_encoding(distinct(257, 4096))[1].dtype == np.uint16    # one more needs two
    w = distinct(1 << 16, 140_000)                                          # 2 * 140000 + 4 * 65536 < 4 * 140000
    codebook, codes = codebook_encoding(w)
    assert codes.dtype == np.uint16 and np.array_equal(codebook[codes], w)
    assert codebook_encoding(distinct((1 << 16) + 1, 140_000)) is None     # past uint16
    assert codebook_encoding(distinct(300, 500)) is None                    # 2 * 500 + 4 * 300 >= 4 * 500


def test_not_smaller_than_fp32_means_none():
    rng = np.random.default_rng(0)
    assert codebook_encoding(rng.standard_normal((3, 3)).astype(np.float32)) is None  # unquantized
    # n + 4k against 4n bytes: n = 4, k = 3 is a tie (16 = 16): not smaller
    assert codebook_encoding(np.array([0.0, 1.0, 2.0, 2.0], np.float32)) is None
    # n = 8, k = 5: 28 < 32 bytes
    w = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 0.0], np.float32)
    codebook, codes = codebook_encoding(w)
    assert np.array_equal(codebook[codes], w) and codes.nbytes + codebook.nbytes < w.nbytes


# ---- encode_codebooks: before graph -> expected graph --------------------------------


def make_model(nodes, initializers, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def structure(model: onnx.ModelProto):
    """What two graphs must share to be the same graph: nodes in order (op, inputs,
    outputs, attributes; not node names), initializers by name with dtype, shape and
    bytes, graph inputs and outputs."""
    g = model.graph
    nodes = [(n.domain or "", n.op_type, list(n.input), list(n.output),
              {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in g.node]
    inits = {}
    for t in g.initializer:
        a = numpy_helper.to_array(t)
        inits[t.name] = (a.dtype.str, a.shape, a.tobytes())
    return nodes, inits, [i.name for i in g.input], [o.name for o in g.output]


def assert_same_graph(actual, expected):
    a_nodes, a_inits, a_in, a_out = structure(actual)
    e_nodes, e_inits, e_in, e_out = structure(expected)
    assert a_nodes == e_nodes
    assert sorted(a_inits) == sorted(e_inits)
    for name in e_inits:
        assert a_inits[name] == e_inits[name], name
    assert (a_in, a_out) == (e_in, e_out)


def encode(model: onnx.ModelProto, nibbles: bool = False):
    """The byte form by default: most graphs below are its before/expected pairs."""
    ir_model = ir.serde.deserialize_model(model)
    tensors = encode_codebooks(ir_model, nibbles=nibbles)
    return ir.serde.serialize_model(ir_model), tensors


def rebuild(name):
    """The nodes the compact form puts in front of a coded weight ``name``."""
    return [helper.make_node("Cast", [f"{name}.codes"], [f"{name}.indices"], to=TensorProto.INT32),
            helper.make_node("Gather", [f"{name}.codebook", f"{name}.indices"], [name], axis=0)]


BOOK = np.array([0.0, -0.5, 0.25, 1.0], np.float32)  # already zero first, then ascending


def conv_gemm_graphs():
    """before: Conv(W quantized) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(G,
    quantized) -> MatMul(M, unquantized, small). expected: W and G rebuilt by Cast +
    Gather from W.codes/W.codebook, G.codes/G.codebook; M, the bias and the rest
    untouched."""
    w, w_codes = quantized((4, 2, 3, 3), BOOK, seed=1)
    g_book = np.array([0.0, -2.0, 3.0], np.float32)
    g, g_codes = quantized((6, 4), g_book, seed=2)
    m = np.random.default_rng(3).standard_normal((6, 2)).astype(np.float32)
    b = np.arange(4, dtype=np.float32)

    def body(prefix):
        return [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                helper.make_node("Flatten", ["p"], ["f"]),
                *prefix("G"),
                helper.make_node("Gemm", ["f", "G"], ["h"], transB=1),
                helper.make_node("MatMul", ["h", "M"], ["y"])]

    io = ([tensor_info("x", ["N", 2, 5, 5])], [tensor_info("y", ["N", 2])])
    common = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(m, "M")]
    before = make_model(body(lambda name: []), [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G"),
                                                *common], *io)
    expected_nodes = body(rebuild)
    expected_nodes[0:0] = rebuild("W")
    expected = make_model(expected_nodes, [
        numpy_helper.from_array(w_codes.astype(np.uint8), "W.codes"), numpy_helper.from_array(BOOK, "W.codebook"),
        numpy_helper.from_array(g_codes.astype(np.uint8), "G.codes"), numpy_helper.from_array(g_book, "G.codebook"),
        *common], *io)
    return before, expected


def test_encode_codebooks_gives_the_expected_graph():
    before, expected = conv_gemm_graphs()
    after, tensors = encode(before)
    assert_same_graph(after, expected)
    onnx.checker.check_model(after, full_check=True)
    assert [(t.name, t.shape, t.codebook_size, t.code_dtype, t.fp32_bytes, t.bytes) for t in tensors] == [
        ("W", (4, 2, 3, 3), 4, "uint8", 72 * 4, 72 + 4 * 4), ("G", (6, 4), 3, "uint8", 24 * 4, 24 + 3 * 4)]
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 5)).astype(np.float32)
    run = lambda model: session(model.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    assert np.array_equal(run(after), run(before))  # the same weights, so the same arithmetic


@pytest.mark.parametrize("op,w_shape,x_shape,y_shape", [
    ("Conv", (4, 2, 3, 3), ["N", 2, 5, 5], ["N", 4, 3, 3]),
    ("ConvTranspose", (2, 4, 3, 3), ["N", 2, 5, 5], ["N", 4, 7, 7]),
    ("Gemm", (5, 6), ["N", 5], ["N", 6]),
    ("MatMul", (5, 6), ["N", 5], ["N", 6]),
])
def test_every_weight_op_is_coded(op, w_shape, x_shape, y_shape):
    w, codes = quantized(w_shape, BOOK, seed=4)
    before = make_model([helper.make_node(op, ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")],
                        [tensor_info("x", x_shape)], [tensor_info("y", y_shape)])
    expected = make_model([*rebuild("W"), helper.make_node(op, ["x", "W"], ["y"])],
                          [numpy_helper.from_array(codes.astype(np.uint8), "W.codes"),
                           numpy_helper.from_array(BOOK, "W.codebook")],
                          [tensor_info("x", x_shape)], [tensor_info("y", y_shape)])
    after, _ = encode(before)
    assert_same_graph(after, expected)


def test_a_weight_shared_by_two_convs_is_rebuilt_once():
    w, codes = quantized((2, 2, 3, 3), BOOK, seed=5)
    convs = [helper.make_node("Conv", ["x", "W"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W"], ["y"], pads=[1, 1, 1, 1])]
    io = ([tensor_info("x", ["N", 2, 4, 4])], [tensor_info("y", ["N", 2, 4, 4])])
    before = make_model(convs, [numpy_helper.from_array(w, "W")], *io)
    expected = make_model([*rebuild("W"), *convs], [numpy_helper.from_array(codes.astype(np.uint8), "W.codes"),
                                                    numpy_helper.from_array(BOOK, "W.codebook")], *io)
    after, tensors = encode(before)
    assert_same_graph(after, expected)
    assert [t.name for t in tensors] == ["W"]


def test_a_weight_read_before_its_conv_is_rebuilt_before_that_read():
    # W feeds a ReduceSum that comes before the Conv in graph order: the rebuilt W
    # must exist before its first reader, or the graph is not topologically sorted.
    w, codes = quantized((4, 2, 3, 3), BOOK, seed=6)
    rest = [helper.make_node("ReduceSum", ["W"], ["s"], keepdims=0),
            helper.make_node("Conv", ["x", "W"], ["c"]),
            helper.make_node("Add", ["c", "s"], ["y"])]
    io = ([tensor_info("x", ["N", 2, 5, 5])], [tensor_info("y", ["N", 4, 3, 3])])
    before = make_model(rest, [numpy_helper.from_array(w, "W")], *io)
    expected = make_model([*rebuild("W"), *rest], [numpy_helper.from_array(codes.astype(np.uint8), "W.codes"),
                                                   numpy_helper.from_array(BOOK, "W.codebook")], *io)
    after, _ = encode(before)
    assert_same_graph(after, expected)
    onnx.checker.check_model(after, full_check=True)


def test_what_is_left_alone():
    """Unchanged: a weight that is also a graph input (the caller may override it), a
    non-float32 weight, a quantized tensor that is not a weight (Add's input), and an
    unquantized weight whose codebook would not be smaller."""
    w, _ = quantized((4, 2, 3, 3), BOOK, seed=7)
    d = w.astype(np.float64)
    a, _ = quantized((1, 4, 3, 3), BOOK, seed=8)
    u = np.random.default_rng(9).standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "Win"], ["c1"]),
             helper.make_node("Conv", ["xd", "D"], ["c2"]),
             helper.make_node("Cast", ["c2"], ["c2f"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["c1", "c2f"], ["s"]),
             helper.make_node("Add", ["s", "A"], ["t"]),
             helper.make_node("Conv", ["t", "U"], ["y"])]
    inputs = [tensor_info("x", ["N", 2, 5, 5]), helper.make_tensor_value_info("xd", TensorProto.DOUBLE, ["N", 2, 5, 5]),
              tensor_info("Win", [4, 2, 3, 3])]
    before = make_model(nodes, [numpy_helper.from_array(w, "Win"), numpy_helper.from_array(d, "D"),
                                numpy_helper.from_array(a, "A"), numpy_helper.from_array(u, "U")],
                        inputs, [tensor_info("y", ["N", 4, 3, 3])])
    after, tensors = encode(before)
    assert tensors == []
    assert_same_graph(after, before)


# ---- sparsify_initializers ------------------------------------------------------------


def two_conv_model(sparse_density, dense_density):
    """Conv(W1, ~sparse_density non-zero) -> Conv(W2, ~dense_density non-zero)."""
    w1, _ = quantized((16, 8, 3, 3), BOOK, density=sparse_density, seed=9)
    w2, _ = quantized((8, 16, 3, 3), BOOK, density=dense_density, seed=10)
    return make_model([helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
                       helper.make_node("Conv", ["a", "W2"], ["y"], pads=[1, 1, 1, 1])],
                      [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
                      [tensor_info("x", ["N", 8, 6, 6])], [tensor_info("y", ["N", 8, 6, 6])]), w1, w2


def test_sparsify_moves_only_the_sparse_codes():
    before, w1, w2 = two_conv_model(0.03, 0.5)
    compact, tensors = encode(before)
    dense_codes = {t.name: numpy_helper.to_array(t) for t in compact.graph.initializer}
    sparse = onnx.ModelProto()
    sparse.CopyFrom(compact)
    sparsify_initializers(sparse, tensors)

    assert [s.values.name for s in sparse.graph.sparse_initializer] == ["W1.codes"]
    assert sorted(t.name for t in sparse.graph.initializer) == ["W1.codebook", "W2.codebook", "W2.codes"]
    (s,) = sparse.graph.sparse_initializer
    values, indices = numpy_helper.to_array(s.values), numpy_helper.to_array(s.indices)
    assert list(s.dims) == [16, 8, 3, 3] and indices.dtype == np.int64 and values.dtype == np.uint8
    assert np.array_equal(indices, np.flatnonzero(w1))  # linear positions of the non-zero weights
    scattered = np.zeros(w1.size, np.uint8)
    scattered[indices] = values
    assert np.array_equal(scattered.reshape(w1.shape), dense_codes["W1.codes"])
    nnz = np.count_nonzero(w1)
    w1_t, w2_t = tensors
    assert (w1_t.sparse, w1_t.sparse_bytes) == (True, nnz * (1 + 8) + 4 * 4)  # uint8 value + int64 index each
    assert (w2_t.sparse, w2_t.sparse_bytes) == (False, None)

    onnx.checker.check_model(sparse)  # the structural check (the full one types it as a sparse tensor)
    x = np.random.default_rng(1).standard_normal((2, 8, 6, 6)).astype(np.float32)
    with_sparse = session(sparse.SerializeToString()).run(None, {"x": x})[0]
    without = session(compact.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(with_sparse, without)
    assert sparse.ByteSize() < compact.ByteSize()


@pytest.mark.parametrize("nonzero,moved", [(9, True), (10, False)])
def test_sparse_only_when_strictly_smaller(nonzero, moved):
    # 90 uint8 codes: sparse costs 9 bytes per non-zero, so 10 non-zeros tie (90 = 90)
    w = np.zeros((10, 1, 3, 3), np.float32)
    w.reshape(-1)[np.linspace(0, 89, nonzero).astype(int)] = np.resize(BOOK[1:], nonzero)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")],
                       [tensor_info("x", ["N", 1, 3, 3])], [tensor_info("y", ["N", 10, 1, 1])])
    compact, tensors = encode(model)
    sparsify_initializers(compact, tensors)
    assert len(compact.graph.sparse_initializer) == int(moved) and tensors[0].sparse is moved


def unpack(name, n, shape):
    """The nodes that rebuild ``name``'s codes from two per byte, then Cast and Gather."""
    v = lambda s: f"{name}.{s}"  # noqa: E731
    nodes = [helper.make_node("BitwiseAnd", [v("packed"), v("mask")], [v("lo")]),
             helper.make_node("BitShift", [v("packed"), v("shift")], [v("hi")], direction="RIGHT"),
             helper.make_node("Unsqueeze", [v("lo"), v("axis")], [v("lo2")]),
             helper.make_node("Unsqueeze", [v("hi"), v("axis")], [v("hi2")]),
             helper.make_node("Concat", [v("lo2"), v("hi2")], [v("pairs")], axis=1),
             helper.make_node("Reshape", [v("pairs"), v("flat")], [v("interleaved")])]
    consts = [numpy_helper.from_array(np.array(15, np.uint8), f"{name}.mask"),
              numpy_helper.from_array(np.array(4, np.uint8), f"{name}.shift"),
              numpy_helper.from_array(np.array([1], np.int64), f"{name}.axis"),
              numpy_helper.from_array(np.array([-1], np.int64), f"{name}.flat"),
              numpy_helper.from_array(np.array(shape, np.int64), f"{name}.shape")]
    last = v("interleaved")
    if n % 2:
        nodes.append(helper.make_node("Slice", [last, v("start"), v("end")], [v("trimmed")]))
        consts += [numpy_helper.from_array(np.array([0], np.int64), v("start")),
                   numpy_helper.from_array(np.array([n], np.int64), v("end"))]
        last = v("trimmed")
    nodes.append(helper.make_node("Reshape", [last, f"{name}.shape"], [f"{name}.codes"]))
    return nodes + rebuild(name), consts


@pytest.mark.parametrize("shape", [(4, 2, 3, 3), (5, 3, 1, 1)])  # 72 codes; 15, an odd count
def test_small_codebooks_pack_two_codes_per_byte(shape):
    from pyprune.export.compact import pack_nibbles

    w, codes = quantized(shape, BOOK, seed=6)
    side = 3 - shape[2] + 1
    io = ([tensor_info("x", ["N", shape[1], 3, 3])], [tensor_info("y", ["N", shape[0], side, side])])
    before = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")], *io)
    nodes, consts = unpack("W", codes.size, shape)
    expected = make_model([*nodes, helper.make_node("Conv", ["x", "W"], ["y"])],
                          [numpy_helper.from_array(pack_nibbles(codes), "W.packed"), *consts,
                           numpy_helper.from_array(BOOK, "W.codebook")], *io)
    after, tensors = encode(before, nibbles=True)
    assert_same_graph(after, expected)
    onnx.checker.check_model(after, full_check=True)
    assert tensors[0].code_dtype == "uint4x2" and tensors[0].bytes == (codes.size + 1) // 2 + 4 * 4
    packed = pack_nibbles(codes)
    assert packed.size == (codes.size + 1) // 2
    assert np.array_equal(np.stack([packed & 15, packed >> 4], 1).reshape(-1)[:codes.size], codes.reshape(-1))
    x = np.random.default_rng(0).standard_normal((3, shape[1], 3, 3)).astype(np.float32)
    run = lambda model: session(model.SerializeToString()).run(None, {"x": x})[0]  # noqa: E731
    assert np.array_equal(run(after), run(before))  # onnxruntime unpacks exactly the weights


def test_seventeen_values_stay_one_code_per_byte():
    book = np.concatenate([[0.0], np.arange(1, 17)]).astype(np.float32)
    w, _ = quantized((4, 4, 3, 3), book, seed=7)
    before = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")],
                        [tensor_info("x", ["N", 4, 3, 3])], [tensor_info("y", ["N", 4, 1, 1])])
    _, tensors = encode(before, nibbles=True)
    assert tensors[0].code_dtype == "uint8"
