"""Loading models and weights: state dicts, user factories, pickled modules.

:func:`resolve_model` is the one way every CLI subcommand turns its model
arguments into an ``nn.Module``:

* ``--arch NAME [--weights FILE]``  zoo model, random init unless weights given
* ``MODEL --arch NAME``             the same, the checkpoint given positionally
* ``--arch torchvision:NAME``       a torchvision classifier, never downloaded (weights optional)
* ``--arch pkg.mod:callable``       a user's factory or class (weights optional)
* ``MODEL`` alone                   a whole pickled ``nn.Module`` (``--trust-pickle``)

Weights are always read with ``torch.load(weights_only=True)``, which cannot
run code; full unpickling happens only for a whole pickled module and only
when the user says they trust the file.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..files import zip_bomb_problem
from ..text import first_line
from .registry import ModelSpec, available_models, get_spec
from .torchvision_zoo import is_torchvision_arch, torchvision_spec

__all__ = [
    "ModelLoadError",
    "load_state_dict_file",
    "load_weights",
    "build_user_model",
    "load_pickled_module",
    "resolve_model",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# How many keys of each kind a mismatch message lists before "... and N more".
_MAX_LISTED = 10

_PICKLE_WARNING = (
    "Unpickling runs arbitrary code stored in the file; pass --trust-pickle "
    "(trust_pickle=True) only for files you trust."
)


HOW_TO_EXPORT = ("torch.export.save(torch.export.export(model.eval(), (torch.randn(1, 3, H, W),)), "
                 "'model.pt2')")

FORMATS = ("pyprune reads with no --arch its own .ppz and graph files and torch.export programs (.pt2, made with "
           f"{HOW_TO_EXPORT}); a state dict needs --arch; a whole pickled module needs --trust-pickle")


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says why and what to do."""


def _existing_file(path: PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"model path is not a file: {p}")
    if _is_torchscript(p):
        raise ModelLoadError(f"{p} is a TorchScript archive (torch.jit.save), which keeps no module structure to "
                             f"prune, so pyprune does not read it. Export the model instead: {FORMATS}")
    return p


