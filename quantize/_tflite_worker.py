"""ONNX -> int8 TFLite in a child process: ``python -m dafar.quantize._tflite_worker SPEC.json``.

The float conversion steps are the exporter's (:mod:`dafar.export.tf_convert`); then
post-training int8 with a representative data set, keeping in float the ops that the layout rule
(:mod:`dafar.quantize.layout`) names: the quantization debugger's selective quantization keeps
them float and dequantizes before them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dafar.export.tf_convert import converter, named_savedmodel, prepare_work_dir, read_spec
from dafar.quantize.graphs import tflite_ops
from dafar.quantize.layout import Layout, float_ops


def _quantized(spec: dict, saved: Path) -> bytes:
    import tensorflow as tf

    q = spec["quantize"]
    calib = np.load(q["calib"])
    batch = spec["batch"]
    samples = [calib[i: i + batch] for i in range(0, len(calib) - batch + 1, batch)]

    def rep():
        for s in samples:
            yield {"x": s}

    layout = Layout(q["layout"])
    float_model = converter(saved).convert()
    ops, outputs = tflite_ops(float_model)
    keep_idx = float_ops(ops, outputs, layout)
    keep = [ops[i].name for i in keep_idx]
    # Op types whose every instance stays float are denylisted by type too: the debugger matches
    # node names through MLIR locations, and fused ops (TRANSPOSE_CONV + bias) can slip through.
    kept_types = {ops[i].type for i in keep_idx}
    deny_types = sorted(t for t in kept_types if all(i in keep_idx for i, o in enumerate(ops) if o.type == t))
    conv = converter(saved)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    if q.get("activations", "int8") == "int16":
        # LiteRT's 16x8 mode: 16-bit activations, 8-bit weights; ops without a 16x8 kernel stay float.
        # Measurement only (bench/scripts/score_path_16x8.py): the debugger's selective quantization
        # silently drops the 16x8 op set (its files come out identical to int8 in size and outputs), so 16x8 is
        # offered for the whole graph alone, where LiteRT runs it with slow reference kernels.
        if keep:
            raise SystemExit("16x8 activations are supported only for the whole graph (the naive layout): the "
                             "converter's selective quantization ignores the 16x8 op set")
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                                          tf.lite.OpsSet.TFLITE_BUILTINS]
    if not keep:
        model = conv.convert()
    else:
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep, denylisted_ops=deny_types)
        dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=lambda: ([s] for s in samples[:4]),
                                                        debug_options=opts)
        model = dbg.get_nondebug_quantized_model()
    types: dict[str, int] = {}
    for i in keep_idx:
        types[ops[i].type] = types.get(ops[i].type, 0) + 1
    info = {"float_nodes": len(keep), "float_node_types": dict(sorted(types.items())), "calibration_batches": len(samples)}
    Path(q["info"]).write_text(json.dumps(info))
    return model


def main(spec_path: str) -> int:
    spec = read_spec(spec_path)
    work = Path(spec["work_dir"])
    prepare_work_dir(work)
    saved = named_savedmodel(spec, work)
    Path(spec["out"]).write_bytes(_quantized(spec, saved))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
