"""A saved pyprune model, whichever container holds it: the ``.ppz`` container
or a plain graph file. Both carry their architecture and weights, so they load
with no ``--arch``, and nothing is unpickled."""

from __future__ import annotations

import os
from pathlib import Path

from ..models.loaded import LoadedModel
from .graph_json import GraphFormatError, check_runs, input_shape_to_run, is_graph_file, load_graph_module
from .model_ppz import load_ppz
from .ppz import is_ppz


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file written by ``pyprune opt -o`` or ``compile``."""
    return Path(path).is_file() and (is_ppz(path) or is_graph_file(path))


def load_saved_model(path: str | os.PathLike, max_bytes: int | None = None) -> LoadedModel:
    """The model in a ``.ppz`` or graph file, with the normalisation and input
    shape its manifest records. ``max_bytes``: the most a ``.ppz`` file's tensors may
    decode to (default: relative to the file's size, see :func:`load_ppz`)."""
    gm, meta = load_ppz(path, max_bytes) if is_ppz(path) else load_graph_module(path)
    try:
        model = LoadedModel.from_meta(gm, meta, Path(path).stem, source=str(path))
        if input_shape_to_run(meta) is None:  # the loaders ran none: run the default shape the model now has
            check_runs(gm, model.input_shape)
    except ValueError as exc:  # GraphFormatError too
        raise GraphFormatError(f"{path}: {exc}") from None
    return model
