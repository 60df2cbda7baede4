"""The Python API: the facade every CLI subcommand calls, and what a script uses.

    from pyprune import api
    model = api.load_model(arch="resnet56", pretrained=True)
    print(api.model_info(model).total)                      # params, bytes, MACs
    print(api.evaluate_model(model, split="test").accuracy)
    result = api.compile_model(model, api.CompileConfig(api.Target(max_drop=0.01), "out/", val_from="test"))

Loading (:func:`load_model`, :func:`load_runtime`: a saved model on the inference runtime), describing (:func:`model_info`,
:func:`inspect_file`, :func:`list_models`, :func:`list_passes`), evaluating and
training (:func:`evaluate_model`, :func:`train_model`), compressing
(:func:`optimize_model`, :func:`compile_model`) and writing (:func:`save_model`,
:func:`save_weights`, :func:`export_onnx`). The configuration types they take are
re-exported here, so a caller needs this module only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from .compile import (DEFAULT_ORDER, MEASURE_FROM, RECOVERY_MODELS, SEARCHES, CompileConfig, CompileResult,
                      compile_model, fp32_bytes)
from .data import DataSpec, DatasetNotFoundError
from .encode import CorruptFileError, GraphFormatError, graph_to_json, save_graph_module
from .encode.model_ppz import inspect_model, save_ppz
from .encode.saved import is_saved_model, load_saved_model
from . import export
from .export import DEFAULT_ATOL, DEFAULT_IMAGES, DEFAULT_OPSET, FORMS, MIN_OPSET, OnnxExportError, VerificationError
from .files import atomic_write
from .ir import LayerStats, TraceError, Totals, example_input, layer_stats, propagate_shapes, totals, trace
from .ir.from_export import ExportRaiseError, input_shape_of, raise_exported
from .ir.trace import leaf_matcher
from .models.exported import is_exported_program, load_exported_program
from .models import LoadedModel, ModelLoadError, available_models, find_or_fetch_pretrained, get_spec, resolve_model
from .opt import OptConfig, OptResult, optimize
from .passes import describe_passes, parse_levels, searchable_passes
from .runtime import RUNTIMES, load_runtime
from .search import Target
from .train import EpochLog, EvalResult, TrainConfig, evaluate, fine_tune, seed_everything

# Errors that are the caller's to fix (bad flags, missing files, untraceable or
# unsavable models): the command line prints their message, with no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ModelLoadError, DatasetNotFoundError, TraceError, OnnxExportError,
                                               FileNotFoundError, FileExistsError, ValueError)


def load_model(model_file: str | None = None, arch: str | None = None, weights: str | None = None,
               pretrained: bool = False, download: bool = False, trust_pickle: bool = False,
               seed: int = 0, num_classes: int = 10, input_size: int | None = None,
               leaf_modules: Sequence[str] = (), max_decoded_mb: float | None = None) -> LoadedModel:
    """Build or load a model the way every subcommand names one.

    ``pretrained`` looks up the published checkpoint of a zoo ``arch`` (see
    :mod:`pyprune.models.pretrained`) in place of ``weights``. A ``model_file``
    written by :func:`save_model` carries its own architecture and weights.
    ``input_size`` replaces the architecture's square input resolution (224 for
    ``torchvision:`` models), e.g. to fine-tune them on small images.
    ``leaf_modules`` names modules that tracing keeps as one opaque call (a class
    name, ``package.module:Class``, or a submodule's qualified name).
    ``max_decoded_mb`` bounds what a ``.ppz`` file's tensors may decode to (default:
    1024 times the file's size, at least 256 MiB), checked before anything is allocated."""
    if input_size is not None and input_size < 1:
        raise ValueError(f"--input-size must be a positive number of pixels, got {input_size}")
    for recognise, what, load in _SELF_DESCRIBING:
        if model_file and recognise(model_file):
            _refuse_flags(model_file, what, arch or weights or pretrained, input_size is not None, bool(leaf_modules))
            return load(model_file, decoded_bound(max_decoded_mb))
    if pretrained:
        if weights or model_file:
            raise ValueError("--pretrained replaces the weights file; give either --pretrained or a weights file")
        if not arch:
            raise ValueError("--pretrained needs --arch to name the zoo model")
        weights = str(find_or_fetch_pretrained(arch, download=download))
    seed_everything(seed)  # random initialisation is reproducible too
    module, spec = resolve_model(model_file, arch, weights, trust_pickle=trust_pickle, num_classes=num_classes)
    name = spec.name if spec else (arch or Path(model_file or "model").stem)
    model = LoadedModel.from_spec(module, spec, name)
    if input_size is not None:
        model.input_shape = (*model.input_shape[:-2], input_size, input_size)
    if leaf_modules:
        model.leaf_modules = resolve_leaf_modules(module, leaf_modules)
    return model


def decoded_bound(max_decoded_mb: float | None) -> int | None:
    """``--max-decoded-mb`` in bytes (None: the default bound)."""
    if max_decoded_mb is None:
        return None
    if not max_decoded_mb > 0:
        raise ValueError(f"--max-decoded-mb must be positive, got {max_decoded_mb}")
    return int(max_decoded_mb * 2**20)


def _load_exported(path: str | os.PathLike, max_bytes: int | None = None) -> LoadedModel:
    # a .pt2 stores its weights raw: nothing in it decodes to more than it holds
    ep = load_exported_program(path)
    try:
        gm = raise_exported(ep)
        input_shape = input_shape_of(ep)
    except ExportRaiseError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return LoadedModel(gm, Path(path).stem, input_shape=input_shape)


# Files that carry their architecture and weights: (is it one, what it is, load it).
_SELF_DESCRIBING: tuple[tuple[Callable[[Any], bool], str, Callable[[Any, int | None], LoadedModel]], ...] = (
    (is_saved_model, "a saved pyprune model", load_saved_model),
    (is_exported_program, "a torch.export program", _load_exported),
)


def _refuse_flags(model_file: str | os.PathLike, what: str, names_weights: bool, sizes_input: bool,
                  names_leaves: bool) -> None:
    if names_weights:
        raise ValueError(f"{model_file} is {what}: it carries its own architecture and weights, so give it "
                         "without --arch, --weights or --pretrained")
    if sizes_input:
        raise ValueError(f"{model_file} is {what}: it keeps the input size it was made for, so give it without "
                         "--input-size")
    if names_leaves:
        raise ValueError(f"{model_file} is {what}: it is a graph already, so give it without --leaf-module")


def resolve_leaf_modules(module: torch.nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """``names`` checked against ``module``: each must name a class of one of its
    submodules (``Block`` or ``package.module:Block``) or a submodule itself."""
    return leaf_matcher(module, names).names


@dataclass
class ModelInfo:
    name: str
    layers: list[LayerStats]
    total: Totals

    def to_dict(self) -> dict:
        return {"model": self.name, "layers": [r.to_dict() for r in self.layers], "total": self.total.to_dict()}


def trace_model(model: LoadedModel, batch: int = 1) -> fx.GraphModule:
    """Trace into the graph IR and annotate shapes with a batch of ``batch``."""
    gm = trace(model.module, leaf_modules=model.leaf_modules)
    return propagate_shapes(gm, example_input(model.input_shape, batch))


def model_info(model: LoadedModel) -> ModelInfo:
    """Per-layer parameters, bytes and MACs (per sample) of the traced model."""
    rows = layer_stats(trace_model(model))
    return ModelInfo(model.name, rows, totals(rows))


def list_models() -> list[tuple[str, str]]:
    """(name, description) of every zoo architecture."""
    return [(name, get_spec(name).description) for name in available_models()]


def list_passes() -> list[dict[str, Any]]:
    """Every registered pass, as ``pyprune passes --json`` prints it."""
    return describe_passes()


def evaluate_model(model: LoadedModel, data: DataSpec | str = "cifar10", split: str = "test",
                   limit: int | None = None, batch_size: int = 500, progress: bool = True) -> EvalResult:
    dataset = DataSpec.of(data).load(split, limit, input_shape=model.input_shape, model=model.described)
    return evaluate(model.module, dataset, model.mean, model.std, batch_size=batch_size, progress=progress)


def train_model(model: LoadedModel, config: TrainConfig, data: DataSpec | str = "cifar10", split: str = "train",
                limit: int | None = None) -> list[EpochLog]:
    dataset = DataSpec.of(data).load(split, limit, input_shape=model.input_shape, model=model.described)
    return fine_tune(model.module, dataset, model.mean, model.std, config)


def optimize_model(model: LoadedModel, config: OptConfig, log: Callable[[str], None] = lambda _: None,
                   output: str | os.PathLike | None = None) -> OptResult:
    """Run ``config.pipeline`` on ``model`` (see :mod:`pyprune.opt`); ``model.module``
    is changed. With ``output``, the model is first checked to be savable there, so
    that a model the file format cannot describe fails before any work."""
    if output is not None:
        check_savable(model, output)
    return optimize(model.module, model.mean, model.std, model.input_shape, config, log=log,
                    leaf_modules=model.leaf_modules)


def check_savable(model: LoadedModel, output: str | os.PathLike) -> None:
    """Raise :class:`GraphFormatError` now if ``model`` could not be saved at ``output``."""
    try:
        graph_to_json(trace(model.module, leaf_modules=model.leaf_modules))
    except GraphFormatError as exc:
        raise GraphFormatError(f"{output} could not hold this model: {exc}") from None


def save_weights(model: LoadedModel, path: str | Path, force: bool = False) -> Path:
    """Save the state dict (loadable with ``weights_only=True``); never overwrite
    an existing file unless ``force``."""
    state = {"arch": model.name, "state_dict": model.module.state_dict()}
    return atomic_write(path, lambda f: torch.save(state, f), force=force)


def save_model(model: LoadedModel, path: str | Path, gm: fx.GraphModule | None = None,
               provenance: list | None = None, codebooks: dict[str, torch.Tensor] | None = None,
               force: bool = False) -> Path:
    """Save architecture and weights in one file that :func:`load_model` reads back
    with no ``arch``: the compressed ``.ppz`` container (``docs/format.md``) when the
    name ends in ``.ppz``, else a plain graph file (``docs/graph-format.md``). ``gm``
    is the graph to save (default: ``model.module`` traced); ``provenance`` is any JSON
    list, e.g. the passes run; ``codebooks`` are quantized layers' codebooks."""
    # model.module still has the shapes it was loaded with (passes rewrite the traced
    # copy), so it gives the size every later ratio is taken against
    meta = {**model.meta(), "original_fp32_bytes": fp32_bytes(model.module),
            "provenance": list(provenance or [])}
    gm = gm if gm is not None else trace(model.module, leaf_modules=model.leaf_modules)
    if Path(path).suffix == ".ppz":
        return save_ppz(gm, path, meta, codebooks, force=force)
    if codebooks:
        raise ValueError(f"{path}: codebooks are stored only in a .ppz container")
    return save_graph_module(gm, path, meta, force=force)


def inspect_file(path: str | os.PathLike, max_decoded_mb: float | None = None) -> dict[str, Any]:
    """How a ``.ppz`` file stores each tensor (see :func:`pyprune.encode.inspect`);
    ``max_decoded_mb`` as :func:`load_model` takes it."""
    return inspect_model(path, decoded_bound(max_decoded_mb))


def export_onnx(model: LoadedModel, output: str | Path, form: str = "compact", verify: int = DEFAULT_IMAGES,
                data: DataSpec | str = "cifar10", split: str = "val", atol: float = DEFAULT_ATOL,
                opset: int = DEFAULT_OPSET, sparse_initializers: bool = False, force: bool = False) -> export.OnnxReport:
    """Export to ONNX (see :mod:`pyprune.export`) and verify on the first ``verify``
    images of ``split`` (0: no verification). The data is loaded before anything is
    exported, so a missing dataset costs nothing."""
    if verify < 0:
        raise ValueError(f"--verify must be >= 0, got {verify}")
    export.check_export_settings(form, opset)
    if Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    inputs = description = None
    if verify:
        try:
            dataset = DataSpec.of(data).load(split, verify, input_shape=model.input_shape, model=model.described)
        except DatasetNotFoundError as exc:
            raise DatasetNotFoundError(f"{exc}\nThe ONNX file is verified on that data; --verify 0 writes it "
                                       "unverified.") from None
        inputs, description = export.verification_inputs(dataset, verify, model.mean, model.std)
    return export.write_onnx(model.module, output, form, model.input_shape, inputs=inputs, data=description, atol=atol,
                      opset=opset, meta=model.meta(), sparse_initializers=sparse_initializers, force=force)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


__all__: Sequence[str] = [
    "CompileConfig", "CompileResult", "CorruptFileError", "DEFAULT_ATOL", "DEFAULT_ORDER", "SEARCHES", "DEFAULT_IMAGES", "DEFAULT_OPSET", "MEASURE_FROM",
    "RECOVERY_MODELS",
    "DataSpec", "EpochLog", "EvalResult", "FORMS", "LoadedModel", "MIN_OPSET", "ModelInfo",
    "OptConfig", "OptResult", "RUNTIMES", "Target", "TrainConfig", "USER_ERRORS", "VerificationError",
    "check_savable", "compile_model", "decoded_bound", "evaluate_model", "export_onnx", "inspect_file", "list_models", "list_passes",
    "load_model", "load_runtime", "model_info", "optimize_model", "parse_levels", "resolve_leaf_modules",
    "save_model", "save_weights", "searchable_passes", "set_threads", "trace_model", "train_model"]
