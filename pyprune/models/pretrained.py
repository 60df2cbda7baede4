"""Known pretrained checkpoints and where to find (or fetch) them.

The CIFAR-10 ResNet-20/32/44/56 checkpoints of akamaster/pytorch_resnet_cifar10
(BSD-2-Clause; their LICENSE must travel with copies of the files). A file is
used only if its sha256 matches the published one: a present file with another
hash is an error, never silently used or overwritten.

Search order: ``search_dirs`` (default: the ``PYPRUNE_MODELS`` environment
variable, ``os.pathsep``-separated), then the cache directory (default
``~/.cache/pyprune/models``, or ``PYPRUNE_CACHE``), where downloads go.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch.hub

from ..files import sha256_file
from .loading import ModelLoadError

__all__ = [
    "PretrainedCheckpoint",
    "PRETRAINED",
    "pretrained_archs",
    "default_search_dirs",
    "default_cache_dir",
    "find_or_fetch_pretrained",
]

log = logging.getLogger(__name__)

_BASE_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


@dataclass(frozen=True)
class PretrainedCheckpoint:
    """One published checkpoint: file name, its sha256 and where to download it."""

    arch: str
    filename: str
    sha256: str

    @property
    def url(self) -> str:
        return _BASE_URL + self.filename


PRETRAINED: dict[str, PretrainedCheckpoint] = {
    c.arch: c
    for c in (
        PretrainedCheckpoint("resnet20", "resnet20-12fca82f.th",
                             "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"),
        PretrainedCheckpoint("resnet32", "resnet32-d509ac18.th",
                             "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850"),
        PretrainedCheckpoint("resnet44", "resnet44-014dd654.th",
                             "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4"),
        PretrainedCheckpoint("resnet56", "resnet56-4bfd9763.th",
                             "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"),
    )
}


def pretrained_archs() -> list[str]:
    """Architectures with known pretrained weights."""
    return sorted(PRETRAINED)


def default_search_dirs() -> list[Path]:
    """Folders named by ``PYPRUNE_MODELS`` (``os.pathsep``-separated), in order."""
    value = os.environ.get("PYPRUNE_MODELS", "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def default_cache_dir() -> Path:
    """``PYPRUNE_CACHE`` if set, else ``~/.cache/pyprune/models``."""
    value = os.environ.get("PYPRUNE_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "pyprune" / "models"


def find_or_fetch_pretrained(
    arch: str,
    search_dirs: Sequence[Path] | None = None,
    cache_dir: Path | None = None,
    download: bool = False,
    _download_fn: Callable[..., None] | None = None,
) -> Path:
    """Path of the verified checkpoint for ``arch``, downloading it if asked.

    Looks for the file in ``search_dirs`` then ``cache_dir`` and returns the
    first copy whose sha256 matches. Any present copy with a wrong sha256
    raises :class:`ModelLoadError` (a corrupt or substituted file is never
    used, and never overwritten by a download). If no copy exists and
    ``download`` is true, fetches into ``cache_dir`` and verifies it.
    """
    ckpt = PRETRAINED.get(arch.strip().lower())
    if ckpt is None:
        raise ModelLoadError(
            f"no pretrained weights known for {arch!r}; "
            f"available for: {', '.join(pretrained_archs())}"
        )
    dirs = list(default_search_dirs() if search_dirs is None else search_dirs)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    searched: list[Path] = []
    for d in [*dirs, cache]:
        d = Path(d).expanduser()
        if d not in searched:
            searched.append(d)

    bad: list[str] = []
    for d in searched:
        candidate = d / ckpt.filename
        if not candidate.is_file():
            continue
        actual = sha256_file(candidate)
        if actual == ckpt.sha256:
            for b in bad:
                log.warning("ignored pretrained file with wrong sha256: %s", b)
            return candidate
        bad.append(f"{candidate} (sha256 {actual})")
    if bad:
        raise ModelLoadError(
            f"pretrained {ckpt.arch} file(s) with the wrong sha256 (expected {ckpt.sha256}): "
            + "; ".join(bad)
            + ". Delete or replace them; they are never used."
        )

    if not download:
        raise ModelLoadError(
            f"pretrained weights for {ckpt.arch} ({ckpt.filename}) not found in: "
            + ", ".join(str(d) for d in searched)
            + f". Pass --download to fetch them from {ckpt.url}, or put the file in one of "
            "those folders (set PYPRUNE_MODELS to add folders)."
        )

    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / ckpt.filename
    log.info("downloading %s to %s", ckpt.url, dst)
    try:
        # hash_prefix may be the full digest; torch.hub checks it before moving
        # the temporary file into place.
        # Looked up at call time so tests can stand in for the network.
        fetch = _download_fn or torch.hub.download_url_to_file
        fetch(ckpt.url, str(dst), hash_prefix=ckpt.sha256)
    except Exception as exc:
        raise ModelLoadError(
            f"downloading {ckpt.url} to {dst} failed: {exc}. On a machine without internet, "
            "copy the file into one of: " + ", ".join(str(d) for d in searched)
        ) from exc
    if not dst.is_file():
        raise ModelLoadError(f"download of {ckpt.url} produced no file at {dst}")
    # Verify again ourselves: the download function is replaceable.
    actual = sha256_file(dst)
    if actual != ckpt.sha256:
        dst.unlink()
        raise ModelLoadError(
            f"downloaded {ckpt.url} has sha256 {actual}, expected {ckpt.sha256}; file removed"
        )
    return dst
