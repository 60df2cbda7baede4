"""Loading a .ppz with the runtime: the cache of measured choices."""

import json

import pytest
import torch

from pyprune.runtime import build, load_runtime
from pyprune.files import sha256_file as file_sha256
from pyprune.runtime.cache import CacheKey, cpu_model, read_entry


@pytest.fixture
def counted(monkeypatch):
    """Counts the layer measurements the runtime makes."""
    calls = []
    real = build.time_modules

    def time_modules(modules, x, repeats=5, warmup=1):
        calls.append(tuple(x.shape))
        return real(modules, x, repeats=1, warmup=0)

    monkeypatch.setattr(build, "time_modules", time_modules)
    return calls


def test_auto_choices_are_cached_and_reused(compressed_ppz, counted, private_cache):
    model, path = compressed_ppz("resnet20")
    first = load_runtime(path, runtime="auto")
    n_layers = len(first.module.plan.layers)
    assert len(counted) == n_layers and first.module.plan.source == "measured"
    cache_file = first.module.plan.cache_file
    assert cache_file and cache_file.startswith(str(private_cache)) and file_sha256(path) in cache_file

    second = load_runtime(path, runtime="auto")
    assert len(counted) == n_layers, "a second load must not measure again"
    assert second.module.plan.source == "cache" and second.module.plan.cache_file == cache_file
    assert second.module.plan.choices() == first.module.plan.choices()
    assert [p.dense_ms for p in second.module.plan.layers] == [p.dense_ms for p in first.module.plan.layers]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(second.module(x), model.module(x), atol=1e-4)
    assert second.name == model.name and second.mean == model.mean

    # Another batch size is another key: measured again.
    load_runtime(path, runtime="auto", batch_size=2)
    assert len(counted) == 2 * n_layers


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe\x00", b"[]",
                                     b'{"version": 1, "key": {}, "layers": {}}'])
def test_a_corrupt_cache_entry_is_ignored_and_rewritten(compressed_ppz, counted, garbage):
    _, path = compressed_ppz("resnet20")
    cache_file = load_runtime(path, runtime="auto").module.plan.cache_file
    n_layers = len(counted)
    with open(cache_file, "wb") as f:
        f.write(garbage)
    again = load_runtime(path, runtime="auto")
    assert again.module.plan.source == "measured" and len(counted) == 2 * n_layers
    assert json.loads(open(cache_file).read())["layers"].keys() == again.module.plan.choices().keys()
    assert load_runtime(path, runtime="auto").module.plan.source == "cache"


def test_a_cache_entry_with_bad_choices_is_ignored(compressed_ppz, counted):
    _, path = compressed_ppz("resnet20")
    cache_file = load_runtime(path, runtime="auto").module.plan.cache_file
    entry = json.loads(open(cache_file).read())
    entry["layers"]["conv1"]["choice"] = "gpu"
    open(cache_file, "w").write(json.dumps(entry))
    assert load_runtime(path, runtime="auto").module.plan.source == "measured"
    del entry["layers"]["conv1"]  # an entry that misses a layer is as good as none
    entry["layers"]["layer1.0.conv1"]["choice"] = "dense"
    open(cache_file, "w").write(json.dumps(entry))
    assert load_runtime(path, runtime="auto").module.plan.source == "measured"


def test_an_unwritable_cache_is_not_fatal(compressed_ppz, counted, tmp_path):
    _, path = compressed_ppz("resnet20")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    model = load_runtime(path, runtime="auto", cache_dir=blocked / "cache")
    assert model.module.plan.source == "measured" and model.module.plan.cache_file is None


def test_forced_runtimes_neither_measure_nor_touch_the_cache(compressed_ppz, counted, private_cache):
    _, path = compressed_ppz("resnet20")
    for runtime in ("dense", "sparse"):
        plan = load_runtime(path, runtime=runtime).module.plan
        assert plan.source == "forced" and all(p.dense_ms is None and p.sparse_ms is None for p in plan.layers)
    assert not counted and not private_cache.exists()
    load_runtime(path, runtime="auto", use_cache=False)
    assert counted and not private_cache.exists()


def test_cache_key_holds_what_the_choice_depends_on(compressed_ppz):
    _, path = compressed_ppz("resnet20")
    key = CacheKey(file_sha256(path), 1, torch.get_num_threads(), cpu_model(), "reference")
    other = CacheKey(key.sha256, 1, key.threads + 1, key.cpu, key.backend)
    assert key.filename() != other.filename() and key.filename().startswith(key.sha256)
    assert read_entry(path.parent, key) is None


def test_only_saved_models_load(tmp_path):
    junk = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, junk)
    for bad in (junk, tmp_path / "missing.ppz"):
        with pytest.raises(ValueError, match="not a saved pyprune model"):
            load_runtime(bad)


@pytest.mark.parametrize("hostile", ["fifo", "symlink to /dev/zero", "oversized"])
def test_a_cache_entry_that_is_not_a_small_regular_file_is_ignored(compressed_ppz, counted, hostile):
    """Issue 19, defect 4: a FIFO blocked eval forever; a symlink to /dev/zero read 6 GB."""
    import os

    from pyprune.runtime import cache

    _, path = compressed_ppz("resnet20")
    cache_file = load_runtime(path, runtime="auto").module.plan.cache_file
    os.unlink(cache_file)
    if hostile == "fifo":
        os.mkfifo(cache_file)
    elif hostile == "symlink to /dev/zero":
        os.symlink("/dev/zero", cache_file)
    else:
        with open(cache_file, "wb") as f:
            f.truncate(cache.MAX_ENTRY_BYTES + 1)
    again = load_runtime(path, runtime="auto", use_cache=True)
    assert again.module.plan.source == "measured"
