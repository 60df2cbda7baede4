"""Save and load a traced model (a ``torch.fx.GraphModule``) without pickling code.

Contract (the format itself is specified in ``docs/graph-format.md``):

* :func:`graph_to_json` turns a GraphModule into a JSON-able dict: the leaf
  modules its ``call_module`` nodes use (type name + constructor config), the
  ``get_attr`` tensors, and the nodes in order. Only allowlisted module types,
  functions, tensor methods and argument types serialize; anything else raises
  :class:`GraphFormatError` naming the node, the op and the offending value.
  The allowlists (:data:`MODULE_TYPES`, :data:`FUNCTIONS`, :data:`METHODS`) are
  filled by :mod:`pyprune.ops`, where each op says whether it serializes.
* :func:`graph_from_json` rebuilds a GraphModule from such a dict and a state
  dict. The dict is untrusted input: every module type, function and method
  name must be in the allowlists, every name that reaches fx's generated Python
  source must be a plain identifier (fx ``exec``s that source), modules are
  built on the meta device (a huge width allocates nothing), and the state dict
  must match the rebuilt modules exactly (keys and shapes). Returns eval mode.
  The module takes the given tensors as its own (``assign=True``, no copy).
* :func:`save_graph_module` writes one file with ``torch.save`` holding only
  strings and tensors: ``{"format", "version", "graph": JSON text, "meta": JSON
  text, "state_dict"}``. Atomic (temporary file, then rename); never
  overwrites unless ``force``.
* :func:`load_graph_module` reads it back with ``torch.load(weights_only=True)``,
  which cannot run code, and returns ``(graph_module, meta)``.
* :func:`is_graph_file` says whether a path holds such a file (reads it
  weights-only with mmap, so it is cheap and safe on any file).
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
import os
import pickle
import re
import unicodedata
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from ..files import atomic_write, zip_bomb_problem
from ..models.loaded import MAX_INPUT_ELEMENTS
from ..models.loading import load_weights_only, weights_only_detail
from ..text import first_line

__all__ = ["FORMAT", "VERSION", "FUNCTIONS", "METHODS", "MODULE_TYPES", "GraphFormatError", "allow_function",
           "allow_method", "allow_module_type", "disallow_function", "disallow_method", "disallow_module_type",
           "graph_from_json", "graph_state_dict", "graph_to_json", "is_graph_file", "load_graph_module",
           "module_config", "save_graph_module"]

FORMAT = "pyprune.graph"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class GraphFormatError(ValueError):
    """A graph cannot be serialized, or a document/file is not a valid pyprune graph."""


# ---------------------------------------------------------------------------
# Allowlists. Adding an entry is a format change only in the sense that older
# readers refuse documents using it; existing documents keep their meaning.
# The entries are not listed here: each op declares whether it serializes next to
# its channel handler and MAC rule, in pyprune.ops, which fills these tables
# through allow_module_type / allow_function / allow_method when pyprune is
# imported.

MODULE_TYPES: dict[str, type[nn.Module]] = {}  # class name -> class

# Stable name -> callable. Names are what a document says, never imported by name.
FUNCTIONS: dict[str, Callable[..., Any]] = {}
# The writer's side of FUNCTIONS: callable -> the name written for it.
_FUNCTION_NAMES: dict[Callable[..., Any], str] = {}

# Called with the function names a document uses, before it is decoded: where a
# layer above supports ops of a package not imported yet, it registers them here.
BEFORE_DECODE: list[Callable[[Iterable[str]], None]] = []

# Tensor method names for call_method nodes (fx calls getattr(self, name)(...)).
METHODS: set[str] = set()


def allow_module_type(cls: type[nn.Module]) -> None:
    """Allow ``cls`` (by exact type) in documents, under its class name."""
    known = MODULE_TYPES.get(cls.__name__)
    if known is not None and known is not cls:
        # Documents name types by class name only, so two classes cannot share one.
        raise ValueError(f"module type name {cls.__name__!r} is already allowlisted for "
                         f"{known.__module__}.{known.__qualname__}")
    MODULE_TYPES[cls.__name__] = cls


def allow_function(name: str, fn: Callable[..., Any]) -> None:
    """Allow ``fn`` in documents under the stable ``name``."""
    known = FUNCTIONS.get(name)
    if known is not None and known is not fn:
        raise ValueError(f"function name {name!r} is already allowlisted for another callable ({known!r})")
    FUNCTIONS[name] = fn
    # Where one callable has two names (an alias in some torch version), both are
    # read and the first one registered stays the one written: declaring an alias
    # later does not change the files existing code writes.
    _FUNCTION_NAMES.setdefault(fn, name)


def allow_method(name: str) -> None:
    """Allow tensor method ``name`` in ``call_method`` nodes."""
    # A method name becomes Python source in fx's generated forward.
    if not _identifier(name):
        raise ValueError(f"method name {name!r} is not a Python identifier")
    METHODS.add(name)


def disallow_module_type(cls: type[nn.Module]) -> None:
    """Undo :func:`allow_module_type`; a type that is not allowlisted is ignored."""
    if MODULE_TYPES.get(cls.__name__) is cls:
        del MODULE_TYPES[cls.__name__]


def disallow_function(name: str) -> None:
    """Undo :func:`allow_function`; a name that is not allowlisted is ignored."""
    fn = FUNCTIONS.pop(name, None)
    if fn is None or _FUNCTION_NAMES.get(fn) != name:
        return
    del _FUNCTION_NAMES[fn]
    other = next((n for n, f in FUNCTIONS.items() if f is fn), None)
    if other is not None:
        _FUNCTION_NAMES[fn] = other


def disallow_method(name: str) -> None:
    """Undo :func:`allow_method`; a name that is not allowlisted is ignored."""
    METHODS.discard(name)


# builtins.getattr reaches only these attributes: an arbitrary name ("__class__",
# "__globals__") would let a document walk from a tensor to any Python object.
_GETATTR_NAMES = frozenset("shape dtype device ndim".split())

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64)}
_MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in (
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
# A qualified name's parts become Python source in fx's generated forward.
# nn.Module.add_module refuses, besides names with a dot, every name the module
# already has as an attribute; those are the reserved ones.
_RESERVED_NAMES = frozenset(dir(nn.Module()))


def qualname_problem(qualname: object) -> str | None:
    """Why ``qualname`` cannot name a submodule or tensor (None if it can): the one
    rule the writer and the reader both apply. A name is what PyTorch accepts, dot
    separated: no empty part, none an attribute every ``nn.Module`` has, no control
    characters, no quotes or backslashes and no Python keywords, which torch.fx's
    generated code cannot hold."""
    if not isinstance(qualname, str) or not qualname:
        return "a name must be a non-empty string"
    for part in qualname.split("."):
        if not part:
            return "it has an empty part"
        if part in _RESERVED_NAMES:
            return f"{part!r} is an attribute every nn.Module has"
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            return "it holds control characters"
        if '"' in part or "\\" in part:
            return "torch.fx writes it into generated code unescaped, so it cannot hold quotes or backslashes"
        if keyword.iskeyword(part):
            return "it is a Python keyword, which torch.fx writes as an attribute in generated code"
        if part.isidentifier() and unicodedata.normalize("NFKC", part) != part:
            return "torch.fx writes it as an attribute, which Python reads as another name (NFKC)"
    return None


def _check_qualname(qualname: object, what: str) -> None:
    problem = qualname_problem(qualname)
    if problem:
        raise GraphFormatError(f"bad {what} name {qualname!r:.80}: {problem}")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*\Z")


def _identifier(s: object) -> bool:
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


# ---------------------------------------------------------------------------
# Values: node references and Python constants <-> JSON.

def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):  # bool before int is implied: JSON keeps both
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}  # 'inf', '-inf', 'nan'
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):  # includes fx's immutable_list
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format) and value in _MEMORY_FORMATS.values():
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise GraphFormatError(f"{where}: cannot serialize a value of type {type(value).__module__}."
                           f"{type(value).__qualname__} ({value!r:.80}); allowed are nodes, None, bool, int, "
                           "float, str, tuple, list, dict with str keys, slice, Ellipsis, dtype, memory_format, "
                           "device")


def _decode(value: Any, where: str, nodes: Mapping[str, fx.Node] | None) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, where, nodes) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise GraphFormatError(f"{where}: malformed value {value!r:.80}")
    (tag, body), = value.items()
    if tag == "node" and nodes is not None:
        if not isinstance(body, str) or body not in nodes:
            raise GraphFormatError(f"{where}: refers to node {body!r}, which is not defined before it")
        return nodes[body]
    if tag == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if tag == "tuple" and isinstance(body, list):
        return tuple(_decode(v, where, nodes) for v in body)
    if tag == "dict" and isinstance(body, dict):
        return {k: _decode(v, where, nodes) for k, v in body.items()}
    if tag == "slice" and isinstance(body, list) and len(body) == 3:
        return slice(*(_decode(v, where, nodes) for v in body))
    if tag == "ellipsis" and body is True:
        return Ellipsis
    for name, table in (("dtype", _DTYPES), ("memory_format", _MEMORY_FORMATS)):
        if tag == name:
            if not isinstance(body, str) or body not in table:
                raise GraphFormatError(f"{where}: unknown {name} {body!r}; known: {', '.join(table)}")
            return table[body]
    if tag == "device" and isinstance(body, str):
        try:
            device = torch.device(body)
        except RuntimeError as exc:
            raise GraphFormatError(f"{where}: bad device {body!r}") from exc
        _check_device_arg(device, where)
        return device
    raise GraphFormatError(f"{where}: unknown or malformed value tag {tag!r} in {value!r:.80}")


# ---------------------------------------------------------------------------
# Modules: allowlisted type + constructor config read back from attributes.

def _init_params(cls: type[nn.Module]) -> list[inspect.Parameter]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    return [p for p in params if p.name not in ("device", "dtype")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def module_config(module: nn.Module, where: str) -> dict[str, Any]:
    """Constructor arguments of an allowlisted module, read from same-named attributes."""
    config = {}
    for p in _init_params(type(module)):
        if not hasattr(module, p.name):
            raise GraphFormatError(f"{where}: {type(module).__name__} has no attribute {p.name!r} to "
                                   "recover its constructor argument from")
        value = getattr(module, p.name)
        if isinstance(p.default, bool) and not isinstance(value, bool):
            value = value is not None  # flags like bias=True are stored as a tensor or None
        config[p.name] = _encode(value, where)
    return config


def _public_state(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def _build_module(type_name: str, config: Any, where: str) -> nn.Module:
    cls = MODULE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise GraphFormatError(f"{where}: module type {type_name!r} is not in the allowlist "
                               f"({', '.join(sorted(MODULE_TYPES))})")
    if not isinstance(config, dict):
        raise GraphFormatError(f"{where}: config must be an object, got {config!r:.80}")
    allowed = {p.name for p in _init_params(cls)}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise GraphFormatError(f"{where}: {type_name} takes no argument(s) {', '.join(unknown)}")
    kwargs = {k: _decode(v, f"{where} config {k!r}", None) for k, v in config.items()}
    try:
        with torch.device("meta"), warnings.catch_warnings():  # shapes only; the state dict brings the values
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            return cls(**kwargs)
    except Exception as exc:
        raise GraphFormatError(f"{where}: cannot build {type_name}({kwargs!s:.200}): {first_line(exc)}") from exc


def _get_attr_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------
# Graph <-> document.

def _node_where(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else (
        f"{getattr(node.target, '__module__', '?')}.{getattr(node.target, '__qualname__', node.target)}")
    return f"node {node.name!r} ({node.op} {target})"


def _check_getattr(args: tuple, where: str) -> None:
    if len(args) != 2 or not isinstance(args[1], str) or args[1] not in _GETATTR_NAMES:
        raise GraphFormatError(f"{where}: getattr is allowed only for {', '.join(sorted(_GETATTR_NAMES))}, "
                               f"not {args[1:]!r:.80}")


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    """Describe ``gm`` as a JSON-able document (see the module docstring)."""
    modules: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    nodes = []
    for node in gm.graph.nodes:
        where = f"cannot serialize {_node_where(node)}"
        target: Any = node.target
        if node.op in ("call_module", "get_attr"):
            problem = qualname_problem(target)
            if problem:
                raise GraphFormatError(f"{where}: bad name {target!r:.80}: {problem}")
        if node.op == "call_module":
            module = gm.get_submodule(target)
            if MODULE_TYPES.get(type(module).__name__) is not type(module):  # exact type: subclasses may differ
                raise GraphFormatError(f"{where}: module type {type(module).__module__}."
                                       f"{type(module).__qualname__} is not in the allowlist "
                                       f"({', '.join(sorted(MODULE_TYPES))})")
            config = module_config(module, where)
            rebuilt = _build_module(type(module).__name__, config, where)
            if _public_state(rebuilt) != _public_state(module):
                raise GraphFormatError(f"{where}: its constructor config does not reproduce the module "
                                       f"({rebuilt} vs {module})")
            modules[target] = {"type": type(module).__name__, "config": config}
        elif node.op == "get_attr":
            value = _get_attr_path(gm, target)
            if not isinstance(value, torch.Tensor):
                raise GraphFormatError(f"{where}: get_attr must name a tensor, not a {type(value).__name__}")
            attrs[target] = "parameter" if isinstance(value, nn.Parameter) else "buffer"
        elif node.op == "call_function":
            target = _FUNCTION_NAMES.get(target) if callable(target) else None
            if target is None:
                raise GraphFormatError(f"{where}: not in the allowlist of functions "
                                       f"(see pyprune.encode.FUNCTIONS)")
            if target == "builtins.getattr":
                _check_getattr(node.args, where)
        elif node.op == "call_method" and target not in METHODS:
            raise GraphFormatError(f"{where}: not in the allowlist of tensor methods "
                                   f"(see pyprune.encode.METHODS)")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": [_encode(a, where) for a in node.args],
                      "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()}})
    return {"format": FORMAT, "version": VERSION, "class_name": type(gm).__name__,
            "modules": modules, "attrs": attrs, "nodes": nodes}


def graph_state_dict(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors a document needs: the used leaf modules' state and the get_attr tensors."""
    state: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            state.update(gm.get_submodule(node.target).state_dict(prefix=node.target + "."))
        elif node.op == "get_attr":
            state[node.target] = _get_attr_path(gm, node.target).detach()
    return state


