"""Which ops of the fused graph run in int8 and which stay float: one rule for ONNX and TFLite.

Why not quantize everything: the detector's score is the L2 norm of a small residual (on MNIST
about 0.04 per pixel on the [-1, 1] scale, against pixel values near 1), so the int8 rounding of
an activation feeding the score is of the same order as the residual itself.  A naive full-int8
graph (the onnx2tf / TFLite default) quantizes the sum of squares and the comparison with alpha
too: the score is then off by 7-11% and, with the anomaly autoencoder, the reject decision is
almost random.  Worse, DAFAR detects *feature perturbations*: int8 noise in E's activations on
the input path is such a perturbation, which D faithfully turns into reconstruction error.

Layouts (op sets computed from the graph structure, not from names, so one rule serves both
formats):

* ``mixed``: int8 for the convolutional and linear work of E, F, D and C (in a detect-mode graph
  all of D, its unpooling slices included); float32 for the input preprocessing, the residual
  ``x - D(E(x))``, ``d - C(d)``, the sum of squares, the square root and the comparison with alpha
  (dequantized before them).  Smallest file and fastest; keeps the decisions on MNIST, not on
  CIFAR-10 (bench/results/pareto-mnist/README.md).
* ``precise``: keeps everything the score reads in float (E on the input, the decoder D and
  their unpooling masks, and the anomaly autoencoder C): the score then barely moves and, because
  no integer kernel computes it, is the same on every runtime (int8 kernels round differently:
  with C in int8, tflite-runtime 2.14's scores were up to 6.5e-3 away from LiteRT 2.3's, against
  the 1e-3 we hold runtimes to).  The price is float compute for E(x), D and C; their weights
  are still stored in int8.  The victim head F and E on the reconstruction (purification) are int8.
* ``naive``: quantize every op the quantizer can (what a default converter does); kept only to
  show, in the report, what it does to the detector.  ``dafar quantize`` never writes it.

The graph view is deliberately small: ops with a name, a type, input and output tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

__all__ = ["Layout", "Op", "float_ops", "COMPUTE_OPS", "ACTIVATIONS"]


class Layout(str, Enum):
    MIXED = "mixed"
    PRECISE = "precise"
    NAIVE = "naive"


# convolution / linear ops (ONNX and TFLite spellings): the "convolutional and linear work"
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul",
                         "CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D", "BATCH_MATMUL"})

ACTIVATIONS = frozenset({"Relu", "Tanh", "RELU", "TANH", "RELU6", "LOGISTIC", "Sigmoid"})


@dataclass(frozen=True)
class Op:
    name: str  # ONNX node name; TFLite: the name of the op's first output tensor
    type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _ancestors(ops: Sequence[Op], tensors: Iterable[str]) -> set[int]:
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs}
    seen: set[int] = set()
    stack = list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen:
            continue
        seen.add(i)
        stack.extend(ops[i].inputs)
    return seen


def float_ops(ops: Sequence[Op], outputs: dict[str, str], layout: Layout | str) -> list[int]:
    """Indices of the ops that must stay float32 under ``layout``.

    ``outputs`` maps the fused graph's output names (``label``, ``score``, ``rejected``,
    ``logits``, ``purified_logits``) to tensor names.  A graph without ``score`` (the victim
    alone) has nothing to protect: all of it may be int8, except the input preprocessing.
    """
    layout = Layout(layout)
    if layout is Layout.NAIVE:
        return []
    keep: set[int] = set()
    # input preprocessing (cast / transpose / scale / shift before the first conv): float, so that
    # the residual reads the exact x (no rounding of the input) and a NaN pixel reaches the score
    first = next((i for i, op in enumerate(ops) if op.type in COMPUTE_OPS), None)
    if first is not None:
        keep |= {i for i in _ancestors(ops, ops[first].inputs) if ops[i].type not in COMPUTE_OPS}
    if "score" not in outputs:
        return sorted(keep)
    detect = _ancestors(ops, [outputs[k] for k in ("score", "rejected") if k in outputs])
    if layout is Layout.PRECISE:  # everything the score reads stays float
        return sorted(keep | detect)
    classify = _ancestors(ops, [outputs[k] for k in ("label", "logits", "purified_logits") if k in outputs])
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs}

    def int8_work(i: int) -> bool:
        """A conv/linear op, or the activation right after one (fused into it by both runtimes)."""
        if ops[i].type in COMPUTE_OPS:
            return True
        if ops[i].type in ACTIVATIONS and ops[i].inputs:
            p = producer.get(ops[i].inputs[0])
            return p is not None and ops[p].type in COMPUTE_OPS
        return False

    # MIXED: what only the detector uses (the residual, C, the sum of squares, sqrt, the
    # comparison; in a detect-mode graph D too, no label reads D(E(x)) there), from the residual
    # on, minus C's linear layers
    only_detect = detect - classify
    after = _after_residual(ops, first) if first is not None else None
    keep |= {i for i in only_detect if not int8_work(i) and (after is None or i in after)}
    return sorted(keep)


def _after_residual(ops: Sequence[Op], first: int) -> set[int]:
    """The ops downstream of the residual ``x - D(E(x))``: the anomaly autoencoder C and the norm.

    The residual is found structurally: the op, other than the first convolution, that reads the
    preprocessed input the first convolution reads.  C is what depends on it; D does not (D reads
    E(x) only), so in a detect-mode graph, where D feeds no label, ``mixed`` still runs D in int8.
    Nothing found (no residual in the graph): an empty set, so everything the score
    reads stays float, the conservative reading of the rule.
    """
    x = ops[first].inputs[0] if ops[first].inputs else None
    seeds = [i for i, op in enumerate(ops) if i != first and x in op.inputs and op.type not in COMPUTE_OPS]
    consumers: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(t, []).append(i)
    seen: set[int] = set()
    stack = list(seeds)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for t in ops[i].outputs:
            stack.extend(consumers.get(t, ()))
    return seen
