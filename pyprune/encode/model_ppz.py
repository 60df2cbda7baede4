"""A whole model in a ``.ppz`` container (``docs/format.md``).

The manifest holds the architecture as allowlisted JSON (:mod:`graph_json`) and the
model's meta (normalisation, input shape, provenance); every state tensor is one
section, which the codec stores raw, dense or as CSR, whichever is smallest, with the
layer's codebook where a quant pass left one, or where a weight holds so few distinct
values that it has one anyway. Loading rebuilds the graph from the
allowlist and the weights bit for bit: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import ppz
from .graph_json import (GraphFormatError, check_declared_state, graph_state_dict, graph_to_json,
                         input_shape_to_run, load_into)

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


def load_ppz(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Read a model packed by :func:`save_ppz`: ``(graph module in eval mode, meta)``.

    Before anything is decoded, the tensors the file declares are checked against the
    model's own graph (names and shapes) and their decoded size against ``max_bytes``
    (default: :func:`ppz.default_max_bytes` of the file's size), so that a hostile file
    costs no more memory than the honest one would."""
    with _naming(path):
        data, manifest, bound, skeleton = _checked(path, max_bytes, require_model=True)
        _, tensors = ppz.unpack_bytes(data, max_bytes=bound)
        meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
        return load_into(skeleton, tensors, input_shape_to_run(meta)), meta


def inspect_model(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, Any]:
    """:func:`ppz.inspect`, after the checks :func:`load_ppz` makes before decoding
    (against the graph when the file holds a pyprune model)."""
    with _naming(path):
        data, _, bound, _ = _checked(path, max_bytes, require_model=False)
        return ppz.inspect_bytes(data, max_bytes=bound)


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Errors about the file's contents begin with the file's name, once."""
    try:
        yield
    except (ppz.CorruptFileError, GraphFormatError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise type(exc)(f"{path}: {exc}") from None



def _checked(path: str | os.PathLike, max_bytes: int | None,
             require_model: bool) -> tuple[bytes, dict[str, Any], int, fx.GraphModule | None]:
    """The file's bytes, manifest and decoding bound, once its table is known to decode
    within the bound and, for a pyprune model, to hold exactly its graph's tensors; and
    that graph on the meta device (None for a container that holds no model)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f".ppz file not found: {p}")
    data = p.read_bytes()
    manifest, rows, decoded = ppz.table_bytes(data)
    is_model = manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("graph"), dict)
    if require_model and not is_model:
        raise GraphFormatError(f"{path} is a .ppz container but holds no pyprune model "
                               f"(manifest format {manifest.get('format')!r})")
    bound = ppz.default_max_bytes(len(data)) if max_bytes is None else int(max_bytes)
    if decoded > bound:
        raise ppz.DecodedSizeError(f"{path}: its tensors decode to {decoded:,} bytes, more than the {bound:,} "
                                   f"allowed for a {len(data):,}-byte file (--max-decoded-mb raises the bound)")
    skeleton = None
    if is_model:
        declared = {r.name: torch.empty(r.shape, dtype=r.dtype, device="meta") for r in rows}
        meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
        skeleton = check_declared_state(manifest["graph"], declared, input_shape_to_run(meta))
    return data, manifest, bound, skeleton
