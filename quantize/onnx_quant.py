"""int8 ONNX (QDQ) for ONNX Runtime with the detector's float path kept intact.

Steps: ONNX Runtime's ``quant_pre_process`` (shape inference, graph clean-up); the layout rule
(:mod:`dafar.quantize.layout`) picks the nodes that stay float; a float tensor that feeds both an
int8 node and a float node is split (:func:`_split_float_tensors`), because ORT quantizes a *tensor* and
every consumer then reads the rounded copy (an Identity gives the int8 consumers their own
tensor, so the residual and the NaN check read the exact input); ``quantize_static`` (QDQ, per-channel int8 weights,
MinMax calibration, 7-bit weights by default); with the ``precise`` layout, the float convolutions
keep int8-stored weights at the full 8-bit range (DequantizeLinear on an int8 initializer: float
compute, quarter-size file), on their own copy where an int8 node shares the weight
(:func:`_split_shared_weights`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dafar.errors import ExportError, QuantizationError, require

from .graphs import onnx_ops
from .layout import COMPUTE_OPS, Layout, float_ops

__all__ = ["quantize_onnx", "onnx_layer_errors"]


def _split_float_tensors(model, keep_names: set[str]) -> int:
    """Keep float tensors float for their float consumers.

    ORT's QDQ quantizer quantizes a *tensor* and points every consumer at the rounded copy, so a
    tensor read by both an int8 node and a float node (the preprocessed input read by E and by the
    residual; E's features read by F and, in the precise layout, by D) would reach the float node
    rounded.  An Identity gives the int8 consumers their own name to quantize; the float consumers
    keep reading the original tensor (ORT removes the Identity when it loads the model)."""
    from onnx import helper

    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    inits = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    count = 0
    for t, users in consumers.items():
        if t in inits:
            continue
        if t not in graph_inputs and (t not in producer or producer[t].name not in keep_names):
            continue  # produced by an int8 node: already rounded for everyone
        int8_users = [n for n in users if n.name not in keep_names]
        if not int8_users or len(int8_users) == len(users):
            continue
        t_q = f"{t}__to_int8"
        for n in int8_users:
            for k, name in enumerate(n.input):
                if name == t:
                    n.input[k] = t_q
        ident = helper.make_node("Identity", [t], [t_q], name=f"{t}__to_int8_identity")
        idx = (list(model.graph.node).index(producer[t]) + 1) if t in producer else 0
        model.graph.node.insert(idx, ident)
        count += 1
    return count


def _split_shared_weights(model, keep_names: set[str]) -> int:
    """Give float conv/linear nodes their own copy of a weight they share with an int8 node.

    In the precise layout E runs twice with the same weights: in float on the input, in int8 on
    the reconstruction.  ORT quantizes the shared initializer once, for the int8 node, and the
    float node would read that copy: 7-bit weights (``weight_bits=7``) on the score's own path,
    where float compute needs no such care.  With a copy, :func:`_weight_only_int8` stores the
    float node's weights at the full 8-bit range instead."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in inits:
            users.setdefault(n.input[1], []).append(n)
    count = 0
    for wname, nodes in users.items():
        floats = [n for n in nodes if n.name in keep_names]
        if not floats or len(floats) == len(nodes):
            continue
        copy = type(inits[wname])()
        copy.CopyFrom(inits[wname])
        copy.name = f"{wname}__float"
        model.graph.initializer.append(copy)
        for n in floats:
            n.input[1] = copy.name
        count += 1
    return count


def _weight_only_int8(model, keep_names: set[str]) -> int:
    """Float conv/linear nodes read int8-stored weights through DequantizeLinear (per channel)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    dq_of: dict[str, str] = {}
    new_nodes, new_inits = [], []
    count = 0
    for n in model.graph.node:
        if n.name not in keep_names or n.op_type not in COMPUTE_OPS or len(n.input) < 2 or n.input[1] not in inits:
            continue
        wname = n.input[1]
        if wname not in dq_of:
            w = numpy_helper.to_array(inits[wname]).astype(np.float32)
            if n.op_type == "ConvTranspose":
                axis = 1  # weight (C_in, C_out / group, kH, kW)
            elif n.op_type == "Gemm":
                trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            elif n.op_type == "MatMul":
                axis = 1
            else:
                axis = 0  # Conv: (C_out, C_in / group, kH, kW)
            red = tuple(a for a in range(w.ndim) if a != axis)
            scale = np.abs(w).max(axis=red) / 127.0
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = f"{wname}__w8"
            new_inits += [numpy_helper.from_array(q, f"{base}_q"), numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}_zp")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"],
                                              [f"{base}_deq"], name=f"{base}_DequantizeLinear", axis=axis))
            dq_of[wname] = f"{base}_deq"
        n.input[1] = dq_of[wname]
        count += 1
    for new in reversed(new_nodes):
        model.graph.node.insert(0, new)
    model.graph.initializer.extend(new_inits)
    used = {i for n in model.graph.node for i in n.input}
    for name in list(dq_of):
        if name not in used:
            model.graph.initializer.remove(inits[name])
    _ = TensorProto  # keep the import explicit for readers: int8 initializers are TensorProto.INT8
    return count


class _Reader:
    """ONNX Runtime CalibrationDataReader over an in-memory array (batches of 32)."""

    def __init__(self, x: np.ndarray, batch: int = 32):
        self._it = iter([{"x": x[i: i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):  # qdq_loss_debug iterates the reader
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike, calib: np.ndarray, layout: Layout | str,
                  activation_type: str = "uint8", work_dir: str | os.PathLike | None = None,
                  weight_bits: int = 7) -> dict:
    """Quantize the float ONNX graph ``src`` into ``dst``; returns what was kept float.

    ``weight_bits=7`` stores the int8 weights in -64..63 (ONNX Runtime's ``reduce_range``): exact
    on every CPU, where full-range weights saturate ONNX Runtime's x86 kernels on CPUs without
    VNNI (see :mod:`dafar.runtime.cpu`); 8 is a little more precise on ARM and VNNI CPUs only."""
    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits!r}")
    onnx = require("onnx", "export", "ONNX quantization")
    require("onnxruntime", "onnx-runtime", "ONNX quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    layout = Layout(layout)
    src, dst = Path(src), Path(dst)
    work = Path(work_dir) if work_dir else dst.parent
    pre = work / f"{dst.stem}.pre.onnx"
    staged = work / f"{dst.stem}.staged.onnx"
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        ops, outputs = onnx_ops(model)
        keep = {ops[i].name for i in float_ops(ops, outputs, layout)}
        dup = _split_float_tensors(model, keep) if layout is not Layout.NAIVE else 0
        shared = _split_shared_weights(model, keep) if layout is Layout.PRECISE else 0
        onnx.save(model, str(staged))
        # 16-bit activations (A16W8 QDQ) are measured by bench/scripts/score_path_ort16.py, not shipped:
        # ONNX Runtime's CPU kernels run them as float with conversions around every op
        act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "uint16": QuantType.QUInt16,
               "int16": QuantType.QInt16}[activation_type]
        try:
            quantize_static(str(staged), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(keep),
                            calibrate_method=CalibrationMethod.MinMax, reduce_range=weight_bits == 7,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except Exception as exc:
            raise QuantizationError(f"ONNX Runtime quantization of {src.name} failed: {type(exc).__name__}: {exc}") from exc
        w8 = 0
        if layout is Layout.PRECISE:
            q = onnx.load(str(dst))
            w8 = _weight_only_int8(q, keep)
            onnx.save(q, str(dst))
        qm = onnx.load(str(dst))
        from dafar.export.onnx_export import portable_ir

        if portable_ir(qm):  # as the float export: readable by ONNX Runtime 1.16+
            onnx.save(qm, str(dst))
        try:
            onnx.checker.check_model(qm)
        except Exception as exc:
            raise ExportError(f"ONNX checker rejected the quantized {dst.name}: {exc}") from exc
        kept_types: dict[str, int] = {}
        for o in ops:
            if o.name in keep:
                kept_types[o.type] = kept_types.get(o.type, 0) + 1
        return {"float_nodes": len(keep), "float_node_types": dict(sorted(kept_types.items())),
                "split_float_tensors": dup, "split_shared_weights": shared, "weight_only_int8_nodes": w8, "activation_type": activation_type,
                "weight_type": "int8 per-channel", "weight_bits": weight_bits, "calibration": "MinMax", "format": "QDQ"}
    finally:
        for p in (pre, staged):
            p.unlink(missing_ok=True)
        for p in work.glob(f"{dst.stem}.pre*"):
            p.unlink(missing_ok=True)


def onnx_layer_errors(float_path: str | os.PathLike, qdq_path: str | os.PathLike, x: np.ndarray,
                      work_dir: str | os.PathLike, top: int = 8) -> list[dict]:
    """Per-tensor SQNR (dB) of the int8 model against the float one, worst first (ORT's qdq_loss_debug)."""
    require("onnxruntime", "onnx-runtime", "ONNX quantization")
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    work = Path(work_dir)
    fa, qa = work / "float.aug.onnx", work / "qdq.aug.onnx"
    try:
        modify_model_output_intermediate_tensors(str(float_path), str(fa))
        modify_model_output_intermediate_tensors(str(qdq_path), str(qa))
        f_act = collect_activations(str(fa), _Reader(x, 16))
        q_act = collect_activations(str(qa), _Reader(x, 16))
        match = create_activation_matching(q_act, f_act)
        # tensors present in both models only (the int8 model has extra ones, e.g. the split copies)
        match = {k: v for k, v in match.items() if "float" in v and "pre_qdq" in v and "post_qdq" in v}
        errs = compute_activation_error(match)
    except Exception as exc:  # a debugging aid: never fail the quantization for it
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    finally:
        for p in list(work.glob("float.aug*")) + list(work.glob("qdq.aug*")):
            p.unlink(missing_ok=True)
    rows = []
    for name, e in errs.items():
        sq = e.get("xmodel_err")
        if sq is None or not np.isfinite(sq):
            continue
        rows.append({"tensor": name, "sqnr_db": float(sq), "qdq_sqnr_db": float(e.get("qdq_err", np.nan))})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows[:top]
