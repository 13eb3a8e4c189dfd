"""ONNX -> TFLite with float16 weights, in a child process (``python -m
dafar.bench.perf._fp16_worker SPEC.json``): the same conversion as ``dafar export``'s (the steps
of :mod:`dafar.export.tf_convert`), plus the converter's float16 weight option.  That is the file
a GPU delegate is usually given: weights stored in fp16 (half the size), dequantized to fp32 by a
CPU interpreter, consumed in fp16 by a GPU delegate."""
from __future__ import annotations

import sys
from pathlib import Path

from dafar.export.tf_convert import converter, named_savedmodel, prepare_work_dir, read_spec


def main(spec_path: str) -> int:
    import tensorflow as tf

    spec = read_spec(spec_path)
    work = Path(spec["work_dir"])
    prepare_work_dir(work)
    conv = converter(named_savedmodel(spec, work))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    Path(spec["out"]).write_bytes(conv.convert())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
