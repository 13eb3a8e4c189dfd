"""Where the exported files run: the compatibility matrix (``python -m dafar.bench.compat.matrix``)
across LiteRT's two APIs, tflite-runtime 2.14, ONNX Runtime old and new, its Node binding and
OpenVINO, each in its own virtual environment (:mod:`.probe` is the standalone worker).  Nothing
is imported here, so ``python -m dafar.bench.compat.matrix`` runs the module once."""
