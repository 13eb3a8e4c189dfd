"""The TensorFlow side of the ONNX -> TFLite conversion, used inside a converter child process
(``python -m dafar.export._tflite_worker`` for float files; ``dafar.quantize`` runs its own worker
on the same functions for int8 files).  Imports onnx2tf and TensorFlow when called, never at import.

1. onnx2tf converts the (static-batch, float NCHW in [0, 1]) ONNX graph to a SavedModel whose
   input is NHWC.  Offline trap: onnx2tf 1.28.8 downloads
   ``calibration_image_sample_data_20x128x128x3_float32.npy`` for any model whose inputs are all
   4-D with 3 channels, and crashes without a network; a file of that name in the working
   folder is used instead, so :func:`prepare_work_dir` writes a deterministic one there first.
2. onnx2tf drops the ONNX output names (``Identity_N``), so :func:`named_savedmodel` wraps its
   signature in a ``tf.function`` that takes the input contract (float NCHW in [0, 1] via a
   transpose, or uint8 NHWC via a cast and 1/255 scale), returns a dict keyed by our names, and
   saves that as a new SavedModel with one ``serving_default`` signature ``x -> label, score, ...``.
3. :func:`converter` makes the TF Lite converter for it with builtin ops only: a Flex or custom op
   fails the conversion (the paper's MaxUnpool would need ``FlexMaxPoolWithArgmax``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dafar.schema import InputContract

__all__ = ["ONNX2TF_SAMPLE", "prepare_work_dir", "named_savedmodel", "converter", "read_spec"]

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def read_spec(spec_path: str | os.PathLike) -> dict:
    """The worker's job description (written by :func:`dafar.export.tflite_export.convert_to_tflite`)."""
    return json.loads(Path(spec_path).read_text())


def prepare_work_dir(work: Path) -> None:
    """Enter the working folder and pre-empt onnx2tf's sample-data download (see the module docstring)."""
    os.chdir(work)
    rng = np.random.default_rng(0)
    np.save(work / ONNX2TF_SAMPLE, rng.random((20, 128, 128, 3), dtype=np.float32))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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


def named_savedmodel(spec: dict, work: Path) -> Path:
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

    if InputContract(spec["contract"]) is InputContract.UINT8_NHWC:
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
            # label as int32: LiteRT's CompiledModel API cannot read an int64 tensor
            # ("ReadTensorToBuffer: unsupported dtype 'int64'"); class indices fit either way
            return {name: tf.identity(tf.cast(out[k], tf.int32) if name == "label" else out[k], name=name)
                    for name, k in zip(names, keys)}

    graph = Graph()
    tf.saved_model.save(graph, str(work / "named"), signatures={"serving_default": graph.serve})
    return work / "named"


def converter(saved: Path):
    """The TF Lite converter for ``saved``'s ``serving_default``, builtin ops only."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serving_default"])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    conv.allow_custom_ops = False
    return conv
