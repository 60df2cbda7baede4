"""The Python API behind the command line: load a model, describe it, evaluate
it, fine-tune it. Every CLI subcommand is a thin wrapper over one function here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from .data import DatasetNotFoundError, load_dataset
from .encode import is_graph_file, load_graph_module, save_graph_module
from .encode.files import atomic_write
from .encode.model_ppz import load_ppz, save_ppz
from .encode.ppz import is_ppz
from .export import DEFAULT_ATOL, DEFAULT_OPSET, OnnxReport, check_export_settings, verification_inputs, write_onnx
from .ir import LayerStats, Totals, example_input, layer_stats, propagate_shapes, totals, trace
from .models import ModelSpec, find_or_fetch_pretrained, resolve_model
from .models.registry import DEFAULT_MEAN, DEFAULT_STD
from .train import EpochLog, EvalResult, TrainConfig, evaluate, fine_tune, seed_everything


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: its normalisation and input shape."""

    module: nn.Module
    name: str
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    input_shape: tuple[int, ...] = (3, 32, 32)

    @classmethod
    def from_spec(cls, module: nn.Module, spec: ModelSpec | None, name: str) -> "LoadedModel":
        if spec is None:
            return cls(module, name)
        return cls(module, spec.name, tuple(spec.mean), tuple(spec.std), tuple(spec.input_shape))


def load_model(model_file: str | None = None, arch: str | None = None, weights: str | None = None,
               pretrained: bool = False, download: bool = False, trust_pickle: bool = False,
               seed: int = 0, num_classes: int = 10, input_size: int | None = None) -> LoadedModel:
    """Build or load a model the way every subcommand names one.

    ``pretrained`` looks up the published checkpoint of a zoo ``arch`` (see
    :mod:`pyprune.models.pretrained`) in place of ``weights``. A ``model_file``
    written by :func:`save_model` carries its own architecture and weights.
    ``input_size`` replaces the architecture's square input resolution (224 for
    ``torchvision:`` models), e.g. to fine-tune them on small images."""
    if input_size is not None and input_size < 1:
        raise ValueError(f"--input-size must be a positive number of pixels, got {input_size}")
    container = model_file and (is_ppz(model_file) or is_graph_file(model_file))
    if container:
        if arch or weights or pretrained:
            raise ValueError(f"{model_file} is a saved pyprune model: it carries its own architecture and "
                             "weights, so give it without --arch, --weights or --pretrained")
        if input_size is not None:
            raise ValueError(f"{model_file} is a saved pyprune model: it keeps the input size it was traced "
                             "and compressed at, so give it without --input-size")
        gm, meta = load_ppz(model_file) if is_ppz(model_file) else load_graph_module(model_file)
        return LoadedModel(gm, str(meta.get("arch") or Path(model_file).stem),
                           tuple(meta.get("mean", DEFAULT_MEAN)), tuple(meta.get("std", DEFAULT_STD)),
                           tuple(meta.get("input_shape", (3, 32, 32))))
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
    return model


@dataclass
class ModelInfo:
    name: str
    layers: list[LayerStats]
    total: Totals

    def to_dict(self) -> dict:
        return {"model": self.name, "layers": [r.to_dict() for r in self.layers], "total": self.total.to_dict()}


def trace_model(model: LoadedModel, batch: int = 1) -> fx.GraphModule:
    """Trace into the graph IR and annotate shapes with a batch of ``batch``."""
    gm = trace(model.module)
    return propagate_shapes(gm, example_input(model.input_shape, batch))


def model_info(model: LoadedModel) -> ModelInfo:
    """Per-layer parameters, bytes and MACs (per sample) of the traced model."""
    rows = layer_stats(trace_model(model))
    return ModelInfo(model.name, rows, totals(rows))


def evaluate_model(model: LoadedModel, data: str = "cifar10", split: str = "test",
                   data_root: str | None = None, download: bool = False, limit: int | None = None,
                   batch_size: int = 500, progress: bool = True) -> EvalResult:
    dataset = load_dataset(data, split, data_root=data_root, download=download, limit=limit,
                           input_shape=model.input_shape)
    return evaluate(model.module, dataset, model.mean, model.std, batch_size=batch_size, progress=progress)


def train_model(model: LoadedModel, config: TrainConfig, data: str = "cifar10", split: str = "train",
                data_root: str | None = None, download: bool = False,
                limit: int | None = None) -> list[EpochLog]:
    dataset = load_dataset(data, split, data_root=data_root, download=download, limit=limit,
                           input_shape=model.input_shape)
    return fine_tune(model.module, dataset, model.mean, model.std, config)


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
    meta = {"arch": model.name, "mean": list(model.mean), "std": list(model.std),
            "input_shape": list(model.input_shape), "provenance": list(provenance or [])}
    gm = gm if gm is not None else trace(model.module)
    if Path(path).suffix == ".ppz":
        return save_ppz(gm, path, meta, codebooks, force=force)
    if codebooks:
        raise ValueError(f"{path}: codebooks are stored only in a .ppz container")
    return save_graph_module(gm, path, meta, force=force)


def export_model_onnx(model: LoadedModel, output: str | Path, form: str = "compact", verify: int = 256,
                      data: str = "cifar10", split: str = "val", data_root: str | None = None,
                      download: bool = False, atol: float = DEFAULT_ATOL, opset: int = DEFAULT_OPSET,
                      sparse_initializers: bool = False, force: bool = False) -> OnnxReport:
    """Export to ONNX (see :mod:`pyprune.export`) and verify on the first ``verify``
    images of ``split`` (0: no verification). The data is loaded before anything is
    exported, so a missing dataset costs nothing."""
    if verify < 0:
        raise ValueError(f"--verify must be >= 0, got {verify}")
    check_export_settings(form, opset)
    if Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it")
    inputs = description = None
    if verify:
        try:
            dataset = load_dataset(data, split, data_root=data_root, download=download, limit=verify,
                                   input_shape=model.input_shape)
        except DatasetNotFoundError as exc:
            raise DatasetNotFoundError(f"{exc}\nThe ONNX file is verified on that data; --verify 0 writes it "
                                       "unverified.") from None
        inputs, description = verification_inputs(dataset, verify, model.mean, model.std)
    meta = {"arch": model.name, "mean": list(model.mean), "std": list(model.std),
            "input_shape": list(model.input_shape)}
    return write_onnx(model.module, output, form, model.input_shape, inputs=inputs, data=description, atol=atol,
                      opset=opset, meta=meta, sparse_initializers=sparse_initializers, force=force)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


__all__: Sequence[str] = ["LoadedModel", "ModelInfo", "evaluate_model", "export_model_onnx", "load_model", "model_info",
                          "save_model", "save_weights", "set_threads", "trace_model", "train_model"]
