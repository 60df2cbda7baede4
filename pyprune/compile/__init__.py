"""``pyprune compile``: the smallest model that still meets an accuracy target.

* :mod:`.config`: what a compile is asked (:class:`CompileConfig`) and its fingerprint;
* :mod:`.driver`: checks, baseline and target, the search, then the outputs;
* :mod:`.final`: the chosen model written as ``model.ppz`` and measured as written;
* :mod:`.outputs`: the output folder (``--resume``/``--force``), ``model.onnx``, the report files;
* :mod:`.report`: ``report.json``'s content, ``report.md`` and ``pareto.png``.
"""

from .config import DEFAULT_ORDER, MEASURE_FROM, RECOVERY_MODELS, SEARCHES, VAL_FROM, CompileConfig
from .driver import EXIT_ONNX_FAILED, CompileResult, compile_model
from .final import FinalModel, fp32_bytes
from .outputs import OUTPUTS, STATE_DIR

__all__ = ["CompileConfig", "CompileResult", "DEFAULT_ORDER", "EXIT_ONNX_FAILED", "FinalModel", "OUTPUTS",
           "MEASURE_FROM", "RECOVERY_MODELS", "SEARCHES", "STATE_DIR", "VAL_FROM", "compile_model", "fp32_bytes"]
