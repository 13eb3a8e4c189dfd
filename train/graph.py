"""A user's own classifier as data: trace it once, store it as JSON, rebuild it without their code.

Plug-in mode attaches DAFAR to a classifier the user already trained (``dafar attach --victim
package.module:callable --weights W.safetensors --feedback-at LAYER``).  Their Python class is
needed once, to build the module; after that the run folder must load without importing or
executing anything of theirs (the rule for every model file here).  So the module is traced with
``torch.fx`` into a graph of standard ``torch.nn`` layers and whitelisted tensor functions, that
graph is written into the manifest as JSON (module types with their constructor arguments, and
the nodes), and the weights go into safetensors.  Loading rebuilds the same computation from the
JSON with nothing but ``torch.nn`` constructors: an unknown layer type or function is an error
naming it, never an import.

The feedback position names a layer (a ``call_module`` target such as ``layer2`` or
``features.6``, or any node's name): E is the graph up to and including it, F the rest, with E's
output as its input.  A connection that skips across the cut (a residual shortcut from before the
layer to after it) cannot be split there, and the error says which node crosses.

Why a whitelist rather than ``torch.export``'s serialised programs: the rebuilt graph must export
to ONNX and convert to TFLite builtins, be traceable by ART's attacks and fold into DAFAR's fused
graph, which plain ``nn`` layers do; and reading it can never run code.
"""
from __future__ import annotations

import importlib
import json
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import fx, nn

from dafar.errors import ConfigError, WeightsError

__all__ = ["VictimGraph", "trace_victim", "load_user_module", "GRAPH_FORMAT"]

GRAPH_FORMAT = 1

# torch.nn layers a graph may hold: constructor arguments read back from the instance.
_LAYERS = {
    "Conv2d": lambda m: dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                             stride=list(m.stride), padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                             dilation=list(m.dilation), groups=m.groups, bias=m.bias is not None,
                             padding_mode=m.padding_mode),
    "BatchNorm2d": lambda m: dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                                  track_running_stats=m.track_running_stats),
    "Linear": lambda m: dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None),
    "ReLU": lambda m: {},
    "ReLU6": lambda m: {},
    "LeakyReLU": lambda m: dict(negative_slope=m.negative_slope),
    "Hardswish": lambda m: {},
    "Hardsigmoid": lambda m: {},
    "SiLU": lambda m: {},
    "Sigmoid": lambda m: {},
    "Tanh": lambda m: {},
    "GELU": lambda m: dict(approximate=m.approximate),
    "Identity": lambda m: {},
    "Dropout": lambda m: dict(p=m.p),
    "Flatten": lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim),
    "MaxPool2d": lambda m: dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                ceil_mode=m.ceil_mode),
    "AvgPool2d": lambda m: dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                                count_include_pad=m.count_include_pad),
    "AdaptiveAvgPool2d": lambda m: dict(output_size=m.output_size),
}

# functions a graph may call (by a stable name); nothing else is ever looked up
_FUNCTIONS = {
    "operator.add": operator.add, "operator.mul": operator.mul, "operator.getitem": operator.getitem,
    "torch.flatten": torch.flatten, "torch.relu": torch.relu, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "torch.cat": torch.cat, "torch.add": torch.add, "torch.mul": torch.mul, "torch.mean": torch.mean,
    "F.relu": Fn.relu, "F.relu6": Fn.relu6, "F.hardswish": Fn.hardswish, "F.silu": Fn.silu, "F.gelu": Fn.gelu,
    "F.adaptive_avg_pool2d": Fn.adaptive_avg_pool2d, "F.max_pool2d": Fn.max_pool2d, "F.avg_pool2d": Fn.avg_pool2d,
    "F.dropout": Fn.dropout,
}
_FUNCTION_NAMES = {id(f): name for name, f in _FUNCTIONS.items()}
_METHODS = {"flatten", "view", "reshape", "mean", "size", "relu", "add", "mul", "contiguous", "sigmoid", "sum"}


def load_user_module(ref: str, weights: str | None = None) -> nn.Module:
    """``package.module:callable`` -> the module it returns (or the class it names, built with no
    arguments), with ``weights`` (safetensors) loaded strictly.  This imports the user's code:
    it is the one place that does, at attach time, on the user's explicit request."""
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--victim {ref!r}: a module of your own is given as package.module:callable")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--victim {ref}: cannot import {mod_name} ({exc}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--victim {ref}: {mod_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--victim {ref}: {attr} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--victim {ref}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        from .weights import load_into

        load_into(model, weights)
    return model.eval()


def _encode(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"tuple" if isinstance(a, tuple) else "list": [_encode(v) for v in a]}
    if isinstance(a, slice):
        return {"slice": [_encode(a.start), _encode(a.stop), _encode(a.step)]}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        if not math.isfinite(a):
            raise ConfigError(f"cannot store the non-finite constant {a} of the graph")
        return {"float": a}
    if a is Ellipsis:
        return {"ellipsis": True}
    raise ConfigError(f"the classifier's graph holds a constant of type {type(a).__name__} ({a!r}) that dafar "
                      "cannot store; use standard torch.nn layers")


