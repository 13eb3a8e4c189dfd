"""Guest side of bench/scripts/arm64_icount.sh: run one model file under the emulated aarch64 CPU
and mark each inference for the counting plugin (icount_plugin.c).  numpy and the backend only
(what a Pi has), one thread (the plugin's counter is shared by every guest thread).

    python arm64_icount_guest.py MODEL_FILE RUNS
"""
import os
import sys

import numpy as np

MAGIC = 0x1C0C0DE000  # icount_plugin.c: lseek(-1, MAGIC + 1) starts a phase, MAGIC + 2 ends it


def mark(k: int) -> None:
    try:
        os.lseek(-1, MAGIC + k, os.SEEK_SET)  # EBADF, by design: the plugin reads the syscall's arguments
    except OSError:
        pass


def _input(shape, dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = [int(s) if isinstance(s, (int, np.integer)) and int(s) > 0 else 1 for s in shape]  # dynamic batch: 1
    if np.dtype(dtype) == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32).astype(dtype)


def main() -> int:
    path, runs = sys.argv[1], int(sys.argv[2])
    if path.endswith(".tflite"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
        it = Interpreter(model_path=path, num_threads=1)
        it.allocate_tensors()
        d = it.get_input_details()[0]
        x = _input(d["shape"], d["dtype"])

        def call():
            it.set_tensor(d["index"], x)
            it.invoke()
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        i = s.get_inputs()[0]
        x = _input(i.shape, np.uint8 if "uint8" in i.type else np.float32)

        def call():
            s.run(None, {i.name: x})
    call()
    call()  # warm-up: first-call allocations and kernel selection stay out of the counts
    for _ in range(runs):
        mark(1)
        call()
        mark(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
