"""Inference runtime: a saved model with each layer on the faster of the dense and
sparse kernels (:func:`load_runtime`).

    model = load_runtime("model.ppz", runtime="auto")   # LoadedModel; model.module is a RuntimeModel
    print(model.module.table())                          # per-layer choice, sparsity, timings
"""

from .build import RuntimeModel, build_runtime, prepare_graph
from .kernels import CSR, CodesCSR, backend, reference_conv2d, reference_linear, sparse_conv2d, sparse_linear
from .load import load_runtime
from .modules import SparseConv2d, SparseLinear
from .plan import RUNTIMES, LayerPlan, RuntimePlan

__all__ = ["CSR", "CodesCSR", "RUNTIMES", "LayerPlan", "RuntimeModel", "RuntimePlan", "SparseConv2d", "SparseLinear",
           "backend", "build_runtime", "load_runtime", "prepare_graph", "reference_conv2d", "reference_linear",
           "sparse_conv2d", "sparse_linear"]
