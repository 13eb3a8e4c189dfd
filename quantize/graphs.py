"""Small, format-specific views of ONNX and TFLite graphs: the op list the layout rule needs,
and in-place edits of the threshold constant alpha.

Alpha lives in the graph as one float32 constant, the second input of the comparison
``score <= alpha``.  After int8 quantization the score's distribution moves a little, so alpha is
recalibrated on the quantized model's own clean validation scores and written into that
constant: ONNX as an initializer, TFLite by rewriting the four bytes of its buffer.  Both edits
are checked by reading the value back; the caller then checks that the model's decisions follow
the new alpha.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dafar.errors import ExportError, require
from dafar.export.tflite_export import tflite_builtin_names

from .layout import Op

__all__ = ["onnx_ops", "tflite_ops", "set_alpha_onnx", "set_alpha_tflite", "get_alpha_onnx", "get_alpha_tflite"]


# ---------------------------------------------------------------- ONNX
def onnx_ops(model) -> tuple[list[Op], dict[str, str]]:
    ops = [Op(n.name, n.op_type, tuple(i for i in n.input if i), tuple(n.output)) for n in model.graph.node]
    return ops, {o.name: o.name for o in model.graph.output}


def _alpha_initializer(model, path):
    inits = {i.name: i for i in model.graph.initializer}
    cands = [n for n in model.graph.node if n.op_type == "LessOrEqual" and len(n.input) == 2 and n.input[1] in inits]
    if len(cands) != 1:
        raise ExportError(f"{path}: expected one LessOrEqual(score, alpha) with a constant alpha, found {len(cands)}")
    return inits[cands[0].input[1]]


def get_alpha_onnx(path: str | os.PathLike) -> float:
    onnx = require("onnx", "export", "editing ONNX models")
    from onnx import numpy_helper

    return float(numpy_helper.to_array(_alpha_initializer(onnx.load(str(path)), path)))


def set_alpha_onnx(path: str | os.PathLike, alpha: float) -> None:
    onnx = require("onnx", "export", "editing ONNX models")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = _alpha_initializer(model, path)
    old = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.asarray(alpha, dtype=np.float32).reshape(old.shape), init.name))
    onnx.save(model, str(path))
    got = get_alpha_onnx(path)
    if got != np.float32(alpha):
        raise ExportError(f"{path}: alpha reads back as {got}, not {alpha}")


# ---------------------------------------------------------------- TFLite
def _schema():
    require("ai_edge_litert", "litert", "reading TFLite files")
    from ai_edge_litert import schema_py_generated as S

    return S


def tflite_ops(buf: bytes) -> tuple[list[Op], dict[str, str]]:
    """Ops of subgraph 0 (named by their first output tensor) and the signature's output map."""
    S = _schema()
    model = S.Model.GetRootAs(buf, 0)
    names = tflite_builtin_names()
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        codes.append(names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "UNKNOWN"))
    sg = model.Subgraphs(0)

    def tname(i: int) -> str:
        return sg.Tensors(int(i)).Name().decode()

    ops = []
    for j in range(sg.OperatorsLength()):
        op = sg.Operators(j)
        ins = tuple(tname(i) for i in op.InputsAsNumpy() if i >= 0) if op.InputsLength() else ()
        outs = tuple(tname(i) for i in op.OutputsAsNumpy())
        ops.append(Op(outs[0], codes[op.OpcodeIndex()], ins, outs))
    outputs = {}
    if model.SignatureDefsLength():
        sd = model.SignatureDefs(0)
        for k in range(sd.OutputsLength()):
            o = sd.Outputs(k)
            outputs[o.Name().decode()] = tname(o.TensorIndex())
    return ops, outputs


def _tflite_alpha_slot(buf: bytes, path) -> tuple[int, float]:
    """Byte offset and value of the alpha constant of ``LESS_EQUAL(score, alpha)``."""
    S = _schema()
    model = S.Model.GetRootAs(buf, 0)
    names = tflite_builtin_names()
    sg = model.Subgraphs(0)
    score_t = None
    sd = model.SignatureDefs(0) if model.SignatureDefsLength() else None
    if sd is not None:
        for k in range(sd.OutputsLength()):
            if sd.Outputs(k).Name().decode() == "score":
                score_t = sd.Outputs(k).TensorIndex()
    if score_t is None:
        raise ExportError(f"{path}: no 'score' output in the serving_default signature")
    slots = []
    for j in range(sg.OperatorsLength()):
        op = sg.Operators(j)
        oc = model.OperatorCodes(op.OpcodeIndex())
        if names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())) != "LESS_EQUAL":
            continue
        a, b = (int(i) for i in op.InputsAsNumpy())
        if a != score_t:
            continue
        t = sg.Tensors(b)
        bufobj = model.Buffers(t.Buffer())
        users = sum(1 for ti in range(sg.TensorsLength()) if sg.Tensors(ti).Buffer() == t.Buffer())
        if users != 1:
            raise ExportError(f"{path}: the alpha constant shares its buffer with {users - 1} other tensors")
        if t.Type() != S.TensorType.FLOAT32 or bufobj.DataLength() != 4:
            raise ExportError(f"{path}: the alpha input of LESS_EQUAL is not a float32 constant")
        # absolute position of the buffer's bytes inside the flatbuffer
        o = bufobj._tab.Offset(4)
        start = bufobj._tab.Vector(o)
        slots.append((start, float(np.frombuffer(buf[start: start + 4], dtype="<f4")[0])))
    if len(slots) != 1:
        raise ExportError(f"{path}: expected one LESS_EQUAL(score, alpha), found {len(slots)}")
    return slots[0]


def get_alpha_tflite(path: str | os.PathLike) -> float:
    return _tflite_alpha_slot(Path(path).read_bytes(), path)[1]


def set_alpha_tflite(path: str | os.PathLike, alpha: float) -> None:
    buf = bytearray(Path(path).read_bytes())
    start, _ = _tflite_alpha_slot(bytes(buf), path)
    buf[start: start + 4] = np.asarray(alpha, dtype="<f4").tobytes()
    Path(path).write_bytes(bytes(buf))
    got = get_alpha_tflite(path)
    if got != np.float32(alpha):
        raise ExportError(f"{path}: alpha reads back as {got}, not {alpha}")
