"""Make an int8 TFLite file run on older interpreters: explicit DEQUANTIZE for hybrid ops they lack.

The ``precise`` layout keeps D's layers computing in float with int8-stored weights.  The TFLite
converter writes that as a *hybrid* op: a TRANSPOSE_CONV whose input is float32 and whose weights
are int8.  LiteRT 2.x runs it; tflite-runtime 2.14 (what Raspberry Pi OS users often have) does
not, and cannot refuse the file up front (the op is marked version 3, like a float one): it loads,
then fails on the first call with ``transpose_conv.cc:299 weights->type != input->type (INT8 !=
FLOAT32)``.

:func:`explicit_dequantize` rewrites every such op: its int8 weights (kept int8 in the file, so the
size stays) go through a DEQUANTIZE op into a float32 tensor that the TRANSPOSE_CONV then reads,
a float op every interpreter since TFLite 2.3 runs.  The computation is the float one the layout
asks for (the hybrid kernel quantized the activations on the fly instead).  The file's
``min_runtime_version`` metadata is raised to what the DEQUANTIZE needs
(:func:`dafar.export.tflite_export.min_runtime_version` reads it).
"""
from __future__ import annotations

__all__ = ["explicit_dequantize"]

# op types an older interpreter cannot run with float input and int8 weights (tflite-runtime 2.14
# runs hybrid CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED; TRANSPOSE_CONV hybrid came later)
_HYBRID_UNSUPPORTED = ("TRANSPOSE_CONV",)
# which input holds the weights, and which the activations
_WEIGHTS_INPUT = {"TRANSPOSE_CONV": (1, 2)}
# TFLite's op_version.cc: DEQUANTIZE of int8 is version 2, of per-channel int8 version 5;
# runtime_version.cc maps these to TFLite 1.13.1 and 2.7.0 (*dequantize, per-channel*)
_DEQUANTIZE_VERSION = {False: (2, "1.13.1"), True: (5, "2.7.0")}


def _schema():
    from ai_edge_litert import schema_py_generated as fb  # the TFLite flatbuffer schema, no TF needed

    return fb


def _code(oc) -> int:
    return max(oc.builtinCode, oc.deprecatedBuiltinCode)


def explicit_dequantize(model_bytes: bytes) -> tuple[bytes, int]:
    """(new file bytes, number of ops rewritten); the bytes come back unchanged when none was."""
    import flatbuffers
    import numpy as np

    from dafar.runtime.backends import version_tuple

    fb = _schema()
    ops_by_name = {k: v for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    wanted = {ops_by_name[n]: n for n in _HYBRID_UNSUPPORTED}
    m = fb.ModelT.InitFromPackedBuf(model_bytes, 0)
    deq = ops_by_name["DEQUANTIZE"]
    fixed, need_version = 0, "0"
    for sg in m.subgraphs:
        new_ops = []
        for op in sg.operators:
            name = wanted.get(_code(m.operatorCodes[op.opcodeIndex]))
            if name is not None:
                wi, xi = _WEIGHTS_INPUT[name]
                w, x = sg.tensors[op.inputs[wi]], sg.tensors[op.inputs[xi]]
                if w.type == fb.TensorType.INT8 and x.type == fb.TensorType.FLOAT32:
                    per_channel = w.quantization is not None and w.quantization.scale is not None and len(w.quantization.scale) > 1
                    version, runtime = _DEQUANTIZE_VERSION[per_channel]
                    if version_tuple(runtime) > version_tuple(need_version):
                        need_version = runtime
                    idx = next((i for i, oc in enumerate(m.operatorCodes) if _code(oc) == deq and oc.version == version), None)
                    if idx is None:
                        oc = fb.OperatorCodeT()
                        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = deq, min(deq, 127), version
                        m.operatorCodes.append(oc)
                        idx = len(m.operatorCodes) - 1
                    buf = fb.BufferT()  # an empty buffer: the tensor is computed, not stored
                    m.buffers.append(buf)
                    t = fb.TensorT()
                    t.shape = np.array(w.shape, dtype=np.int32)
                    t.type = fb.TensorType.FLOAT32
                    t.buffer = len(m.buffers) - 1
                    t.name = (w.name if isinstance(w.name, bytes) else str(w.name).encode()) + b"/dequantized"
                    sg.tensors.append(t)
                    d = fb.OperatorT()
                    d.opcodeIndex = idx
                    d.inputs = np.array([op.inputs[wi]], dtype=np.int32)
                    d.outputs = np.array([len(sg.tensors) - 1], dtype=np.int32)
                    new_ops.append(d)  # right before its consumer: the order stays topological
                    inputs = list(op.inputs)
                    inputs[wi] = len(sg.tensors) - 1
                    op.inputs = np.array(inputs, dtype=np.int32)
                    fixed += 1
            new_ops.append(op)
        sg.operators = new_ops
    if not fixed:
        return model_bytes, 0
    for md in m.metadata or []:  # the file now needs at least what its DEQUANTIZE ops need
        if md.name in (b"min_runtime_version", "min_runtime_version"):
            data = m.buffers[md.buffer].data
            old = bytes(bytearray(data)).rstrip(b"\0").decode("ascii", "replace") if data is not None else "0"
            if version_tuple(need_version) > version_tuple(old):
                m.buffers[md.buffer].data = np.frombuffer(need_version.encode().ljust(16, b"\0"), dtype=np.uint8)
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), fixed
