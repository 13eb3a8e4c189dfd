"""ONNX -> TFLite float32 (through onnx2tf in a child process) and checks on the result."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from dafar.errors import ExportError, UnsupportedOpError, require, require_available

__all__ = ["convert_to_tflite", "BackgroundConversions", "tflite_builtin_names", "tflite_op_counts", "check_builtin_only",
           "min_runtime_version"]

CONVERT_TIMEOUT_S = 900


FLOAT_WORKER = "dafar.export._tflite_worker"


def convert_to_tflite(onnx_path: str | os.PathLike, out_path: str | os.PathLike, *, contract: str, batch: int,
                      input_chw: tuple[int, int, int], output_names: tuple[str, ...],
                      worker: str = FLOAT_WORKER, extra: dict | None = None) -> Path:
    """Convert a float-NCHW ONNX graph to ``out_path`` (.tflite, float32) with the given input
    contract, in a child process running ``python -m <worker> SPEC.json``.  A later stage converts
    with its own worker module (built on :mod:`dafar.export.tf_convert`) and passes what that
    worker needs in ``extra`` (merged into the spec)."""
    for mod in ("onnx2tf", "tensorflow", "psutil"):
        require_available(mod, "export", "TFLite conversion")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="dafar-tflite-") as work:
        # onnx2tf rewrites its input file in place (onnxsim three times, then op renaming): it gets a
        # private copy, so the caller's file is never changed and two conversions of one source running
        # side by side (BackgroundConversions) cannot read each other's half-written file
        try:
            src = Path(shutil.copy(onnx_path, Path(work) / "source.onnx"))
        except OSError as exc:
            raise ExportError(f"cannot read the ONNX graph to convert, {onnx_path}: {exc}") from exc
        spec = {"onnx": str(src), "out": str(out_path.resolve()), "work_dir": work,
                "contract": contract, "batch": int(batch), "input_chw": list(input_chw),
                "output_names": list(output_names), **(extra or {})}
        spec_path = Path(work) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([sys.executable, "-m", worker, str(spec_path)],
                                  capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, env=env, cwd=work)
        except subprocess.TimeoutExpired as exc:
            raise ExportError(f"TFLite conversion of {Path(onnx_path).name} timed out after {CONVERT_TIMEOUT_S} s") from exc
        if proc.returncode != 0 or not out_path.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            if "Flex" in tail or "select TensorFlow op" in tail or "custom op" in tail.lower():
                raise UnsupportedOpError(
                    f"{Path(onnx_path).name} needs ops outside the TFLite builtin set (Flex/custom), which a stock "
                    f"LiteRT interpreter cannot run; the paper's MaxUnpool does this: train with --unpool mask.\n{tail}"
                )
            raise ExportError(f"TFLite conversion of {Path(onnx_path).name} failed (exit {proc.returncode}):\n{tail}")
    return out_path


class BackgroundConversions:
    """TFLite conversions started ahead of their use, at most ``workers`` at a time.

    Each conversion is a child process (onnx2tf and the TF converter: ~10-30 s, mostly one core
    each), so a thread here only waits on it: the stage submits every conversion up front and goes
    on with its ONNX work and checks, and on a 2-core machine two conversions overlap each other and
    that work: the main job's export + quantize took 71-78 s instead of 92-99 s (2 rounds each,
    interleaved, 2026-12-06, 2-core Xeon VM), and its files came out byte-identical to converting
    one after the other.  A failed conversion raises its own error where its result is
    asked for; leaving the ``with`` block waits for running conversions and cancels pending ones, so
    nothing writes into a staging folder after the stage has cleaned it up.
    """

    def __init__(self, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        workers = workers or max(1, min(2, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dafar-tflite")
        self._futures: dict = {}

    def submit(self, key, fn, /, *args, **kwargs) -> None:
        """Start ``fn(*args, **kwargs)`` (a conversion) under ``key``."""
        if key in self._futures:
            raise ValueError(f"conversion {key!r} submitted twice")
        self._futures[key] = self._pool.submit(fn, *args, **kwargs)

    def result(self, key):
        """Wait for the conversion under ``key``; its return value, or its exception raised here."""
        return self._futures.pop(key).result()

    def __enter__(self) -> "BackgroundConversions":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def tflite_builtin_names() -> dict[int, str]:
    """LiteRT's builtin operator codes by number (from the flatbuffer schema the wheel ships)."""
    require("ai_edge_litert", "litert", "reading TFLite files")
    from ai_edge_litert import schema_py_generated as S

    return {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def tflite_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Op names and counts read from the flatbuffer (custom ops appear as ``CUSTOM:<code>``)."""
    require("ai_edge_litert", "litert", "reading TFLite files")
    from ai_edge_litert import schema_py_generated as S

    buf = Path(path).read_bytes()
    model = S.Model.GetRootAs(buf, 0)
    names = tflite_builtin_names()
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == S.BuiltinOperator.CUSTOM:
            codes.append(f"CUSTOM:{(oc.CustomCode() or b'?').decode()}")
        else:
            codes.append(names.get(code, f"UNKNOWN_{code}"))
    counts: Counter = Counter()
    for si in range(model.SubgraphsLength()):
        sg = model.Subgraphs(si)
        for oi in range(sg.OperatorsLength()):
            counts[codes[sg.Operators(oi).OpcodeIndex()]] += 1
    return dict(sorted(counts.items()))


def check_builtin_only(path: str | os.PathLike) -> dict[str, int]:
    ops = tflite_op_counts(path)
    bad = sorted(op for op in ops if op.startswith("CUSTOM") or op.startswith("UNKNOWN") or "FLEX" in op.upper())
    if bad:
        raise UnsupportedOpError(f"{Path(path).name} holds non-builtin ops {bad}; a stock LiteRT interpreter cannot run it")
    return ops


def min_runtime_version(path_or_bytes) -> str | None:
    """The ``min_runtime_version`` metadata the TFLite converter wrote from the file's op versions
    (e.g. ``"2.3.0"``), or None where the file has none.  Recorded in the manifest: an interpreter
    older than this cannot run the file."""
    from ai_edge_litert import schema_py_generated as S

    buf = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    m = S.Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() == b"min_runtime_version":
            data = m.Buffers(md.Buffer()).DataAsNumpy()
            if isinstance(data, int):  # no data
                return None
            return bytes(data).rstrip(b"\0").decode("ascii", "replace")
    return None

