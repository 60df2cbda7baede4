"""The on-disk cache of the runtime's measured per-layer choices.

One JSON file per (model file sha256, batch size, thread count, CPU model, sparse
kernel backend) in ``$PYPRUNE_CACHE``, else ``~/.cache/pyprune/runtime``. The
backend is part of the key because choices measured against the pure-torch
reference say nothing about the native kernels. The cache is only ever a shortcut:
an entry that is missing, unreadable, corrupt or for another key reads as absent
(and is rewritten after the next measurement), and a failure to write it is logged,
never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write, read_regular

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: choices include "lanes"
# An entry lists a few numbers per layer: a few hundred KB covers thousands of layers.
MAX_ENTRY_BYTES = 4 << 20


def default_cache_dir() -> Path:
    env = os.environ.get("PYPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyprune" / "runtime"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclass(frozen=True)
class CacheKey:
    sha256: str
    batch_size: int
    threads: int
    cpu: str
    backend: str

    def filename(self) -> str:
        # The CPU name may hold any characters: hash it rather than escape it.
        cpu = hashlib.sha256(self.cpu.encode()).hexdigest()[:12]
        return f"{self.sha256}-b{self.batch_size}-t{self.threads}-{cpu}-{self.backend}.json"


def read_entry(cache_dir: Path, key: CacheKey) -> dict[str, dict[str, Any]] | None:
    """The cached ``{layer: {"choice", "dense_ms", "sparse_ms", "lanes_ms"}}`` for ``key``, or None
    if there is no usable entry."""
    path = cache_dir / key.filename()
    try:
        data = json.loads(read_regular(path, MAX_ENTRY_BYTES).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not a regular file, too big, not JSON: measure again
        log.warning("ignoring unreadable runtime cache entry %s: %s", path, exc)
        return None
    if not _well_formed(data, key):
        log.warning("ignoring malformed runtime cache entry %s", path)
        return None
    return data["layers"]


def _well_formed(data: Any, key: CacheKey) -> bool:
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("key") != asdict(key):
        return False
    layers = data.get("layers")
    return isinstance(layers, dict) and all(
        isinstance(v, dict) and v.get("choice") in ("dense", "sparse", "lanes")
        and all(isinstance(v.get(t), (int, float, type(None))) for t in ("dense_ms", "sparse_ms", "lanes_ms", "convert_ms"))
        for v in layers.values())


def write_entry(cache_dir: Path, key: CacheKey, layers: dict[str, dict[str, Any]]) -> Path | None:
    """Store ``layers`` for ``key``; returns the file, or None if it could not be written."""
    path = cache_dir / key.filename()
    body = json.dumps({"version": CACHE_VERSION, "key": asdict(key), "layers": layers}, indent=1).encode()
    try:
        return atomic_write(path, lambda f: f.write(body), force=True)
    except OSError as exc:
        log.warning("could not write the runtime cache entry %s: %s", path, exc)
        return None