def _decode(a, env: dict):
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "tuple" in a:
            return tuple(_decode(v, env) for v in a["tuple"])
        if "list" in a:
            return [_decode(v, env) for v in a["list"]]
        if "slice" in a:
            return slice(*(_decode(v, env) for v in a["slice"]))
        if "float" in a:
            return float(a["float"])
        if "ellipsis" in a:
            return Ellipsis
        raise WeightsError(f"the stored graph holds an unknown argument {a}")
    if a is None or isinstance(a, (bool, int, str)):
        return a
    raise WeightsError(f"the stored graph holds an argument of type {type(a).__name__}")


@dataclass(frozen=True)
class VictimGraph:
    """A traced classifier: ``layers`` (path -> {type, args}) and ``nodes`` (in order), as JSON.

    Immutable and comparable (the JSON text is the identity); :meth:`build` makes the module,
    :meth:`split` the E and F halves at a feedback position."""

    text: str  # canonical JSON: {"format", "layers", "nodes"}

    @property
    def data(self) -> dict:
        return json.loads(self.text)

    @classmethod
    def from_data(cls, data: dict) -> "VictimGraph":
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
            raise WeightsError(f"not a dafar victim graph (format {GRAPH_FORMAT})")
        for path, layer in data.get("layers", {}).items():
            if not isinstance(layer, dict) or layer.get("type") not in _LAYERS:
                raise WeightsError(f"the stored graph's layer {path} has an unsupported type "
                                   f"{layer.get('type') if isinstance(layer, dict) else layer!r}")
        for n in data.get("nodes", []):
            if n.get("op") == "call_function" and n.get("target") not in _FUNCTIONS:
                raise WeightsError(f"the stored graph calls an unsupported function {n.get('target')!r}")
            if n.get("op") == "call_method" and n.get("target") not in _METHODS:
                raise WeightsError(f"the stored graph calls an unsupported method {n.get('target')!r}")
            if n.get("op") not in ("placeholder", "call_module", "call_function", "call_method", "output"):
                raise WeightsError(f"the stored graph has an unsupported node kind {n.get('op')!r}")
        return cls(json.dumps(data, sort_keys=True, separators=(",", ":")))

    def build(self) -> fx.GraphModule:
        """The module, from ``torch.nn`` constructors only; weights are loaded separately."""
        data = self.data
        root = nn.Module()
        for path, layer in data["layers"].items():
            parent = root
            *parents, leaf = path.split(".")
            for p in parents:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            parent.add_module(leaf, getattr(nn, layer["type"])(**layer["args"]))
        g = fx.Graph()
        env: dict = {}
        for n in data["nodes"]:
            op, target = n["op"], n["target"]
            args = _decode(n.get("args", {"tuple": []}), env)
            kwargs = {k: _decode(v, env) for k, v in n.get("kwargs", {}).items()}
            if op == "placeholder":
                env[n["name"]] = g.placeholder(target)
            elif op == "call_module":
                if target not in data["layers"]:
                    raise WeightsError(f"the stored graph calls layer {target!r}, which it does not define")
                env[n["name"]] = g.call_module(target, args, kwargs)
            elif op == "call_function":
                env[n["name"]] = g.call_function(_FUNCTIONS[target], args, kwargs)
            elif op == "call_method":
                env[n["name"]] = g.call_method(target, args, kwargs)
            elif op == "output":
                g.output(args[0] if isinstance(args, tuple) and len(args) == 1 else args)
        g.lint()
        return fx.GraphModule(root, g)

    def layer_names(self) -> list[str]:
        """Every name --feedback-at accepts, in order: layers and the containers around them."""
        out: list[str] = []
        for n in self.data["nodes"]:
            names = [n["target"]] if n["op"] == "call_module" else []
            scope = n.get("scope") or ""
            parts = scope.split(".") if scope else []
            names = [".".join(parts[: i + 1]) for i in range(len(parts))] + names
            for x in names:
                if x not in out:
                    out.append(x)
        return out

    def split(self, at: str) -> tuple["VictimGraph", "VictimGraph"]:
        """(E, F): E is every node up to and including ``at`` (a layer path or a node name), F the
        rest with E's output as its single input."""
        data = self.data
        nodes = data["nodes"]
        idx = next((i for i, n in enumerate(nodes) if n["op"] == "call_module" and n["target"] == at), None)
        if idx is None:  # a container (layer2, features): its last node is its output
            inside = [i for i, n in enumerate(nodes)
                      if n.get("scope") and (n["scope"] == at or n["scope"].startswith(at + "."))]
            idx = inside[-1] if inside else None
        if idx is None:
            idx = next((i for i, n in enumerate(nodes) if n["name"] == at and n["op"] not in ("placeholder", "output")),
                       None)
        if idx is None:
            names = self.layer_names()
            raise ConfigError(f"--feedback-at {at!r}: the classifier has no such layer; its layers, in order: "
                              f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''}")
        cut = nodes[idx]["name"]
        before = {n["name"] for n in nodes[: idx + 1]}
        after = nodes[idx + 1:]
        if not after or after[0]["op"] == "output":
            raise ConfigError(f"--feedback-at {at}: that is the classifier's last layer; F would be empty")

        def refs(a) -> set:
            if isinstance(a, dict):
                if "node" in a:
                    return {a["node"]}
                return set().union(*(refs(v) for v in a.values())) if a else set()
            if isinstance(a, list):
                return set().union(*(refs(v) for v in a)) if a else set()
            return set()

        for n in after:
            crossing = (refs(n.get("args")) | refs(n.get("kwargs"))) & (before - {cut})
            if crossing:
                raise ConfigError(f"--feedback-at {at}: node {n['name']} ({n['target']}) also reads "
                                  f"{sorted(crossing)[0]} from before the cut (a skip connection across it); pick a "
                                  "layer where the network has a single path, such as the end of a residual stage")
        e_nodes = nodes[: idx + 1] + [{"name": "output", "op": "output", "target": "output",
                                       "args": {"tuple": [{"node": cut}]}, "kwargs": {}}]
        f_nodes = [{"name": cut, "op": "placeholder", "target": "z", "args": {"tuple": []}, "kwargs": {}}] + after

        def part(ns):
            used = {n["target"] for n in ns if n["op"] == "call_module"}
            return VictimGraph.from_data({"format": GRAPH_FORMAT, "nodes": ns,
                                          "layers": {k: v for k, v in data["layers"].items() if k in used}})

        e, f = part(e_nodes), part(f_nodes)
        shared = set(e.data["layers"]) & set(f.data["layers"])
        if shared:
            raise ConfigError(f"--feedback-at {at}: layer {sorted(shared)[0]} is used on both sides of the cut")
        return e, f