def _is_torchscript(path: Path) -> bool:
    # torch.save archives hold data.pkl; TorchScript ones hold their code and constants.pkl
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _strip_module_prefix(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    # Checkpoints saved from DataParallel/DDP wrappers prefix every key with "module.".
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = key[len("module."):] if key.startswith("module.") else key
        if new in out:
            raise ModelLoadError(f"{source}: key {key!r} collides with {new!r} once 'module.' is stripped")
        out[new] = value
    return out


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded checkpoint object."""
    if isinstance(obj, nn.Module):
        raise ModelLoadError(f"{source} holds a whole nn.Module, not a state dict")
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{source} does not hold a state dict (loaded a {type(obj).__name__})"
        )
    # Training scripts commonly wrap the weights with metadata (epoch, best accuracy, ...).
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        listed = ", ".join(repr(k) for k in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise ModelLoadError(
            f"{source} is not a state dict of tensors: entries {listed}{more} are not "
            "name -> tensor (expected a plain state dict, or one under 'state_dict' or 'model')"
        )
    return _strip_module_prefix(obj, source)


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)`` on the CPU.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``; strips a leading ``module.`` from every key.
    """
    p = _existing_file(path)
    _refuse_zip_bomb(p)
    try:
        obj = load_weights_only(p)
    except pickle.UnpicklingError as exc:
        detail = weights_only_detail(exc)
        if "Unsupported global" in detail:
            # weights_only refuses any class outside its allow-list: in practice a
            # checkpoint made with torch.save(model) rather than model.state_dict().
            raise ModelLoadError(
                f"{p} holds pickled Python objects, not only weights: it is probably a whole "
                f"model saved with torch.save(model) rather than model.state_dict(). Either "
                f"save the state dict instead, or load the file as a whole module (MODEL "
                f"without --arch) with --trust-pickle. {_PICKLE_WARNING} (torch said: {detail})"
            ) from exc
        raise ModelLoadError(f"{p} is not a readable PyTorch checkpoint ({detail})") from exc
    except Exception as exc:  # torch raises many types on junk (IndexError, RuntimeError, ...)
        raise ModelLoadError(f"{p} is not a readable PyTorch checkpoint ({first_line(exc)})") from exc
    return _unwrap_state_dict(obj, str(p))


def load_weights_only(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, without torch's warning about the
    scan of sparse tensors (a model file that holds one is then refused in one line)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Validating sparse tensor invariants", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refuse_zip_bomb(path: Path) -> None:
    """Before torch.load, which allocates each zip entry at its declared size."""
    bomb = zip_bomb_problem(path)
    if bomb:
        raise ModelLoadError(f"{path}: {bomb}")


def weights_only_detail(exc: BaseException) -> str:
    """What torch.load(weights_only=True) refused, from its long advice: the
    "WeightsUnpickler error: ..." part."""
    for line in str(exc).splitlines():
        _, found, rest = line.partition("WeightsUnpickler error:")
        if found:
            return rest.split(". Please use")[0].strip() or "unreadable pickle data"
    return first_line(exc)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def load_weights(
    model: nn.Module,
    path_or_state: PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
) -> nn.Module:
    """Load weights into ``model`` in place and return it.

    Keys and shapes are compared before anything is copied, so a mismatch
    leaves the model untouched and raises :class:`ModelLoadError` listing
    missing, unexpected and mis-shaped keys. Missing ``num_batches_tracked``
    buffers are not a mismatch (many checkpoints predate them). With
    ``strict=False`` missing and unexpected keys are only logged; wrong shapes
    are always an error.
    """
    if isinstance(path_or_state, Mapping):
        source = "state dict"
        state = _unwrap_state_dict(path_or_state, source)
    else:
        source = str(path_or_state)
        state = load_state_dict_file(path_or_state)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if misshaped or (strict and (missing or unexpected)):
        parts = [f"weights in {source} do not fit {type(model).__name__}:"]
        if missing:
            parts.append(_listing("missing keys (in the model, not in the checkpoint)", missing))
        if unexpected:
            parts.append(_listing("unexpected keys (in the checkpoint, not in the model)", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped keys", misshaped))
        parts.append("  (is --arch the architecture these weights were trained for?)")
        raise ModelLoadError("\n".join(parts))
    if missing or unexpected:
        log.warning("non-strict load from %s: %d missing, %d unexpected keys ignored",
                    source, len(missing), len(unexpected))
    # Our own check above is the strict one; strict=False here only lets absent
    # num_batches_tracked buffers (and, when not strict, the logged keys) pass.
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


def build_user_model(target: str, **kwargs: Any) -> nn.Module:
    """Import ``package.module:callable`` and call it with ``kwargs``.

    The callable may be a factory function or an ``nn.Module`` class, and may
    be a dotted attribute path (``pkg.mod:Zoo.small``). The current directory
    is importable, as with ``python -m``, so a ``mymodel.py`` next to the user
    is found by ``--arch mymodel:Net``.
    """
    return _call_user(target, _resolve_user_callable(target), kwargs)


def _resolve_user_callable(target: str) -> Any:
    module_name, sep, attr_path = target.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path:
        raise ModelLoadError(
            f"bad model callable {target!r}: expected the form 'package.module:callable'"
        )
    obj: Any = _import_user_module(module_name, target)
    parts = attr_path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            where = ".".join([module_name, *parts[:i]])
            raise ModelLoadError(f"{target!r}: {where} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"{target!r} is a {type(obj).__name__}, not a callable")
    return obj


def _call_user(target: str, fn: Any, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        result = fn(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"calling {target}({_kwargs_repr(kwargs)}) failed: {exc!r}") from exc
    if not isinstance(result, nn.Module):
        raise ModelLoadError(
            f"{target}({_kwargs_repr(kwargs)}) returned a {type(result).__name__}, "
            "not a torch.nn.Module"
        )
    return result


def _kwargs_repr(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _import_user_module(module_name: str, target: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    # A file written since the interpreter started may be hidden by the finders' caches.
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Distinguish "your module does not exist" from "your module imports
        # something that is not installed".
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelLoadError(
                f"{target!r}: cannot find module {module_name!r} "
                f"(not installed, and not under the current directory {cwd})"
            ) from exc
        raise ModelLoadError(f"{target!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"{target!r}: importing {module_name!r} failed: {exc!r}") from exc
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:
                pass


def load_pickled_module(path: PathLike, trust_pickle: bool) -> nn.Module:
    """Load a whole pickled ``nn.Module`` (``torch.save(model)``), only if trusted."""
    p = _existing_file(path)
    if not trust_pickle:
        raise ModelLoadError(
            f"{p} would have to be unpickled as a whole model. {_PICKLE_WARNING} ({FORMATS})"
        )
    _refuse_zip_bomb(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"could not unpickle {p}: {first_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        if isinstance(obj, Mapping):
            raise ModelLoadError(
                f"{p} holds a dict (a state dict or checkpoint), not a whole model; "
                f"name its architecture with --arch"
            )
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _build_arch(arch: str, num_classes: int) -> tuple[nn.Module, ModelSpec | None]:
    # Before the "module:callable" form, which "torchvision:NAME" would otherwise match.
    if is_torchvision_arch(arch):
        try:
            spec = torchvision_spec(arch)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        return _call_user(spec.name, spec.build, {"num_classes": num_classes}), spec
    if ":" in arch:
        fn = _resolve_user_callable(arch)
        # Pass num_classes only to callables that declare it: a user's factory
        # need not take it, and its own default is then the right one.
        try:
            takes_classes = "num_classes" in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no introspectable signature
            takes_classes = False
        kwargs = {"num_classes": num_classes} if takes_classes else {}
        return _call_user(arch, fn, kwargs), None
    try:
        spec = get_spec(arch)
    except ValueError:
        raise ModelLoadError(
            f"unknown architecture {arch!r}; available: {', '.join(available_models())}, "
            "a torchvision classifier as 'torchvision:NAME', or a user model as 'package.module:callable'"
        ) from None
    return spec.build(num_classes=num_classes), spec


def resolve_model(
    model_file: PathLike | None,
    arch: str | None,
    weights: PathLike | None,
    trust_pickle: bool = False,
    num_classes: int = 10,
) -> tuple[nn.Module, ModelSpec | None]:
    """Turn the CLI's model arguments into a model (and its zoo spec, if any).

    ``arch`` alone builds a randomly initialised model (the caller seeds the
    RNG). The checkpoint may be given as ``weights`` or positionally as
    ``model_file``, not both. ``model_file`` without ``arch`` is a whole
    pickled module and needs ``trust_pickle``.
    """
    if model_file is not None and weights is not None:
        raise ModelLoadError(
            "give the checkpoint either as MODEL or as --weights, not both "
            f"(got MODEL={model_file} and --weights={weights})"
        )
    if arch is None:
        if weights is not None:
            raise ModelLoadError("--weights needs --arch to say which architecture they belong to")
        if model_file is None:
            raise ModelLoadError(
                "no model given: pass --arch NAME (optionally with --weights FILE), "
                "a MODEL checkpoint with --arch, or a whole pickled MODEL with --trust-pickle; "
                f"zoo models: {', '.join(available_models())}"
            )
        return _load_whole_module(model_file, trust_pickle), None

    model, spec = _build_arch(arch, num_classes)
    checkpoint = weights if weights is not None else model_file
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=True)
    return model, spec


def _looks_like(state: Mapping[str, torch.Tensor]) -> str | None:
    """"this looks like resnet20: add --arch resnet20" when the keys and shapes of
    ``state`` are those of a zoo architecture (with any number of classes)."""
    keys = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name in available_models():
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = get_spec(name).build(num_classes=10)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        if want.keys() != keys.keys():
            continue
        differ = [k for k in want if want[k] != keys[k]]
        classifier = [k for k, v in model.named_modules() if isinstance(v, nn.Linear)][-1:]
        # only the classifier may differ, and only in its number of outputs
        if all(k.rpartition(".")[0] in classifier and keys[k][1:] == want[k][1:] for k in differ):
            classes = keys[f"{classifier[0]}.weight"][0] if classifier else 10
            extra = f" --num-classes {classes}" if classes != 10 else ""
            return f"this looks like {name}: add --arch {name}{extra}"
    return None


def _load_whole_module(model_file: PathLike, trust_pickle: bool) -> nn.Module:
    p = _existing_file(model_file)
    _refuse_zip_bomb(p)  # before the refusal below blames pickles
    if not trust_pickle:
        # A weights-only read is safe; if it succeeds the file is a state dict
        # and the useful advice is --arch, not --trust-pickle.
        try:
            load_state_dict_file(p)
        except ModelLoadError:
            pass
        else:
            raise ModelLoadError(f"{p} holds weights (a state dict), not a whole model: "
                                 + (_looks_like(load_state_dict_file(p)) or "name its architecture with --arch (zoo: "
                                    f"{', '.join(available_models())}, or 'package.module:callable')"))
    return load_pickled_module(p, trust_pickle)
