"""Serialization of traced models: the architecture as allowlisted JSON, the weights
as plain tensors, one file, loadable without unpickling code. See
:mod:`pyprune.encode.graph_json` and ``docs/graph-format.md``."""

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

__all__ = ["FORMAT", "FUNCTIONS", "METHODS", "MODULE_TYPES", "VERSION", "GraphFormatError", "graph_from_json",
           "graph_state_dict", "graph_to_json", "is_graph_file", "load_graph_module", "module_config",
           "save_graph_module"]
