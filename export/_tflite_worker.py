"""ONNX -> TFLite (float32) in a child process: ``python -m dafar.export._tflite_worker SPEC.json``.

Run in its own process and working folder because onnx2tf and TensorFlow hold ~1 GB, print a
lot, and read files from the working directory (:mod:`dafar.export.tf_convert` has the steps).
"""
from __future__ import annotations

import sys
from pathlib import Path

from dafar.export.tf_convert import converter, named_savedmodel, prepare_work_dir, read_spec


def main(spec_path: str) -> int:
    spec = read_spec(spec_path)
    work = Path(spec["work_dir"])
    prepare_work_dir(work)
    saved = named_savedmodel(spec, work)
    Path(spec["out"]).write_bytes(converter(saved).convert())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