def trace_victim(model: nn.Module) -> VictimGraph:
    """Trace ``model`` (a torch.nn.Module taking one NCHW image batch) into a :class:`VictimGraph`;
    an unsupported layer or function is a ConfigError naming it."""
    try:
        gm = fx.symbolic_trace(model.eval())
    except Exception as exc:  # torch.fx raises many kinds (TraceError, TypeError, ...) on dynamic code
        raise ConfigError(f"cannot trace the classifier with torch.fx ({type(exc).__name__}: {exc}); dafar needs a "
                          "forward pass without data-dependent Python control flow") from None
    layers, nodes = {}, []
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"the classifier's forward takes {len(placeholders)} inputs; dafar needs one image batch")
    for n in gm.graph.nodes:
        rec = {"name": n.name, "op": n.op, "args": _encode(tuple(n.args)),
               "kwargs": {k: _encode(v) for k, v in n.kwargs.items()}}
        stack = n.meta.get("nn_module_stack") or {}
        if stack:  # the innermost module the node ran in: lets --feedback-at name a container (layer2)
            scope = list(stack.values())[-1]
            rec["scope"] = scope[0] if isinstance(scope, tuple) else str(scope)
        if n.op == "call_module":
            m = modules[n.target]
            kind = type(m).__name__
            if type(m) is not getattr(nn, kind, None) or kind not in _LAYERS:
                raise ConfigError(f"layer {n.target} is a {type(m).__module__}.{type(m).__qualname__}, which dafar "
                                  f"cannot store; supported: {', '.join(sorted(_LAYERS))}")
            layers[n.target] = {"type": kind, "args": _LAYERS[kind](m)}
            rec["target"] = n.target
        elif n.op == "call_function":
            name = _FUNCTION_NAMES.get(id(n.target))
            if name is None:
                raise ConfigError(f"node {n.name} calls {getattr(n.target, '__module__', '?')}."
                                  f"{getattr(n.target, '__name__', n.target)}, which dafar cannot store; supported: "
                                  f"{', '.join(sorted(_FUNCTIONS))}")
            rec["target"] = name
        elif n.op == "call_method":
            if n.target not in _METHODS:
                raise ConfigError(f"node {n.name} calls the tensor method .{n.target}(), which dafar cannot store; "
                                  f"supported: {', '.join(sorted(_METHODS))}")
            rec["target"] = n.target
        elif n.op == "get_attr":
            raise ConfigError(f"node {n.name} reads the tensor attribute {n.target} directly; dafar stores layers "
                              "only (wrap it in an nn layer)")
        else:
            rec["target"] = str(n.target)
        nodes.append(rec)
    return VictimGraph.from_data({"format": GRAPH_FORMAT, "layers": layers, "nodes": nodes})
