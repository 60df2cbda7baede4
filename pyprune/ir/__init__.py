"""The graph IR: fx tracing, shape propagation, accounting and the pass manager."""

from .graph import call_counts
from .modules import ChannelAffine, in_mode, inference_only
from .accounting import LayerStats, Totals, layer_stats, register_mac_counter, totals
from .pass_manager import GraphPass, PassCheckError, PassManager, PassResult, PassStats, PipelineResult
from .shape_prop import example_input, output_shape, propagate_shapes, tensor_meta
from .trace import TraceError, trace

__all__ = ["ChannelAffine", "GraphPass", "call_counts", "LayerStats", "PassCheckError", "PassManager", "PassResult", "PassStats",
           "PipelineResult", "Totals", "TraceError", "example_input", "in_mode", "inference_only", "layer_stats", "output_shape",
           "propagate_shapes", "register_mac_counter", "tensor_meta", "totals", "trace"]
