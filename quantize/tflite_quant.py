"""int8 TFLite for LiteRT with the detector's float path kept intact.

The conversion runs in a child process (the exporter's onnx2tf steps, then the TF converter with a
representative data set and the quantization debugger's selective quantization); see
``dafar/quantize/_tflite_worker.py``.  With the ``precise`` layout the float convolutions get
int8-stored weights afterwards (:func:`weight_only_int8`): an int8 per-channel constant and a
DEQUANTIZE op that rebuilds the float32 weights, the same pattern the TF converter emits for
float16 weights, so the file shrinks to int8 size while the arithmetic stays float.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dafar.errors import QuantizationError, require
from dafar.export.tflite_export import tflite_builtin_names

from .layout import COMPUTE_OPS, Layout

__all__ = ["quantize_tflite", "weight_only_int8", "tflite_layer_errors"]

_WORKER = "dafar.quantize._tflite_worker"

# weight input index and output-channel axis of each conv/linear op (TFLite layouts)
_WEIGHT = {"CONV_2D": (1, 0), "TRANSPOSE_CONV": (1, 0), "FULLY_CONNECTED": (1, 0), "DEPTHWISE_CONV_2D": (1, 3)}


def weight_only_int8(buf: bytes, float_op_names: set[str]) -> tuple[bytes, int]:
    """Store the float32 weights of the named float conv/linear ops as int8 (per output channel,
    symmetric) behind a DEQUANTIZE op.  Returns the new flatbuffer and the number of weights moved."""
    require("ai_edge_litert", "litert", "editing TFLite files")
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    names = tflite_builtin_names()
    m = S.ModelT.InitFromPackedBuf(buf, 0)
    sg = m.subgraphs[0]
    codes = [names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "?") for oc in m.operatorCodes]
    if "DEQUANTIZE" in codes:
        deq_code = codes.index("DEQUANTIZE")
    else:
        oc = S.OperatorCodeT()
        oc.builtinCode = S.BuiltinOperator.DEQUANTIZE
        oc.deprecatedBuiltinCode = min(S.BuiltinOperator.DEQUANTIZE, 127)
        oc.version = 1
        m.operatorCodes.append(oc)
        deq_code = len(m.operatorCodes) - 1
    done: dict[int, int] = {}
    new_ops = []
    moved = 0
    for op in sg.operators:
        kind = codes[op.opcodeIndex] if op.opcodeIndex < len(codes) else ""
        out_name = sg.tensors[op.outputs[0]].name
        out_name = out_name.decode() if isinstance(out_name, bytes) else out_name
        if kind in _WEIGHT and out_name in float_op_names:
            wi, axis = _WEIGHT[kind]
            widx = int(op.inputs[wi])
            t = sg.tensors[widx]
            data = m.buffers[t.buffer].data if t.buffer < len(m.buffers) else None
            if widx not in done and t.type == S.TensorType.FLOAT32 and data is not None and len(data):
                w = np.frombuffer(bytes(bytearray(data)), dtype="<f4").reshape(list(t.shape))
                red = tuple(a for a in range(w.ndim) if a != axis)
                scale = (np.abs(w).max(axis=red) / 127.0).astype(np.float32)
                scale = np.where(scale > 0, scale, np.float32(1.0))
                shape = [1] * w.ndim
                shape[axis] = -1
                q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
                b = S.BufferT()
                b.data = np.frombuffer(q.tobytes(), dtype=np.uint8)
                m.buffers.append(b)
                qt = S.TensorT()
                qt.shape = np.array(t.shape, dtype=np.int32)
                qt.type = S.TensorType.INT8
                qt.buffer = len(m.buffers) - 1
                qt.name = (t.name.decode() if isinstance(t.name, bytes) else t.name) + "/int8"
                qp = S.QuantizationParametersT()
                qp.scale = scale.astype(np.float32)
                qp.zeroPoint = np.zeros(len(scale), dtype=np.int64)
                qp.quantizedDimension = axis
                qt.quantization = qp
                sg.tensors.append(qt)
                m.buffers[t.buffer].data = None  # the float copy goes away
                t.buffer = 0  # the float weights are now computed, by DEQUANTIZE
                dop = S.OperatorT()
                dop.opcodeIndex = deq_code
                dop.inputs = np.array([len(sg.tensors) - 1], dtype=np.int32)
                dop.outputs = np.array([widx], dtype=np.int32)
                done[widx] = len(new_ops)
                new_ops.append(dop)
                moved += 1
        new_ops.append(op)
    sg.operators = new_ops
    builder = flatbuffers.Builder(len(buf))
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), moved


def _float_op_counts(buf: bytes) -> dict[str, int]:
    """Ops per type whose activation input is not int8 (i.e. that compute in float)."""
    from ai_edge_litert import schema_py_generated as S

    names = tflite_builtin_names()
    m = S.Model.GetRootAs(buf, 0)
    sg = m.Subgraphs(0)
    counts: dict[str, int] = {}
    for j in range(sg.OperatorsLength()):
        op = sg.Operators(j)
        oc = m.OperatorCodes(op.OpcodeIndex())
        kind = names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "?")
        ins = [int(i) for i in op.InputsAsNumpy() if i >= 0] if op.InputsLength() else []
        act = ins[2] if kind == "TRANSPOSE_CONV" and len(ins) > 2 else (ins[0] if ins else None)
        if act is None:
            continue
        t = sg.Tensors(act)
        q = t.Quantization()
        quantized = t.Type() in (S.TensorType.INT8, S.TensorType.UINT8, S.TensorType.INT16) and (
            q is not None and q.ScaleLength() > 0)  # raw uint8 pixels (the model input) carry no scale
        if not quantized:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def quantize_tflite(src_onnx: str | os.PathLike, dst: str | os.PathLike, *, contract: str, batch: int,
                    input_chw: tuple[int, int, int], output_names: tuple[str, ...], calib: np.ndarray,
                    layout: Layout | str, work_dir: str | os.PathLike, activations: str = "int8") -> dict:
    """Convert the static-batch float ONNX graph ``src_onnx`` to an int8 ``.tflite`` at ``dst``."""
    from dafar.export.tflite_export import check_builtin_only, convert_to_tflite, min_runtime_version

    from .tflite_compat import explicit_dequantize

    from .graphs import tflite_ops
    from .layout import float_ops

    layout = Layout(layout)
    if activations not in ("int8", "int16"):
        raise QuantizationError(f"activations must be 'int8' or 'int16' (LiteRT's 16x8 mode), got {activations!r}")
    work = Path(work_dir)
    calib_path = work / f"{Path(dst).stem}.calib.npy"
    info_path = work / f"{Path(dst).stem}.info.json"
    np.save(calib_path, np.ascontiguousarray(calib))
    try:
        convert_to_tflite(src_onnx, dst, contract=contract, batch=batch, input_chw=input_chw, output_names=output_names,
                          worker=_WORKER, extra={"quantize": {"calib": str(calib_path.resolve()), "layout": layout.value,
                                                              "info": str(info_path.resolve()),
                                                              "activations": activations}})
        info = json.loads(info_path.read_text())
    finally:
        calib_path.unlink(missing_ok=True)
        info_path.unlink(missing_ok=True)
    info["weight_only_int8_nodes"] = 0
    # the layout must be honoured: every op type meant to stay float computes in float at least as
    # often as the rule asked (the debugger matches names, which a converter can change)
    got = _float_op_counts(Path(dst).read_bytes())
    short = {t: (n, got.get(t, 0)) for t, n in info["float_node_types"].items() if got.get(t, 0) < n}
    if short:
        raise QuantizationError(
            f"{Path(dst).name}: the {layout.value} layout was not honoured; ops that should compute in float "
            f"but were quantized (type: wanted, got): {short}")
    if layout is Layout.PRECISE:
        buf = Path(dst).read_bytes()
        ops, outputs = tflite_ops(buf)
        keep = {ops[i].name for i in float_ops(ops, outputs, layout)}
        # The first convolution keeps float32 weights (a few hundred to a few thousand numbers).
        # With int8 weights behind a DEQUANTIZE, OpenVINO's TFLite reader takes a uint8 input's
        # cast-and-normalize for an activation dequantization and runs that convolution as a u8 x
        # i8 integer kernel, folding the non-integer zero point (mean 0.5 = 127.5 pixel levels)
        # inexactly: MNIST scores moved by up to 9e-2 there against 1e-6 with float weights.
        first = next((op.name for op in ops if op.type in COMPUTE_OPS), None)
        new, moved = weight_only_int8(buf, keep - {first})
        Path(dst).write_bytes(new)
        info["weight_only_int8_nodes"] = moved
    # hybrid ops (float input, int8 weights) that older interpreters lack get an explicit DEQUANTIZE
    new, n = explicit_dequantize(Path(dst).read_bytes())
    if n:
        Path(dst).write_bytes(new)
    info["explicit_dequantize_ops"] = n
    info["min_runtime"] = {"tflite": min_runtime_version(dst)}
    try:
        info["ops"] = check_builtin_only(dst)
    except Exception as exc:
        raise QuantizationError(f"{Path(dst).name}: {exc}") from exc
    info.update({"activation_type": activations, "weight_type": "int8 per-channel", "calibration": "TFLite converter (MinMax)"})
    return info


def tflite_layer_errors(float_path: str | os.PathLike, int8_path: str | os.PathLike, x: np.ndarray,
                        top: int = 8) -> list[dict]:
    """Per-tensor SQNR (dB) of the int8 model against the float one, for tensors that share a name
    (op outputs keep their TF names through quantization), worst first."""
    from dafar.runtime.backends import LiteRTRunner

    from .graphs import tflite_ops

    def collect(path):
        produced = {t for op in tflite_ops(Path(path).read_bytes())[0] for t in op.outputs}
        it = LiteRTRunner(path, threads=1, preserve_all_tensors=True).interpreter
        it.allocate_tensors()
        details = {d["name"]: d for d in it.get_tensor_details() if d["name"] in produced}
        inp = it.get_input_details()[0]
        batch = int(inp["shape"][0])
        acc: dict[str, list] = {}
        for i in range(0, len(x) - batch + 1, batch):
            it.set_tensor(inp["index"], np.ascontiguousarray(x[i: i + batch], dtype=inp["dtype"]))
            it.invoke()
            for name, d in details.items():
                try:
                    v = it.get_tensor(d["index"])
                except ValueError:
                    continue
                if v is None or v.size == 0 or v.dtype == np.bool_:
                    continue
                v = v.astype(np.float64)
                sc, zp = d["quantization"]
                if sc:
                    v = (v - zp) * sc
                acc.setdefault(name, []).append(v.ravel())
        return {k: np.concatenate(v) for k, v in acc.items()}

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f, q = collect(float_path), collect(int8_path)
    except Exception as exc:  # a debugging aid: never fail the quantization for it
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    rows = []
    for name in sorted(set(f) & set(q)):
        a, b = f[name], q[name]
        if a.shape != b.shape or name.startswith("arith.constant") or np.all(a == b) and np.allclose(a, a[0]):
            continue
        sig, noise = float(np.sum(a * a)), float(np.sum((a - b) ** 2))
        if sig == 0:
            continue
        rows.append({"tensor": name, "sqnr_db": float(10 * np.log10(sig / max(noise, 1e-30)))})
    rows = [r for r in rows if r["sqnr_db"] < 200]  # identical tensors (float ops, constants)
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows[:top]
