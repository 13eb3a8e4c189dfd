"""ONNX -> TFLite (float32) in a child process: ``python -m dafar.export._tflite_worker SPEC.json``.

Run in its own process and working folder because onnx2tf and TensorFlow hold ~1 GB, print a
lot, and read files from the working directory.  Steps:

1. onnx2tf converts the (static-batch, float NCHW in [0, 1]) ONNX graph to a SavedModel whose
   input is NHWC.  Offline trap: onnx2tf 1.28.8 downloads
   ``calibration_image_sample_data_20x128x128x3_float32.npy`` for any model whose inputs are all
   4-D with 3 channels, and crashes without a network; a file of that name in the working
   folder is used instead, so we write a deterministic one there first.
2. onnx2tf drops the ONNX output names (``Identity_N``), so we wrap its signature in a
   ``tf.function`` that takes the input contract (float NCHW in [0, 1] via a transpose, or uint8
   NHWC via a cast and 1/255 scale), returns a dict keyed by our names, and save that as a new
   SavedModel with one ``serving_default`` signature ``x -> label, score, ...``.
3. The TF converter turns it into a .tflite with builtin ops only; a Flex or custom op fails
   the conversion (the paper's MaxUnpool would need ``FlexMaxPoolWithArgmax``).
4. With a ``quantize`` entry in the spec (``dafar quantize``): post-training int8 with a
   representative data set, keeping the ops that :mod:`dafar.quantize.layout` names in float.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _write_offline_sample(folder: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(folder / ONNX2TF_SAMPLE, rng.random((20, 128, 128, 3), dtype=np.float32))


def _match_outputs(structured: dict, names: list[str]) -> list[str]:
    """onnx2tf keeps the ONNX output order; map its signature keys to that order."""
    keys = list(structured)
    if set(names) <= set(keys):
        return names
    if len(keys) != len(names):
        raise RuntimeError(f"onnx2tf signature has outputs {keys}, expected {len(names)}: {names}")

    def order(k: str):
        digits = "".join(ch for ch in k.rsplit("_", 1)[-1] if ch.isdigit()) if "_" in k else ""
        return (0, int(digits)) if digits else (-1, 0)  # 'Identity' < 'Identity_1' < ...

    return sorted(keys, key=order)


def _named_savedmodel(spec: dict, work: Path) -> Path:
    """onnx2tf's SavedModel wrapped in a ``serving_default`` signature ``x -> named outputs``."""
    import onnx2tf
    import tensorflow as tf

    n, c, h, w = spec["batch"], *spec["input_chw"]
    onnx2tf.convert(
        input_onnx_file_path=spec["onnx"],
        output_folder_path=str(work / "onnx2tf"),
        output_signaturedefs=True,
        overwrite_input_shape=[f"x:{n},{c},{h},{w}"],
        non_verbose=True,
    )
    loaded = tf.saved_model.load(str(work / "onnx2tf"))
    sig = loaded.signatures["serving_default"]
    in_keys = list(sig.structured_input_signature[1])
    if len(in_keys) != 1:
        raise RuntimeError(f"onnx2tf model has inputs {in_keys}, expected one")
    names = spec["output_names"]
    keys = _match_outputs(sig.structured_outputs, names)

    if spec["contract"] == "uint8-nhwc":
        in_spec = tf.TensorSpec([n, h, w, c], tf.uint8, name="x")

        def adapt(x):
            return tf.cast(x, tf.float32) * (1.0 / 255.0)
    else:
        in_spec = tf.TensorSpec([n, c, h, w], tf.float32, name="x")

        def adapt(x):
            return tf.transpose(x, [0, 2, 3, 1])

    class Graph(tf.Module):
        def __init__(self):
            super().__init__()
            self.inner = loaded

        @tf.function(input_signature=[in_spec])
        def serve(self, x):
            out = sig(**{in_keys[0]: adapt(x)})
            return {name: tf.identity(out[k], name=name) for name, k in zip(names, keys)}

    graph = Graph()
    tf.saved_model.save(graph, str(work / "named"), signatures={"serving_default": graph.serve})
    return work / "named"


def _converter(saved: Path):
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serving_default"])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    conv.allow_custom_ops = False
    return conv


def _quantized(spec: dict, saved: Path, work: Path) -> bytes:
    """int8 conversion: the layout rule picks the ops that stay float (the quantization debugger's
    selective quantization keeps them float and dequantizes before them)."""
    import tensorflow as tf

    from dafar.quantize.graphs import tflite_ops
    from dafar.quantize.layout import Layout, float_ops

    q = spec["quantize"]
    calib = np.load(q["calib"])
    batch = spec["batch"]
    samples = [calib[i: i + batch] for i in range(0, len(calib) - batch + 1, batch)]

    def rep():
        for s in samples:
            yield {"x": s}

    layout = Layout(q["layout"])
    float_model = _converter(saved).convert()
    ops, outputs = tflite_ops(float_model)
    keep_idx = float_ops(ops, outputs, layout)
    keep = [ops[i].name for i in keep_idx]
    # Op types whose every instance stays float are denylisted by type too: the debugger matches
    # node names through MLIR locations, and fused ops (TRANSPOSE_CONV + bias) can slip through.
    kept_types = {ops[i].type for i in keep_idx}
    deny_types = sorted(t for t in kept_types if all(i in keep_idx for i, o in enumerate(ops) if o.type == t))
    conv = _converter(saved)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    if not keep:
        model = conv.convert()
    else:
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep, denylisted_ops=deny_types)
        dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=lambda: ([s] for s in samples[:4]),
                                                        debug_options=opts)
        model = dbg.get_nondebug_quantized_model()
    types: dict[str, int] = {}
    for i in float_ops(ops, outputs, layout):
        types[ops[i].type] = types.get(ops[i].type, 0) + 1
    info = {"float_nodes": len(keep), "float_node_types": dict(sorted(types.items())), "calibration_batches": len(samples)}
    Path(q["info"]).write_text(json.dumps(info))
    return model


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work_dir"])
    os.chdir(work)
    _write_offline_sample(work)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = _named_savedmodel(spec, work)
    tfl = _quantized(spec, saved, work) if spec.get("quantize") else _converter(saved).convert()
    Path(spec["out"]).write_bytes(tfl)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
