"""A whole model in a ``.ppz`` container (``docs/format.md``).

The manifest holds the architecture as allowlisted JSON (:mod:`graph_json`) and the
model's meta (normalisation, input shape, provenance); every state tensor is one
section, which the codec stores raw, dense or as CSR, whichever is smallest, with the
layer's codebook where a quant pass left one, or where a weight holds so few distinct
values that it has one anyway. Loading rebuilds the graph from the
allowlist and the weights bit for bit: nothing is unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import ppz
from .graph_json import GraphFormatError, graph_from_json, graph_state_dict, graph_to_json

MANIFEST_FORMAT = "pyprune.model"
# A weight with at most this many distinct non-zero values (8-bit quantization) gets a
# codebook even when no pass of this run made one.
SHARED_VALUES_MAX = 256


def _contents(gm: fx.GraphModule, meta: Mapping[str, Any] | None,
              codebooks: Mapping[str, torch.Tensor] | None) -> tuple[dict, dict, dict]:
    manifest = {"format": MANIFEST_FORMAT, "graph": graph_to_json(gm), "meta": dict(meta or {})}
    tensors = {k: v.detach().cpu() for k, v in graph_state_dict(gm).items()}
    by_tensor = {f"{layer}.weight": cb for layer, cb in (codebooks or {}).items()}
    for name, t in tensors.items():
        if name not in by_tensor and name.endswith(".weight"):
            found = _shared_values(t)
            if found is not None:
                by_tensor[name] = found
    return manifest, tensors, by_tensor


def _shared_values(t: torch.Tensor) -> torch.Tensor | None:
    """The codebook of a weight that already holds few distinct values (one that was
    quantized before, e.g. a compiled model compiled again), so that it is stored as
    codes, losslessly, whether or not a pass of this run quantized it; None otherwise."""
    if t.dim() < 2 or t.dtype != torch.float32 or t.numel() < 64:
        return None
    flat = t.reshape(-1)
    if torch.unique(flat[:4096]).numel() > SHARED_VALUES_MAX + 1:  # cheap refusal of a float weight
        return None
    values = torch.unique(flat[flat != 0])
    return values if 0 < values.numel() <= SHARED_VALUES_MAX else None


def save_ppz(gm: fx.GraphModule, path: str | os.PathLike, meta: Mapping[str, Any] | None = None,
             codebooks: Mapping[str, torch.Tensor] | None = None, force: bool = False) -> Path:
    """Pack ``gm`` into ``path``. ``codebooks`` maps a layer (module name) to the
    sorted distinct non-zero values of its weight, as :func:`pyprune.passes.quant.codebooks` gives."""
    manifest, tensors, by_tensor = _contents(gm, meta, codebooks)
    return ppz.pack(path, manifest, tensors, codebooks=by_tensor, force=force)


def ppz_bytes(gm: fx.GraphModule, meta: Mapping[str, Any] | None = None,
              codebooks: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """The bytes :func:`save_ppz` would write, in memory: a search sizes every
    candidate by its real file, not by an estimate."""
    manifest, tensors, by_tensor = _contents(gm, meta, codebooks)
    return ppz.pack_bytes(manifest, tensors, codebooks=by_tensor)


def load_ppz(path: str | os.PathLike) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Read a model packed by :func:`save_ppz`: ``(graph module in eval mode, meta)``."""
    manifest, tensors = ppz.unpack(path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("graph"), dict):
        raise GraphFormatError(f"{path} is a .ppz container but holds no pyprune model "
                               f"(manifest format {manifest.get('format')!r})")
    meta = manifest.get("meta")
    return graph_from_json(manifest["graph"], tensors), meta if isinstance(meta, dict) else {}
