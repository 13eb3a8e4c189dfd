"""The shared vocabulary of every stage: what a graph takes, what it returns, which detector and
format it uses, and the typed view of one exported model in the manifest.

Standard library and numpy only: the on-device runtime reads it, and so does every stage, so
the strings "float-nchw", "uint8-nhwc", "l2", "autoencoder" and the output names are written
once, here.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, TypeVar

import numpy as np

from dafar.errors import ConfigError, ManifestError

__all__ = [
    "InputContract",
    "Detector",
    "Format",
    "Precision",
    "Graph",
    "Mode",
    "Unpool",
    "OUTPUT_NAMES",
    "DETECT_OUTPUT_NAMES",
    "VICTIM_OUTPUT_NAMES",
    "output_names",
    "input_spec",
    "output_specs",
    "parse_enum",
    "parse_enums",
    "ExportEntry",
]

E = TypeVar("E", bound=Enum)


class InputContract(str, Enum):
    """What the exported graph's input ``x`` holds."""

    FLOAT_NCHW = "float-nchw"  # float32, N x C x H x W, values in [0, 1]
    UINT8_NHWC = "uint8-nhwc"  # uint8, N x H x W x C, raw camera pixels 0..255

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self is InputContract.UINT8_NHWC else np.float32)

    @property
    def layout(self) -> str:
        return "NHWC" if self is InputContract.UINT8_NHWC else "NCHW"

    def shape(self, chw, batch) -> list:
        """The input shape for images of ``chw`` = (C, H, W) at ``batch`` (an int or a name like "N")."""
        c, h, w = (int(v) for v in chw)
        return [batch, h, w, c] if self is InputContract.UINT8_NHWC else [batch, c, h, w]

    def chw(self, shape) -> tuple[int, int, int]:
        """(C, H, W) from an input shape of this contract (the inverse of :meth:`shape`)."""
        if not isinstance(shape, (list, tuple)) or len(shape) != 4:
            raise ManifestError(f"a {self.value} input shape has 4 dimensions, got {shape!r}")
        _, a, b, c = shape
        # image dimensions are positive integers (a manifest is input: "x", 28.5 or True is refused)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (a, b, c)):
            raise ManifestError(f"a {self.value} input shape needs positive integer image dimensions, got {list(shape)}")
        if self is InputContract.UINT8_NHWC:
            return c, a, b
        return a, b, c

    def from_pixels(self, u8_nchw: np.ndarray) -> np.ndarray:
        """uint8 NCHW pixels (as the data loaders return them) -> this contract's input array."""
        if self is InputContract.UINT8_NHWC:
            return np.ascontiguousarray(u8_nchw.transpose(0, 2, 3, 1))
        return u8_nchw.astype(np.float32) / np.float32(255.0)

    def from_unit(self, x01_nchw: np.ndarray) -> np.ndarray:
        """float NCHW in [0, 1] (adversarial images) -> this contract's input array; a uint8 input
        gets the nearest pixel level (lossless for x = u8 / 255)."""
        if self is InputContract.UINT8_NHWC:
            return np.ascontiguousarray(np.rint(x01_nchw * 255.0).astype(np.uint8).transpose(0, 2, 3, 1))
        return np.ascontiguousarray(x01_nchw, dtype=np.float32)


class Detector(str, Enum):
    """Which score the defence thresholds."""

    L2 = "l2"  # ||x - D(E(x))||_2
    AUTOENCODER = "autoencoder"  # ||d - C(d)||_2, d = x - D(E(x))

    @property
    def score_key(self) -> str:
        """The short key of this score in score arrays (``scores.npz``: ``val_l2``, ``val_ae``)."""
        return "ae" if self is Detector.AUTOENCODER else "l2"

    @classmethod
    def from_score_key(cls, key: str) -> "Detector":
        return cls.AUTOENCODER if key == "ae" else cls(key)


class Format(str, Enum):
    ONNX = "onnx"
    TFLITE = "tflite"

    @property
    def suffix(self) -> str:
        return "." + self.value

    @classmethod
    def of(cls, path) -> "Format":
        suffix = str(path).rsplit(".", 1)[-1].lower()
        try:
            return cls(suffix)
        except ValueError:
            raise ConfigError(f"{path}: not an .onnx or .tflite model file") from None


class Precision(str, Enum):
    FLOAT32 = "float32"
    INT8 = "int8"


class Graph(str, Enum):
    """What an exported file computes."""

    DAFAR = "dafar"  # the whole defence: label, score, rejected, logits, purified_logits
    VICTIM = "victim"  # the undefended classifier F(E(x)): label, logits


class Mode(str, Enum):
    """Where a defence graph's label comes from (recorded per export as ``mode``).

    ``hybrid`` (the paper's, the default): the label is the argmax of the purified logits
    F(E(D(E(x)))), so the graph runs E and F twice.  ``detect``: the label is the victim's own
    F(E(x)); D runs only for the score and there is no second E/F pass, so the graph costs
    E + F + D (about 2x the victim on the paper networks instead of 3x).  A detect graph has no
    ``purified_logits`` output; every other output keeps its name and meaning."""

    HYBRID = "hybrid"
    DETECT = "detect"