def _check_document(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise GraphFormatError(f"not a {FORMAT} document (format field: "
                               f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    _check_version(doc.get("version"), "document")
    for key, kind in (("modules", dict), ("attrs", dict), ("nodes", list)):
        if not isinstance(doc.get(key), kind):
            raise GraphFormatError(f"document field {key!r} must be a JSON {'object' if kind is dict else 'array'}")


def _check_version(version: Any, what: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise GraphFormatError(f"{what} has no integer version (got {version!r})")
    if version > VERSION:
        raise GraphFormatError(f"{what} is version {version}, written by a newer pyprune; this one reads "
                               f"version {VERSION}")
    if version < 1:
        raise GraphFormatError(f"{what} has invalid version {version}")


def _check_device_arg(value: Any, where: str) -> None:
    """A device a document names must be one this machine has: the CPU, or a CUDA
    device that exists (``meta`` would leave every later tensor without values)."""
    if isinstance(value, str):
        try:
            value = torch.device(value)
        except RuntimeError:
            return  # not a device name (a dtype given by name, say)
    if not isinstance(value, torch.device):
        return
    if value.type == "cpu" or value.type == "cuda" and (value.index or 0) < torch.cuda.device_count():
        return
    raise GraphFormatError(f"{where}: device {str(value)!r} is not one this machine has (cpu"
                           f"{', cuda:0..' + str(torch.cuda.device_count() - 1) if torch.cuda.device_count() else ''})")


def _decode_node(graph: fx.Graph, spec: Any, nodes: dict[str, fx.Node], doc: dict) -> fx.Node:
    if not isinstance(spec, dict) or set(spec) != {"name", "op", "target", "args", "kwargs"}:
        raise GraphFormatError(f"malformed node entry {spec!r:.120}")
    name, op, target = spec["name"], spec["op"], spec["target"]
    where = f"node {name!r} ({op} {target})"
    if not _identifier(name) or name in nodes:
        raise GraphFormatError(f"{where}: node name must be a new Python identifier")
    # fx writes node names as local variables of forward(self, ...): "self" would hide the
    # module, and a dunder name is Python's
    if name == "self" or len(name) > 4 and name.startswith("__") and name.endswith("__"):
        raise GraphFormatError(f"{where}: node name {name!r} is reserved in the generated code")
    if not isinstance(op, str) or op not in _OPS or not isinstance(target, str):
        raise GraphFormatError(f"{where}: unknown op {op!r} or a target that is not a string")
    if not isinstance(spec["args"], list) or not isinstance(spec["kwargs"], dict) \
            or not all(_identifier(k) for k in spec["kwargs"]):
        raise GraphFormatError(f"{where}: args must be an array and kwargs an object keyed by identifiers")
    args = tuple(_decode(a, where, nodes) for a in spec["args"])
    kwargs = {k: _decode(v, where, nodes) for k, v in spec["kwargs"].items()}
    if op == "call_function":
        if target not in FUNCTIONS:
            raise GraphFormatError(f"{where}: function {target!r} is not in the allowlist")
        if target == "builtins.getattr":
            _check_getattr(args, where)
        target = FUNCTIONS[target]
    elif op == "call_method" and target not in METHODS:
        raise GraphFormatError(f"{where}: method {target!r} is not in the allowlist")
    elif op == "call_method" and target == "to":
        for value in (*args[1:], *kwargs.values()):
            _check_device_arg(value, where)
    elif op == "call_module" and target not in doc["modules"]:
        raise GraphFormatError(f"{where}: module {target!r} is not declared in 'modules'")
    elif op == "get_attr" and target not in doc["attrs"]:
        raise GraphFormatError(f"{where}: tensor {target!r} is not declared in 'attrs'")
    elif op == "placeholder" and not (isinstance(target, str) and _PLACEHOLDER.match(target)):
        raise GraphFormatError(f"{where}: placeholder target must be an identifier")
    elif op == "output" and target != "output":
        raise GraphFormatError(f"{where}: output target must be 'output'")
    return graph.create_node(op, target, args, kwargs, name=name)


# What a stored tensor may be where the graph holds a float32 parameter or buffer:
# float16 is how folded BatchNorm vectors are kept (ChannelAffine), bfloat16 the same idea.
_FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    return stored in _FLOAT_STORAGE if expected == torch.float32 else stored == expected


def _mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k}: file {tuple(state[k].shape)} vs graph {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    mistyped = [f"{k}: file {str(state[k].dtype).removeprefix('torch.')} vs graph "
                f"{str(v.dtype).removeprefix('torch.')}"
                for k, v in expected.items() if k in state and not _dtype_fits(state[k].dtype, v.dtype)]
    parts = [f"{title} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
             for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                                 ("wrong dtype", mistyped))
             if keys]
    return "; ".join(parts)


def graph_from_json(doc: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule a document describes and load ``state_dict`` into it, strictly."""
    return load_into(_skeleton(doc, state_dict), state_dict)


def load_into(skeleton: fx.GraphModule, state_dict: Mapping[str, torch.Tensor],
              input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """The graph of :func:`check_declared_state` with ``state_dict`` (the tensors it was
    checked against, now decoded) in place of its meta tensors. With ``input_shape``,
    one image of zeros is run through it, and a graph that fails on it is refused
    naming the node: a model that loads must run (the dtypes, shapes and arguments a
    file gives its layers are only proven by running them)."""
    gm = skeleton
    gm.load_state_dict(state_dict, strict=True, assign=True)  # replaces the meta tensors
    left = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer would stay without values
        raise GraphFormatError(f"tensors with no value in the state dict: {', '.join(left)}")
    gm.eval()
    if input_shape is not None:
        check_runs(gm, tuple(input_shape))
    return gm


def check_runs(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Run one image of zeros through ``gm``: :class:`GraphFormatError` names the node
    that fails, or says what the output is when it is not one row of scores."""
    with torch.no_grad():
        out = _OneImage(gm, input_shape).run(torch.zeros((1, *input_shape)))
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1 and out.shape[0] == 1):
        got = f"a {str(out.dtype).removeprefix('torch.')} tensor of shape {tuple(out.shape)}" \
            if isinstance(out, torch.Tensor) else f"{type(out).__name__} {out!r:.40}"
        raise GraphFormatError(f"the graph's output for one image is {got}, not a batch of one row of scores")


def check_declared_state(doc: dict[str, Any], declared: Mapping[str, torch.Tensor],
                         input_shape: Sequence[int] | None = None) -> fx.GraphModule:
    """Raise :class:`GraphFormatError` unless tensors of the names and shapes of
    ``declared`` (meta tensors will do) are what the document's graph holds: a loader
    checks a file's table this way before it decodes anything. With ``input_shape``,
    one image is also run through the graph on the meta device, and an activation of
    more than :func:`activation_bound` bytes is refused (a graph that expands a tensor a
    hundred thousand times would otherwise ask for gigabytes when it runs). Returns the
    graph on the meta device, for :func:`load_into`."""
    gm = _skeleton(doc, {k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta")
                         for k, v in declared.items()})
    if input_shape is not None:
        _check_activations(gm, tuple(input_shape))
    return gm


# One image's activation may be this many times the image, and at least MIN_ACTIVATION_BYTES:
# a 224x224 ResNet-50's largest is 5x its input, a VGG's 21x.
ACTIVATION_PER_INPUT = 64
MIN_ACTIVATION_BYTES = 64 << 20


def activation_bound(input_shape: Sequence[int]) -> int:
    """The most bytes one activation of one image may take in a model of ``input_shape``."""
    return max(MIN_ACTIVATION_BYTES, ACTIVATION_PER_INPUT * 4 * math.prod(input_shape))


class _OneImage(fx.Interpreter):
    """Runs one image through a graph: an activation over :func:`activation_bound`
    bytes is refused, and so is a node that fails, by name."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our message names the node; fx would append the graph
        self.input_shape = input_shape
        self.bound = activation_bound(input_shape)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - whatever the layer raises, the file is at fault
            raise _NodeFailed(f"node {n.name!r} ({n.op} {_target_name(n)}) fails on one "
                              f"{(1, *self.input_shape)} input: {type(exc).__name__}: {first_line(exc):.300}") from None
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.bound:
                raise GraphFormatError(f"node {n.name!r} makes a {tuple(t.shape)} activation for one image, "
                                       f"{t.numel() * t.element_size():,} bytes, more than the {self.bound:,} "
                                       "a model of its input size may")
        return out


class _NodeFailed(GraphFormatError):
    """A node of a loaded graph raised on a valid input."""


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))


class _MetaImage(_OneImage):
    """:class:`_OneImage` on the meta device. A function or method whose meta kernel
    fails (missing, or stricter than the CPU's) runs on real zeros of its inputs, which
    the bound has already held to a few activations' size, and its result goes back to
    the meta device: the check goes on past that node, so failing one node on purpose
    does not let the nodes after it allocate what they like in the real run."""

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._on_zeros_if_meta_fails(super().call_function, target, args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._on_zeros_if_meta_fails(super().call_method, target, args, kwargs)

    @staticmethod
    def _on_zeros_if_meta_fails(call: Callable[..., Any], target: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return call(target, args, kwargs)
        except Exception:  # noqa: BLE001 - retried on zeros; a real failure raises there
            zeros_args, zeros_kwargs = tree_map(_zeros_for_meta, (args, kwargs))
            with torch.no_grad():
                out = call(target, zeros_args, zeros_kwargs)
            return tree_map(_meta_for, out)


def _zeros_for_meta(v: Any) -> Any:
    return torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) and v.is_meta else v


def _meta_for(v: Any) -> Any:
    return torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v


def _check_activations(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    try:
        _MetaImage(gm, input_shape).run(torch.empty((1, *input_shape), device="meta"))
    except _NodeFailed:
        # A node that fails on zeros too, or a layer (module) whose meta kernel fails: the
        # run on real zeros after loading decides (load_into) and names it. The bound
        # holds up to that node.
        pass


def _skeleton(doc: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """The document's GraphModule on the meta device, its get_attr tensors taken from
    ``state_dict``, checked to hold exactly the names, shapes and dtypes of ``state_dict``."""
    try:
        return _build_skeleton(doc, state_dict)
    except RecursionError:  # arguments nested hundreds deep
        raise GraphFormatError("the document nests its values deeper than Python can read") from None


def _build_skeleton(doc: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    _check_document(doc)
    unknown = {spec.get("target") for spec in doc["nodes"]
               if isinstance(spec, dict) and spec.get("op") == "call_function" and isinstance(spec.get("target"), str)
               and spec["target"] not in FUNCTIONS}
    for hook in BEFORE_DECODE:
        hook(sorted(n for n in unknown if isinstance(n, str)))
    root: dict[str, Any] = {}
    for qualname, spec in doc["modules"].items():
        _check_qualname(qualname, "module")
        if not isinstance(spec, dict) or set(spec) != {"type", "config"}:
            raise GraphFormatError(f"module {qualname!r}: entry must be {{'type', 'config'}}")
        root[qualname] = _build_module(spec["type"], spec["config"], f"module {qualname!r}")
    for target, kind in doc["attrs"].items():
        _check_qualname(target, "tensor")
        if kind not in ("parameter", "buffer"):
            raise GraphFormatError(f"bad attrs entry {target!r}: {kind!r}")
        if not isinstance(state_dict.get(target), torch.Tensor):
            raise GraphFormatError(f"tensor {target!r} (get_attr) is missing from the state dict")
        tensor = state_dict[target]
        root[target] = nn.Parameter(tensor) if kind == "parameter" else tensor

    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in doc["nodes"]:
        node = _decode_node(graph, spec, nodes, doc)
        nodes[spec["name"]] = node
    class_name = doc.get("class_name", "GraphModule")
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph, class_name if _identifier(class_name) else "GraphModule")
    except Exception as exc:
        raise GraphFormatError(f"the document does not form a valid graph: {exc}") from exc

    expected = gm.state_dict()
    problem = _mismatch(state_dict, expected)
    if problem:
        raise GraphFormatError(f"the state dict does not fit the graph: {problem}")
    return gm


# ---------------------------------------------------------------------------
# Files.

def save_graph_module(gm: fx.GraphModule, path: PathLike, meta: dict[str, Any] | None = None,
                      force: bool = False) -> Path:
    """Write ``gm`` and ``meta`` (JSON-able) to ``path``; see the module docstring."""
    if Path(path).exists() and not force:
        raise FileExistsError(f"{path} exists; pass --force (force=True) to overwrite it")
    graph_text = json.dumps(graph_to_json(gm), allow_nan=False, separators=(",", ":"))
    if meta is not None and not isinstance(meta, dict):
        raise GraphFormatError(f"meta must be a dict, not a {type(meta).__name__}")
    try:
        meta_text = json.dumps(meta or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GraphFormatError(f"meta must be plain JSON (no NaN): {exc}") from exc
    payload = {"format": FORMAT, "version": VERSION, "graph": graph_text, "meta": meta_text,
               "state_dict": {k: v.detach().cpu() for k, v in graph_state_dict(gm).items()}}
    return atomic_write(path, lambda f: torch.save(payload, f), force=force)


def _read(path: Path, mmap: bool = False) -> Any:
    bomb = zip_bomb_problem(path)
    if bomb:
        raise GraphFormatError(f"{path}: {bomb}")
    return load_weights_only(path, mmap=mmap)


def _is_torch_save_archive(path: Path) -> bool:
    # What torch.save writes holds <name>/data.pkl; TorchScript and torch.export
    # archives are zips too, and torch.load would warn about or misread them.
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1]
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/data.pkl") for n in names) and not any(n.endswith("/constants.pkl") for n in names)


def _has_compressed_entries(path: Path) -> bool:
    # torch.save stores entries; one re-zipped with compression cannot be memory-mapped
    with zipfile.ZipFile(path) as zf:
        return any(i.compress_type != zipfile.ZIP_STORED for i in zf.infolist())


def is_graph_file(path: PathLike) -> bool:
    """True if ``path`` is a file written by :func:`save_graph_module` (any version)."""
    p = Path(path)
    if not p.is_file() or not _is_torch_save_archive(p):
        return False
    try:
        # tensors stay on disk where they can (stored entries); weights-only runs no code
        obj = _read(p, mmap=not _has_compressed_entries(p))
    except Exception:  # not a zip checkpoint, pickled objects, junk: not ours
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def input_shape_to_run(meta: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The input shape of a saved model's meta, to run one image of before it loads:
    (C, H, W) of positive ints within the size a model input may have; None for any
    other (the model's loader checks the meta itself, and refuses those)."""
    shape = meta.get("input_shape")
    ok = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    return tuple(shape) if ok and math.prod(shape) <= MAX_INPUT_ELEMENTS else None


def load_graph_module(path: PathLike) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Read a file written by :func:`save_graph_module`; returns ``(graph_module, meta)``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"graph file not found: {p}")
    try:
        obj = _read(p)
    except GraphFormatError:
        raise
    except pickle.UnpicklingError as exc:
        raise GraphFormatError(
            f"{p} was refused: it holds pickled Python objects, which a pyprune graph file never does "
            f"(read with torch.load(weights_only=True), nothing in it was run): {weights_only_detail(exc)}") from exc
    except Exception as exc:
        raise GraphFormatError(f"{p} is not a readable PyTorch file: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise GraphFormatError(f"{p} is not a {FORMAT} file (a plain checkpoint? name its --arch)")
    _check_version(obj.get("version"), str(p))
    state = obj.get("state_dict")
    if not isinstance(obj.get("graph"), str) or not isinstance(obj.get("meta"), str) or not (
            isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise GraphFormatError(f"{p}: fields 'graph' and 'meta' must be JSON text and 'state_dict' tensors")
    not_dense = [f"{k} ({str(v.layout).removeprefix('torch.')})" for k, v in state.items() if v.layout != torch.strided]
    if not_dense:
        raise GraphFormatError(f"{p}: state_dict tensors must be dense; these are not: {', '.join(not_dense[:5])}")
    try:
        doc, meta = json.loads(obj["graph"]), json.loads(obj["meta"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise GraphFormatError(f"{p}: invalid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise GraphFormatError(f"{p}: meta must be a JSON object")
    try:
        shape = input_shape_to_run(meta)
        return load_into(check_declared_state(doc, state, shape), state, shape), meta
    except GraphFormatError as exc:
        raise GraphFormatError(f"{p}: {exc}") from exc
