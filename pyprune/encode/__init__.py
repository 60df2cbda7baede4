"""Serialization of traced models, loadable without unpickling code: a plain graph
file (architecture as allowlisted JSON plus tensors; :mod:`graph_json`,
``docs/graph-format.md``) and the compressed ``.ppz`` container (CSR, codebooks and
canonical Huffman streams, encoded and decoded in C++; :mod:`ppz`,
:mod:`model_ppz`, ``docs/format.md``)."""

from .graph_json import (
    FORMAT,
    FUNCTIONS,
    METHODS,
    MODULE_TYPES,
    VERSION,
    GraphFormatError,
    graph_from_json,
    graph_state_dict,
    graph_to_json,
    is_graph_file,
    load_graph_module,
    module_config,
    save_graph_module,
)

from .model_ppz import load_ppz, ppz_bytes, save_ppz
from .ppz import CorruptFileError, inspect, is_ppz, pack, unpack

__all__ = ["CorruptFileError", "inspect", "is_ppz", "load_ppz", "pack", "ppz_bytes", "save_ppz", "unpack",
           "FORMAT", "FUNCTIONS", "METHODS", "MODULE_TYPES", "VERSION", "GraphFormatError", "graph_from_json",
           "graph_state_dict", "graph_to_json", "is_graph_file", "load_graph_module", "module_config",
           "save_graph_module"]