class Unpool(str, Enum):
    """Which unpooling operator the decoder uses (recorded as ``architecture.unpool``)."""

    MASK = "mask"  # index-free, builtin ops only (default; exportable to TFLite)
    MAXUNPOOL = "maxunpool"  # the paper's MaxUnpool with pooling indices (torch / ONNX Runtime only)
    # plain nearest-neighbour x2 upsampling, no guidance from E's pools (no mask): a cheaper graph
    # (no RESIZE/EQUAL/CAST of E's activations) that must be trained in; issue 21's cost knob
    UPSAMPLE = "upsample"


OUTPUT_NAMES = ("label", "score", "rejected", "logits", "purified_logits")
DETECT_OUTPUT_NAMES = ("label", "score", "rejected", "logits")  # --mode detect: no purified_logits
VICTIM_OUTPUT_NAMES = ("label", "logits")

_OUTPUT_TYPES = {"label": "int64", "score": "float32", "rejected": "bool", "logits": "float32",
                 "purified_logits": "float32"}


def output_names(graph: Graph | str, mode: Mode | str = Mode.HYBRID) -> tuple[str, ...]:
    if Graph(graph) is not Graph.DAFAR:
        return VICTIM_OUTPUT_NAMES
    return DETECT_OUTPUT_NAMES if Mode(mode) is Mode.DETECT else OUTPUT_NAMES


def input_spec(contract: InputContract | str, chw, batch) -> dict:
    """The manifest's ``input`` record of an exported graph."""
    contract = InputContract(contract)
    rng = [0, 255] if contract is InputContract.UINT8_NHWC else [0.0, 1.0]
    return {"name": "x", "shape": contract.shape(chw, batch), "dtype": contract.dtype.name, "layout": contract.layout,
            "range": rng}


def output_specs(names: Iterable[str], batch, num_classes: int) -> list[dict]:
    """The manifest's ``outputs`` records of an exported graph."""
    out = []
    for n in names:
        shape = [batch, num_classes] if n in ("logits", "purified_logits") else [batch]
        out.append({"name": n, "shape": shape, "dtype": _OUTPUT_TYPES[n]})
    return out


def parse_enum(value: Any, enum: type[E], name: str) -> E:
    """``enum(value)`` with an error naming the option and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"unknown {name} {value!r}; choose from: {', '.join(e.value for e in enum)}") from None


def parse_enums(values: Iterable[Any], enum: type[E], name: str) -> tuple[E, ...]:
    """A non-empty tuple of distinct enum members, in the given order."""
    if isinstance(values, (str, Enum)):
        values = [values]
    out = [parse_enum(v, enum, name) for v in values]
    if not out:
        raise ConfigError(f"at least one {name} is needed")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class ExportEntry:
    """One exported model file as the manifest's ``exports`` table records it, typed.

    ``raw`` keeps the whole record (validation figures, ops, calibration) for reports."""

    rel: str
    graph: Graph
    format: Format
    precision: Precision
    contract: InputContract
    detector: Detector | None
    batch: int | None  # None: dynamic batch
    chw: tuple[int, int, int]
    num_classes: int
    alpha: float | None
    threshold_rule: str | None
    raw: dict
    mode: Mode | None = None  # defence graphs: where the label comes from; None for the victim

    @property
    def output_names(self) -> tuple[str, ...]:
        return output_names(self.graph, self.mode or Mode.HYBRID)

    @property
    def pair_key(self) -> tuple:
        """What a defence graph and its undefended victim share (compared side by side)."""
        return (self.format, self.precision, self.contract, self.batch)

    @classmethod
    def parse(cls, rel: str, e: Any, where: str = "the manifest") -> "ExportEntry":
        """Read and check one ``exports`` record; a malformed one raises :class:`ManifestError`."""
        if not isinstance(e, dict):
            raise ManifestError(f"{where}: export {rel} is not a JSON object")
        try:
            graph = Graph(e.get("graph", "dafar"))
            fmt = Format(e["format"])
            precision = Precision(e.get("precision", "float32"))
            contract = InputContract(e.get("contract", "float-nchw"))
            det = e.get("detector")
            detector = Detector(det) if det is not None else None
            # files exported before modes existed are hybrid graphs
            mode = Mode(e.get("mode") or Mode.HYBRID.value) if graph is Graph.DAFAR else None
        except (KeyError, ValueError) as exc:
            raise ManifestError(f"{where}: export {rel} has a missing or unknown field ({exc})") from None
        inp = e.get("input")
        if not isinstance(inp, dict) or not isinstance(inp.get("shape"), list) or "dtype" not in inp:
            raise ManifestError(f"{where}: export {rel} has no input spec")
        if graph is Graph.DAFAR and detector is None:
            raise ManifestError(f"{where}: defence graph {rel} names no detector")
        shape = inp["shape"]
        try:
            chw = contract.chw(shape)
        except ManifestError as exc:  # name the file and the entry, not only the shape
            raise ManifestError(f"{where}: export {rel}: {exc}") from None
        if any(v < 1 for v in chw):
            raise ManifestError(f"{where}: export {rel} has input shape {shape}")
        batch = shape[0] if isinstance(shape[0], int) and not isinstance(shape[0], bool) else None
        alpha = e.get("alpha")
        if graph is Graph.DAFAR and (not isinstance(alpha, (int, float)) or not np.isfinite(alpha)):
            raise ManifestError(f"{where}: defence graph {rel} has no finite alpha")
        return cls(rel, graph, fmt, precision, contract, detector, batch, chw, int(e.get("num_classes", 10)),
                   None if alpha is None else float(alpha), e.get("threshold_rule"), e, mode)
