"""Reading a ``torch.export`` program (``torch.export.save``, ``.pt2``) without running
code from the file.

``torch.export.load`` falls back to full unpickling in three places: weights or
constants stored as pickles (tensor subclasses), custom objects among the constants,
and sample inputs that ``weights_only`` refuses. :func:`load_exported_program` reads
the archive's own JSON tables first and refuses any file that would take one of those
paths, so what reaches ``torch.export.load`` holds plain tensors and a JSON graph.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from ..text import first_line
from .loading import HOW_TO_EXPORT, ModelLoadError, _refuse_zip_bomb

if TYPE_CHECKING:
    from torch.export import ExportedProgram

__all__ = ["HOW_TO_EXPORT", "is_exported_program", "load_exported_program"]

PathLike = Union[str, "os.PathLike[str]"]

_WEIGHTS_CONFIG = "_weights_config.json"
_CONSTANTS_CONFIG = "_constants_config.json"
# Constants stored as files with these prefixes are tensors; anything else (custom
# objects, opaque Python objects) is unpickled by torch.export.load.
_TENSOR_CONSTANT_PREFIX = "tensor_"


def _archive_format(zf: zipfile.ZipFile) -> str | None:
    for name in zf.namelist():
        if name.endswith("/archive_format") and name.count("/") == 1:
            return zf.read(name).decode("ascii", "replace").strip()
    return None


def is_exported_program(path: PathLike) -> bool:
    """Whether ``path`` is a PT2 archive (what ``torch.export.save`` writes)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            return _archive_format(zf) == "pt2"
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _refuse(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {why}. pyprune reads torch.export programs that hold only tensors and the "
                          f"graph; export the model again with {HOW_TO_EXPORT}")


def _check_payloads(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse, before torch reads it, every part of the archive torch would unpickle."""
    names = zf.namelist()
    models = [n for n in names if "/models/" in n and n.endswith(".json")]
    if not models:
        kind = "an AOTInductor package (compiled code)" if any("/aotinductor/" in n for n in names) else \
            "a PT2 archive with no exported program in it"
        raise _refuse(path, f"this is {kind}, not a torch.export program")
    if len(models) > 1:
        raise _refuse(path, f"the archive holds {len(models)} exported programs; pyprune takes one")
    configs = [n for n in names if n.endswith(_WEIGHTS_CONFIG) or n.endswith(_CONSTANTS_CONFIG)]
    if not any(n.endswith(_WEIGHTS_CONFIG) for n in configs):
        raise _refuse(path, "the weights are stored in the legacy pickled form of an older torch")
    for name in configs:
        try:
            table = json.loads(zf.read(name)).get("config", {})
        except (ValueError, AttributeError) as exc:
            raise ModelLoadError(f"{path}: {name} is not a readable table ({exc})") from None
        if not isinstance(table, dict):
            raise ModelLoadError(f"{path}: {name} is not a readable table")
        for fqn, entry in table.items():
            if not isinstance(entry, dict):
                raise ModelLoadError(f"{path}: {name} entry {fqn!r} is not a table")
            if entry.get("use_pickle"):
                raise _refuse(path, f"{fqn!r} is stored as a pickle (a tensor subclass), and unpickling runs code "
                                    "from the file")
            if name.endswith(_CONSTANTS_CONFIG) and not str(entry.get("path_name", "")).startswith(
                    _TENSOR_CONSTANT_PREFIX):
                raise _refuse(path, f"constant {fqn!r} is a Python object, not a tensor, and loading it would "
                                    "unpickle it")
    for name in names:
        if "/data/sample_inputs/" in name and name.endswith(".pt"):
            try:
                torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
            except Exception:
                raise _refuse(path, "its sample inputs are not plain tensors, and torch would unpickle them") \
                    from None


def load_exported_program(path: PathLike) -> ExportedProgram:
    """The program in ``path``, read with nothing unpickled; :class:`ModelLoadError`
    says what is wrong with a file that cannot be read that way."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"model file not found: {p}")
    _refuse_zip_bomb(p)
    try:
        with zipfile.ZipFile(p) as zf:
            if _archive_format(zf) != "pt2":
                raise ModelLoadError(f"{p} is not a PT2 archive (torch.export.save)")
            _check_payloads(p, zf)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{p} is not a readable PT2 archive ({exc})") from None
    try:
        return torch.export.load(p)
    except Exception as exc:  # the deserializer raises many types on what it cannot read
        raise ModelLoadError(f"{p}: torch.export.load could not read it: {first_line(exc)}") from exc
