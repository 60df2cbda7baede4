"""The .ppz container: exact round trips of every dtype and encoding, the per-tensor
encoding choice, codebooks, the C++ decoder against the pure-Python reference, the file
API (atomic write, overwrite, is_ppz), inspect, and clear errors."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from pyprune.encode import huffman_ref as ref
from pyprune.encode import ppz
from pyprune.encode.ppz import CorruptFileError, inspect, is_ppz, pack, pack_bytes, unpack, unpack_bytes


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes: -0.0 and NaN payloads included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_round_trip(tensors, data: bytes, manifest=None):
    m, out = unpack_bytes(data)
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert bits_equal(out[k], t.detach().cpu()), k
    if manifest is not None:
        assert {k: v for k, v in m.items() if k != "tensors"} == manifest
    # the pure-Python reference decodes the same bytes
    _, refs = ref.read_ppz(data)
    assert [r.name for r in refs] == list(tensors)
    for r in refs:
        assert r.data.tobytes() == tensors[r.name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), r.name
    return m, out


def sparse(shape, density, gen, dtype=torch.float32):
    w = torch.randn(shape, generator=gen, dtype=dtype)
    return w * (torch.rand(shape, generator=gen) < density) + 0.0  # + 0.0: pruned zeros are +0.0


def quantized(shape, density, k, gen):
    cb = torch.randn(k, generator=gen)
    idx = torch.randint(0, k, shape, generator=gen)
    keep = torch.rand(shape, generator=gen) < density
    return torch.where(keep, cb[idx], torch.zeros(())), cb


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- round trips

SPECIAL = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3.4028235e38, 1.0])


def test_every_dtype_round_trips_exactly(gen):
    nan_payload = torch.tensor([0x7FC00001, 0xFFF00F00, 0x7F800001], dtype=torch.int64).to(torch.int32).view(torch.float32)
    tensors = {
        "f32": torch.cat([SPECIAL, nan_payload]),
        "f64": torch.randn(5, 3, dtype=torch.float64, generator=gen),
        "f16": torch.randn(7, dtype=torch.float16, generator=gen),
        "bf16": torch.randn(2, 3, dtype=torch.bfloat16, generator=gen),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8, generator=gen),
        "i8": torch.randint(-128, 128, (4, 2), dtype=torch.int8, generator=gen),
        "i16": torch.randint(-(2 ** 15), 2 ** 15, (3,), dtype=torch.int16, generator=gen),
        "i32": torch.randint(-(2 ** 31), 2 ** 31, (3,), dtype=torch.int32, generator=gen),
        "num_batches_tracked": torch.tensor(123456789012, dtype=torch.int64),
        "bool": torch.rand(3, 3, generator=gen) > 0.5,
        "c64": torch.randn(4, dtype=torch.complex64, generator=gen),
        "c128": torch.randn(2, 2, dtype=torch.complex128, generator=gen),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "u32": torch.tensor([0, 2 ** 32 - 1], dtype=torch.uint32),
        "u64": torch.tensor([0, 2 ** 63], dtype=torch.uint64),
        "scalar": torch.tensor(-0.0),
        "empty": torch.zeros(0, 3),
        "empty-rows": torch.zeros(3, 0, 2),
    }
    m, out = assert_round_trip(tensors, pack_bytes({"a": 1}, tensors), {"a": 1})
    assert [row["name"] for row in m["tensors"]] == list(tensors)
    # only float32 has the sparse and quantized encodings; every dtype may be zlib'd byte planes
    assert all(row["encoding"] in ("raw", "raw_z") for row in m["tensors"] if row["dtype"] != "float32")


def test_sparse_float32_uses_csr_and_round_trips(gen):
    w = sparse((64, 64, 3, 3), 0.2, gen)
    data = pack_bytes({}, {"w": w})
    m, _ = assert_round_trip({"w": w}, data)
    assert m["tensors"][0]["encoding"] == "csr_f32"
    assert len(data) < 0.3 * w.numel() * 4


def test_dense_float32_stays_dense_with_its_exponents_compressed(gen):
    w = torch.randn(32, 16, generator=gen)
    data = pack_bytes({}, {"w": w})
    m, _ = assert_round_trip({"w": w}, data)
    assert m["tensors"][0]["encoding"] == "raw_z"
    row = ppz.inspect_bytes(data)["tensors"][0]
    # the sign-and-exponent byte of N(0, 1) values carries about 4 of its 8 bits
    assert row["bytes"] == row["deflate_bytes"] < 0.95 * w.numel() * 4
    assert ppz.inspect_bytes(pack_bytes({}, {"w": w}, encodings={"w": "raw"}))["tensors"][0]["bytes"] == 4 * w.numel()


@pytest.mark.parametrize("density,expected", [(0.1, "csr_q"), (0.95, "dense_q")])
def test_quantized_choose_csr_or_dense(gen, density, expected):
    w, cb = quantized((64, 32, 3, 3), density, 16, gen)
    data = pack_bytes({}, {"w": w}, {"w": cb})
    m, _ = assert_round_trip({"w": w}, data)
    assert m["tensors"][0]["encoding"] == expected


@pytest.mark.parametrize("encoding", ppz.ENCODINGS)
@pytest.mark.parametrize("gap_bits", [1, 2, 5, 8])
def test_forced_encodings_round_trip(gen, encoding, gap_bits):
    w, cb = quantized((8, 5, 3, 3), 0.15, 6, gen)
    w[3] = 0  # an empty row
    w[5, :, :, :2] = 0  # long gaps: fillers
    w[7] = torch.where(torch.arange(45).reshape(5, 3, 3) == 44, cb[0], torch.zeros(())).float()  # last element only
    codebooks = {"w": cb} if encoding in ("dense_q", "csr_q") else None
    data = pack_bytes({}, {"w": w}, codebooks, gap_bits, encodings={"w": encoding})
    m, _ = assert_round_trip({"w": w}, data)
    assert m["tensors"][0]["encoding"] == encoding
    rows = inspect_bytes_rows(data)
    if encoding.startswith("csr"):
        assert rows[0]["gap_bits"] == gap_bits
        if gap_bits <= 2:
            assert rows[0]["fillers"] > 0


def inspect_bytes_rows(data: bytes):
    return ppz.inspect_bytes(data)["tensors"]


@pytest.mark.parametrize("shape", [(0,), (5,), (), (1, 1), (3, 0), (0, 4), (2, 3, 1, 1), (1, 2, 1, 3, 1, 2, 1, 2)])
@pytest.mark.parametrize("encoding", ["csr_f32", "raw"])
def test_odd_shapes(gen, shape, encoding):
    w = sparse(shape, 0.5, gen)
    assert_round_trip({"w": w}, pack_bytes({}, {"w": w}, encodings={"w": encoding}))


def test_all_zero_and_fully_dense_csr(gen):
    z = torch.zeros(16, 300)  # rows of only trailing fillers
    d = torch.randn(4, 50, generator=gen)
    for b in (1, 3, 8):
        data = pack_bytes({}, {"z": z, "d": d}, gap_bits=b, encodings={"z": "csr_f32", "d": "csr_f32"})
        assert_round_trip({"z": z, "d": d}, data)


def test_negative_zero_nan_and_inf_in_csr(gen):
    w = torch.zeros(4, 40)
    w[0, 3] = -0.0
    w[1, 39] = float("nan")
    w[2, 0] = float("-inf")
    w[3, 17] = torch.tensor(0x7FC12345, dtype=torch.int32).view(torch.float32)
    for enc in ("csr_f32", "raw"):
        assert_round_trip({"w": w}, pack_bytes({}, {"w": w}, encodings={"w": enc}))


def test_codebook_negative_zero_nan_and_duplicates(gen):
    cb = torch.tensor([0.5, float("nan"), 0.5, -1.0])
    w = torch.tensor([[0.5, -0.0, 0.0, float("nan")], [-1.0, 0.0, 0.0, -0.0]])
    for enc in ("dense_q", "csr_q"):
        data = pack_bytes({}, {"w": w}, {"w": cb}, encodings={"w": enc})
        assert_round_trip({"w": w}, data)
        assert inspect_bytes_rows(data)[0]["codebook_size"] == 5  # -0.0 appended


def test_codebook_given_as_float64_and_with_zero(gen):
    cb = torch.tensor([0.0, 0.25, -2.0], dtype=torch.float64)
    w = torch.tensor([0.25, 0.0, -2.0, 0.0, 0.25])
    assert_round_trip({"w": w}, pack_bytes({}, {"w": w}, {"w": cb}))


def test_value_outside_codebook_is_an_error():
    w = torch.tensor([0.5, 0.0, 0.7])
    with pytest.raises(ValueError, match=r"neither 0 nor a codebook value.*flat index 2"):
        pack_bytes({}, {"w": w}, {"w": torch.tensor([0.5])})


@pytest.mark.parametrize("kwargs,match", [
    (dict(tensors={"w": torch.zeros(2)}, codebooks={"x": torch.ones(1)}), "not packed"),
    (dict(tensors={"w": torch.zeros(2, dtype=torch.int32)}, codebooks={"w": torch.ones(1)}), "float32"),
    (dict(tensors={"w": torch.zeros(2)}, codebooks={"w": torch.ones(2, 2)}), "1-D"),
    (dict(tensors={"w": torch.zeros(2)}, codebooks={"w": torch.ones(65536)}), "at most 65535"),
    (dict(tensors={"w": torch.zeros(2)}, encodings={"w": "zip"}), "unknown encoding"),
    (dict(tensors={"w": torch.zeros(2)}, encodings={"w": "csr_q"}), "needs a codebook"),
    (dict(tensors={"w": torch.zeros(2, dtype=torch.int64)}, encodings={"w": "csr_f32"}), "float32"),
    (dict(tensors={"w": torch.zeros(2)}, gap_bits=9), "gap_bits"),
    (dict(tensors={"w": torch.zeros(2)}, gap_bits=[]), "gap_bits"),
    (dict(tensors={"": torch.zeros(2)}), "non-empty"),
    (dict(tensors={"w": torch.zeros(2).to_sparse()}), "strided"),
    (dict(tensors={"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}), "not supported"),
    (dict(tensors={"w": torch.zeros([1] * 9)}), "at most 8"),
    (dict(tensors={"w": torch.zeros(2)}, manifest={"tensors": []}), "reserved"),
    (dict(tensors={"w": torch.zeros(2)}, manifest={"x": float("nan")}), "plain JSON"),
    (dict(tensors={"w": torch.zeros(2)}, manifest={"x": object()}), "plain JSON"),
])
def test_pack_errors(kwargs, match):
    kwargs = {"manifest": {}, **kwargs}
    with pytest.raises(ValueError, match=match):
        pack_bytes(**kwargs)


def test_inputs_on_views_params_and_other_layouts(gen):
    base = torch.randn(6, 8, generator=gen)
    view = base.t()[::2]  # non-contiguous
    param = torch.nn.Parameter(sparse((4, 4), 0.3, gen))
    neg = torch.randn(3, dtype=torch.complex64, generator=gen).conj()  # lazy conj bit
    tensors = {"view": view, "param": param, "conj": neg}
    _, out = unpack_bytes(pack_bytes({}, tensors))
    assert bits_equal(out["view"], view.contiguous())
    assert bits_equal(out["param"], param.detach())
    assert bits_equal(out["conj"], neg.resolve_conj())
    assert not out["param"].requires_grad


# ----------------------------------------------------------------------------- choice + sizes

def test_choice_is_the_smallest_candidate(gen):
    w, cb = quantized((32, 16, 3, 3), 0.3, 8, gen)
    auto = pack_bytes({}, {"w": w}, {"w": cb})
    sizes = {}
    for enc in ppz.ENCODINGS[:3]:
        for b in ((0,) if enc != "csr_q" else range(2, 9)):
            data = pack_bytes({}, {"w": w}, {"w": cb}, gap_bits=b or None, encodings={"w": enc})
            sizes[(enc, b)] = inspect_bytes_rows(data)[0]["bytes"]
    assert inspect_bytes_rows(auto)[0]["bytes"] == min(sizes.values())


def test_gap_bits_single_value_is_used(gen):
    w = sparse((16, 200), 0.05, gen)
    rows = inspect_bytes_rows(pack_bytes({}, {"w": w}, gap_bits=3, encodings={"w": "csr_f32"}))
    assert rows[0]["gap_bits"] == 3 and rows[0]["fillers"] > 0


def test_multithreaded_decode_matches(gen):
    w, cb = quantized((256, 64, 3, 3), 0.3, 32, gen)  # above the parallel grain, many chunks
    v = sparse((128, 128, 3, 3), 0.2, gen)
    data = pack_bytes({}, {"w": w, "v": v, "d": w + 0.0}, {"w": cb, "d": cb}, encodings={"d": "dense_q"})
    one = unpack_bytes(data, threads=1)[1]
    two = unpack_bytes(data, threads=2)[1]
    for k in one:
        assert bits_equal(one[k], two[k])
    assert bits_equal(one["w"], w) and bits_equal(one["v"], v)


def test_max_bytes():
    data = pack_bytes({}, {"w": torch.zeros(1000)})
    unpack_bytes(data, max_bytes=4000)
    with pytest.raises(ValueError, match="max_bytes"):
        unpack_bytes(data, max_bytes=3999)


# ----------------------------------------------------------------------------- files

def test_pack_file_atomic_and_no_overwrite(tmp_path, gen):
    w = sparse((8, 8), 0.5, gen)
    path = tmp_path / "sub" / "m.ppz"
    assert pack(path, {"arch": "x"}, {"w": w}) == path
    assert is_ppz(path)
    manifest, tensors = unpack(path)
    assert manifest["arch"] == "x" and bits_equal(tensors["w"], w)
    with pytest.raises(FileExistsError):
        pack(path, {}, {"w": w})
    pack(path, {"arch": "y"}, {"w": w}, force=True)
    assert unpack(path)[0]["arch"] == "y"
    assert [p.name for p in path.parent.iterdir()] == ["m.ppz"]  # no temporary left behind


def test_is_ppz(tmp_path):
    (tmp_path / "junk").write_bytes(b"\x89PPZ\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "short").write_bytes(b"\x89PPZ")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04K\x01.")
    torch.save({"a": 1}, tmp_path / "ckpt.pt")
    for name in ("junk", "short", "pickle.pt", "ckpt.pt", "missing"):
        assert not is_ppz(tmp_path / name)
    assert not is_ppz(tmp_path)
    with pytest.raises(FileNotFoundError):
        unpack(tmp_path / "missing")


def test_manifest_round_trip_and_table():
    manifest = {"arch": {"nodes": [1, 2.5, None, True, "é"]}, "provenance": ["slim(ratio=0.4)"]}
    tensors = {"a": torch.ones(2), "b.weight": torch.zeros(30, 30)}
    m, _ = unpack_bytes(pack_bytes(manifest, tensors))
    assert {k: v for k, v in m.items() if k != "tensors"} == manifest
    assert m["tensors"] == [{"name": "a", "dtype": "float32", "shape": [2], "encoding": "raw"},
                            {"name": "b.weight", "dtype": "float32", "shape": [30, 30], "encoding": "csr_f32"}]


def test_unicode_names_and_many_tensors():
    tensors = {f"层.{i}.wéight": torch.full((i % 3 + 1,), float(i)) for i in range(300)}
    assert_round_trip(tensors, pack_bytes({}, tensors))


# ----------------------------------------------------------------------------- layout

def test_header_layout_and_crcs(gen):
    data = pack_bytes({"k": 1}, {"w": sparse((4, 4), 0.5, gen)}, version=1)
    assert data[:8] == ppz.MAGIC
    version, flags, msize, count, crc = struct.unpack_from("<IIQII", data, 8)
    assert (version, flags, count) == (1, 0, 1) and crc == zlib.crc32(data[:28])
    manifest = data[32:32 + msize]
    assert json.loads(manifest)["k"] == 1
    assert struct.unpack_from("<I", data, 32 + msize)[0] == zlib.crc32(manifest)
    dir_at = 32 + msize + 4
    off, size, scrc, reserved = struct.unpack_from("<QQII", data, dir_at)
    assert off == dir_at + 28 and off + size == len(data) and reserved == 0
    assert scrc == zlib.crc32(data[off:]) and struct.unpack_from("<I", data, dir_at + 24)[0] == zlib.crc32(data[dir_at:dir_at + 24])


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d[:7], "bad magic"),
    (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
    (lambda d: d[:20], "shorter than the 32-byte header"),
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "manifest: CRC32"),
    (lambda d: d[:-1], "section 0|directory"),
    (lambda d: d + b"\0", "after the last section"),
    (lambda d: d[:-3] + bytes([d[-3] ^ 0x10]) + d[-2:], r"section 0 \('w'\?\): CRC32"),
])
def test_corruption_names_the_section(gen, mutate, match):
    data = pack_bytes({"k": 1}, {"w": sparse((8, 8), 0.5, gen)}, version=1)
    with pytest.raises(CorruptFileError, match=match):
        unpack_bytes(mutate(data))
    with pytest.raises(CorruptFileError):
        ppz.inspect_bytes(mutate(data))


def _with_fixed_crcs(data: bytearray) -> bytes:
    """Recompute every CRC of a file whose structure is intact."""
    msize, count = struct.unpack_from("<Q", data, 16)[0], struct.unpack_from("<I", data, 24)[0]
    struct.pack_into("<I", data, 28, zlib.crc32(data[:28]))
    struct.pack_into("<I", data, 32 + msize, zlib.crc32(data[32:32 + msize]))
    dir_at = 32 + msize + 4
    for i in range(count):
        off, size = struct.unpack_from("<QQ", data, dir_at + 24 * i)
        struct.pack_into("<I", data, dir_at + 24 * i + 16, zlib.crc32(data[off:off + size]))
    struct.pack_into("<I", data, dir_at + 24 * count, zlib.crc32(data[dir_at:dir_at + 24 * count]))
    return bytes(data)


def test_version_and_manifest_checks(gen):
    data = bytearray(pack_bytes({}, {"w": torch.ones(2)}, version=1))
    v3 = bytearray(data)
    struct.pack_into("<I", v3, 8, 3)
    with pytest.raises(CorruptFileError, match="unsupported version 3"):
        unpack_bytes(_with_fixed_crcs(v3))
    # a manifest whose table disagrees with the sections
    msize = struct.unpack_from("<Q", data, 16)[0]
    text = bytes(data[32:32 + msize]).replace(b'"raw"', b'"csr"')
    with pytest.raises(CorruptFileError, match="tensors' table"):
        unpack_bytes(_with_fixed_crcs(bytearray(data[:32] + text + data[32 + msize:])))
    text = bytes(data[32:32 + msize]).replace(b"{", b"[", 1)
    with pytest.raises(CorruptFileError, match="manifest: not UTF-8 JSON"):
        unpack_bytes(_with_fixed_crcs(bytearray(data[:32] + text + data[32 + msize:])))


def test_bool_values_other_than_0_1_are_corrupt():
    data = bytearray(pack_bytes({}, {"b": torch.tensor([True, False])}, version=1))
    data[-2] = 7
    with pytest.raises(CorruptFileError, match="bool element 0"):
        unpack_bytes(_with_fixed_crcs(data))


def test_duplicate_names_are_corrupt():
    one = pack_bytes({}, {"a": torch.ones(1), "b": torch.ones(1)}, version=1)
    data = bytearray(one)
    i = data.rindex(b"\x01\x00b")  # name_len=1, "b"
    data[i + 2] = ord("a")
    with pytest.raises(CorruptFileError, match="duplicate tensor name"):
        unpack_bytes(_with_fixed_crcs(data))


# ----------------------------------------------------------------------------- inspect

def test_inspect_reports_streams_sizes_and_entropy(tmp_path, gen):
    w, cb = quantized((64, 64, 3, 3), 0.2, 32, gen)
    v = sparse((32, 64), 0.1, gen)
    path = pack(tmp_path / "m.ppz", {"arch": "a"}, {"w": w, "v": v, "bn.bias": torch.randn(64, generator=gen),
                                                    "bn.num_batches_tracked": torch.tensor(7)}, {"w": cb})
    report = inspect(path)
    rows = {r["name"]: r for r in report["tensors"]}
    r = rows["w"]
    assert r["encoding"] == "csr_q" and r["code_bits"] == 5 and r["codebook_size"] == 32
    assert r["nnz"] == int((w != 0).sum()) and math.isclose(r["density"], r["nnz"] / w.numel())
    assert r["fp32_bytes"] == w.numel() * 4
    assert r["entries"] == r["nnz"] + r["fillers"]
    for s in ("gaps", "codes"):
        st = r[s]
        assert st["symbols"] == r["entries"]
        assert st["entropy_bits"] - 1e-6 <= st["payload_bits"] <= st["entropy_bits"] + st["symbols"]
    assert r["bytes"] == (r["header_bytes"] + 4 + r["codebook_bytes"] + 16 + r["rowcount_bytes"]
                          + r["gap_bytes"] + r["code_bytes"])
    assert rows["v"]["encoding"] == "csr_f32" and rows["v"]["values_bytes"] == 4 * rows["v"]["entries"]
    assert rows["bn.bias"]["encoding"] == "raw" and rows["bn.bias"]["gaps"] is None
    assert rows["bn.num_batches_tracked"]["dtype"] == "int64"
    t = report["total"]
    assert t["file_bytes"] == path.stat().st_size
    assert t["bytes"] == sum(x["bytes"] for x in report["tensors"])
    assert t["file_bytes"] == t["bytes"] + t["overhead_bytes"]
    assert t["compression"] > 5
    assert report["manifest"]["arch"] == "a"


def test_realistic_quantized_layer_within_one_bit_of_entropy(gen):
    """k-means-like 5-bit codebook on a 3x3x64x64 layer at 80% sparsity."""
    w = torch.randn(64, 64, 3, 3, generator=gen)
    mask = w.abs() > w.abs().flatten().kthvalue(int(0.8 * w.numel())).values
    nz = w[mask]
    cb = torch.quantile(nz, torch.linspace(0, 1, 32))  # a stand-in for k-means centroids
    w = torch.zeros_like(w)
    w[mask] = cb[(nz[:, None] - cb).abs().argmin(1)]
    data = pack_bytes({}, {"w": w}, {"w": cb}, gap_bits=5, encodings={"w": "csr_q"})
    r = inspect_bytes_rows(data)[0]
    for s in ("gaps", "codes"):
        st = r[s]
        assert st["payload_bits"] <= st["entropy_bits"] + st["symbols"]
        assert st["bits_per_symbol"] - st["entropy_per_symbol"] < 0.1  # in practice far closer than 1 bit
    assert_round_trip({"w": w}, data)
