"""Load a saved model for inference with the runtime, using the on-disk cache of
measured choices."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..encode.saved import is_saved_model, load_saved_model
from ..files import sha256_file
from ..models import LoadedModel
from .build import build_runtime, plan_cache_entry
from .cache import CacheKey, cpu_model, default_cache_dir, read_entry, write_entry
from .kernels import backend


def load_runtime(path: str | os.PathLike, runtime: str = "auto", batch_size: int = 1, repeats: int = 5,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                 codes: bool = True, max_bytes: int | None = None, program: bool = True) -> LoadedModel:
    """Load a saved pyprune model (``.ppz`` or graph file) as a runtime model.

    The returned model's ``module`` is a :class:`~pyprune.runtime.build.RuntimeModel`
    (its ``plan`` lists the per-layer choices). With ``runtime="auto"`` the choices
    are read from the cache folder (``cache_dir``, else ``$PYPRUNE_CACHE``, else
    ``~/.cache/pyprune/runtime``) when an entry exists for this file's sha256, batch
    size, thread count, CPU model and kernel backend; otherwise they are measured and
    stored there. ``use_cache=False`` always measures and stores nothing. ``codes=False``
    holds sparse weights as fp32 CSR even where they are quantized (see
    :func:`~pyprune.runtime.build.build_runtime`). ``max_bytes`` bounds what a ``.ppz``
    file may decode to (see :func:`~pyprune.encode.load_ppz`). ``program=False`` keeps the
    model on its torch.fx graph rather than one native program (:mod:`.program`).

    Raises ``ValueError`` for a file that is not a saved pyprune model."""
    if not is_saved_model(path):
        raise ValueError(f"{path} is not a saved pyprune model: the runtime loads a .ppz container or a graph "
                         "file written by `pyprune opt -o` or `pyprune compile`")
    model = load_saved_model(path, max_bytes)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cached = None
    if runtime == "auto" and use_cache:
        key = CacheKey(sha256_file(path), batch_size, torch.get_num_threads(), cpu_model(),
                       backend() + ("" if codes else "-csr"))
        cached = read_entry(cache, key)
    module = build_runtime(model.module, model.input_shape, runtime, batch_size, repeats, cached, codes, program)
    if key is not None:
        written = cache / key.filename() if module.plan.source == "cache" else \
            write_entry(cache, key, plan_cache_entry(module.plan))
        module.plan.cache_file = str(written) if written else None
    model.module = module
    return model
