"""The one place that runs a model file: a LiteRT runner and an ONNX Runtime runner with the same
small interface.  The device runtime (:class:`dafar.runtime.Defence`), the export parity checks,
the int8 checks and the benchmarks all run models through these, so what is validated is what
the device runs.

numpy only at import; the backend (``ai_edge_litert``, falling back to ``tflite_runtime``, or
``onnxruntime``) is imported when a runner is built.

* ``run(x)``: every image of ``x`` (already in the model's input layout and dtype), in chunks of
  the file's fixed batch (the last chunk padded with copies of its last image, the padding
  dropped after) or of ``batch_size`` for a dynamic-batch file; outputs by name, as new arrays
  (LiteRT reuses its output buffers between calls, so they are copied).
* ``invoke(x)``: one backend call on one batch, nothing else: what a benchmark times.
* Thread safety: an ONNX Runtime session is shared (its ``run`` is thread-safe); a LiteRT
  interpreter is not, so each thread gets its own, made on first use from the same file.
* A file that cannot be loaded or run raises :class:`~dafar.errors.InferenceError` naming it;
  a missing backend raises :class:`~dafar.errors.MissingExtraError` naming the extra.
"""
from __future__ import annotations

import os
import threading
from enum import Enum
from pathlib import Path

import numpy as np

from dafar.errors import InferenceError, InputValidationError, MissingExtraError
from dafar.limits import check_threads

__all__ = ["Backend", "Provider", "ModelRunner", "OnnxRuntimeRunner", "LiteRTRunner", "LiteRTCompiledRunner",
           "open_model", "litert_interpreter_class", "litert_runtime", "version_tuple", "MIN_ONNXRUNTIME",
           "installed_suffixes"]

# The oldest ONNX Runtime our .onnx files run on: they are ONNX IR version 9 (opset 18), which
# 1.16 reads (measured with 1.17.3: float bit-identical to 1.32, int8 within 2e-6).  An older one
# is refused here with the version named, instead of its "Unsupported model IR version" deep
# inside the first load.
MIN_ONNXRUNTIME = "1.16.0"


class Backend(str, Enum):
    AUTO = "auto"  # from the file's suffix
    LITERT = "litert"  # LiteRT's Interpreter API (ai_edge_litert, or tflite_runtime)
    LITERT_COMPILED = "litert-compiled"  # LiteRT's CompiledModel API (ai_edge_litert >= 2), what Android apps use
    ONNXRUNTIME = "onnxruntime"

    @classmethod
    def for_path(cls, path: str | os.PathLike) -> "Backend":
        return {".tflite": cls.LITERT, ".onnx": cls.ONNXRUNTIME}.get(Path(path).suffix.lower(), cls.AUTO)


class Provider(str, Enum):
    """ONNX Runtime execution provider."""

    AUTO = "auto"  # CUDA when onnxruntime-gpu sees a GPU, else CPU
    CPU = "cpu"
    CUDA = "cuda"


class ModelRunner:
    """What every backend offers (see the module docstring)."""

    backend: Backend
    path: Path
    batch: int | None  # the file's fixed batch, None when dynamic
    input_dtype: np.dtype
    output_names: list[str]

    def invoke(self, x: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, x: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
        n = len(x)
        if n == 0:
            raise InputValidationError("no images to run (an empty batch)")
        b = self.batch or batch_size
        outs: dict[str, list] = {}
        for i in range(0, n, b):
            chunk = x[i: i + b]
            if self.batch and len(chunk) < b:  # fixed-batch file: pad with the last image, drop after
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - len(chunk), axis=0)])
            for k, v in self.invoke(np.ascontiguousarray(chunk)).items():
                outs.setdefault(k, []).append(v)
        return {k: np.concatenate(v)[:n] for k, v in outs.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def _ort_providers(ort, provider: Provider) -> list[str]:
    avail = ort.get_available_providers()
    if provider is Provider.CPU:
        return ["CPUExecutionProvider"]
    if provider is Provider.CUDA:
        if "CUDAExecutionProvider" not in avail:
            raise MissingExtraError(
                "provider='cuda' was asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(has {avail}); install onnxruntime-gpu on a machine with a CUDA GPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


def version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class OnnxRuntimeRunner(ModelRunner):
    backend = Backend.ONNXRUNTIME

    def __init__(self, path: str | os.PathLike, threads: int | None = None, provider: Provider | str = Provider.AUTO,
                 profile_prefix: str | None = None):
        """``profile_prefix``: record ONNX Runtime's per-node profile (a JSON trace that
        :meth:`end_profiling` closes and returns), for the benchmark's per-stage cost table."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("running .onnx models needs onnxruntime: pip install 'dafar[onnx-runtime]'") from None
        have = getattr(ort, "__version__", "0")
        if version_tuple(have) < version_tuple(MIN_ONNXRUNTIME):
            raise MissingExtraError(f"{Path(path).name} needs onnxruntime >= {MIN_ONNXRUNTIME} (ONNX IR version 9); "
                                    f"this one is {have}: pip install 'onnxruntime>={MIN_ONNXRUNTIME}'")
        self.path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=_ort_providers(ort, Provider(provider)))
        except MissingExtraError:
            raise
        except Exception as exc:
            raise InferenceError(f"onnxruntime cannot load {self.path}: {type(exc).__name__}: {exc}") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.input_dtype = np.dtype(np.uint8 if "uint8" in inp.type else np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def end_profiling(self) -> Path:
        """Close the profile started with ``profile_prefix`` and return its JSON trace."""
        return Path(self.session.end_profiling())

    def invoke(self, x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            res = self.session.run(self.output_names, {self.input_name: x})
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed on {self.path.name}: {type(exc).__name__}: {exc}") from exc
        return dict(zip(self.output_names, res))


def installed_suffixes() -> set[str]:
    """The model file suffixes this install can run (a device install has one backend extra)."""
    from importlib.util import find_spec

    def importable(name: str) -> bool:
        try:
            return find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: a module blocked as None in sys.modules
            return False

    have = set()
    if importable("onnxruntime"):
        have.add(".onnx")
    if importable("ai_edge_litert") or importable("tflite_runtime"):
        have.add(".tflite")
    return have


def litert_interpreter_class():
    """LiteRT's ``Interpreter`` (``ai_edge_litert``, else the older ``tflite_runtime``)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore

        return Interpreter
    except ImportError:
        raise MissingExtraError(
            "running .tflite models needs ai-edge-litert (or tflite-runtime): pip install 'dafar[litert]'") from None


def _io_table(details: dict) -> dict:
    """A signature's tensors as {name: {"shape": [...], "dtype": "..."}} (both LiteRT APIs)."""
    return {k: {"shape": [int(v) for v in t["shape"]], "dtype": np.dtype(t["dtype"]).name} for k, t in details.items()}


def litert_runtime() -> tuple[str, str]:
    """(package, version) of the LiteRT interpreter in use: ``ai_edge_litert`` or ``tflite_runtime``
    (whose versions follow TensorFlow's, the scale of a file's ``min_runtime_version``)."""
    cls = litert_interpreter_class()
    pkg = cls.__module__.split(".")[0]
    try:
        from importlib.metadata import version

        return pkg, version(pkg.replace("_", "-"))
    except Exception:  # noqa: BLE001 - a vendored build without metadata
        import importlib

        return pkg, str(getattr(importlib.import_module(pkg), "__version__", "0"))


class LiteRTRunner(ModelRunner):
    """A ``.tflite`` file's ``serving_default`` signature.  ``preserve_all_tensors`` keeps every
    intermediate tensor readable through :attr:`interpreter` (for per-layer error reports)."""

    backend = Backend.LITERT
    SIGNATURE = "serving_default"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, preserve_all_tensors: bool = False):
        self.path = Path(path)
        self.threads = threads or 1
        self.preserve_all_tensors = preserve_all_tensors
        self._cls = litert_interpreter_class()
        self._local = threading.local()
        runner = self._runner()  # fail now (corrupt file, missing ops), not on the first image
        ins = runner.get_input_details()
        if len(ins) != 1:
            raise InferenceError(f"{self.path.name}: signature {self.SIGNATURE} has inputs {list(ins)}, expected one")
        self.input_name, detail = next(iter(ins.items()))
        shape = [int(s) for s in detail["shape"]]
        self.batch = shape[0] if shape and shape[0] > 0 else None
        self.input_dtype = np.dtype(detail["dtype"])
        self.output_names = list(runner.get_output_details())

    def _new(self):
        kw = {"experimental_preserve_all_tensors": True} if self.preserve_all_tensors else {}
        try:
            interp = self._cls(model_path=str(self.path), num_threads=self.threads, **kw)
            if self.SIGNATURE not in interp.get_signature_list():
                raise InferenceError(f"{self.path.name} has no {self.SIGNATURE} signature "
                                     f"(has {list(interp.get_signature_list())})")
            runner = interp.get_signature_runner(self.SIGNATURE)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(f"LiteRT cannot load {self.path}: {type(exc).__name__}: {exc}") from exc
        self._local.interp, self._local.runner = interp, runner
        return runner

    def _runner(self):
        r = getattr(self._local, "runner", None)
        return r if r is not None else self._new()

    @property
    def interpreter(self):
        """This thread's interpreter (tensor details, intermediate tensors)."""
        self._runner()
        return self._local.interp

    def signature(self) -> dict:
        """Names, shapes and dtypes of the signature's inputs and outputs."""
        runner = self._runner()
        return {"inputs": _io_table(runner.get_input_details()), "outputs": _io_table(runner.get_output_details())}

    def invoke(self, x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            res = self._runner()(**{self.input_name: x})
        except Exception as exc:
            raise InferenceError(f"LiteRT failed on {self.path.name}: {type(exc).__name__}: {exc}") from exc
        return {k: np.array(v) for k, v in res.items()}  # copy: the runner's buffers are reused


class LiteRTCompiledRunner(ModelRunner):
    """A ``.tflite`` file through LiteRT's CompiledModel API (``ai_edge_litert.compiled_model``,
    the API Android apps use), CPU accelerator.  Same interface as :class:`LiteRTRunner`; one
    compiled model per thread.  It cannot read int64 tensors, so files whose outputs hold one
    (TFLite files exported before labels became int32) are refused at load, naming the fix."""

    backend = Backend.LITERT_COMPILED
    SIGNATURE = "serving_default"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        try:
            from ai_edge_litert.compiled_model import CompiledModel  # noqa: F401
        except ImportError:
            raise MissingExtraError("LiteRT's CompiledModel API needs ai-edge-litert >= 2 (tflite-runtime has none): "
                                    "pip install 'dafar[litert]'") from None
        self.path = Path(path)
        self.threads = threads or 1
        self._local = threading.local()
        _, _, ind, outd, _, _ = self._state()  # fail now, not on the first image
        if len(ind) != 1:
            raise InferenceError(f"{self.path.name}: signature {self.SIGNATURE} has inputs {list(ind)}, expected one")
        self.input_name, detail = next(iter(ind.items()))
        shape = [int(v) for v in detail["shape"]]
        self.batch = shape[0] if shape and shape[0] > 0 else None
        self.input_dtype = np.dtype(detail["dtype"])
        self.output_names = list(outd)

    def _new(self):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        try:
            m = CompiledModel.from_file(str(self.path), options=Options(HardwareAccelerator.CPU,
                                                                          cpu_options=CpuOptions(num_threads=self.threads)))
            sigs = m.get_signature_list()
            if self.SIGNATURE not in sigs:
                raise InferenceError(f"{self.path.name} has no {self.SIGNATURE} signature (has {list(sigs)})")
            si = m.get_signature_index(self.SIGNATURE)
            ind = m.get_input_tensor_details(self.SIGNATURE)
            outd = m.get_output_tensor_details(self.SIGNATURE)
            wide = sorted(k for k, d in {**ind, **outd}.items() if np.dtype(d["dtype"]) == np.int64)
            if wide:
                raise InferenceError(
                    f"{self.path.name}: tensors {wide} are int64, which LiteRT's CompiledModel API cannot read; "
                    "re-export the run with this dafar (TFLite labels are int32), or use backend='litert'")
            ins, outs = m.create_input_buffers(si), m.create_output_buffers(si)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(f"LiteRT (CompiledModel) cannot load {self.path}: {type(exc).__name__}: {exc}") from exc
        self._local.state = (m, si, ind, outd, ins, outs)
        return self._local.state

    def _state(self):
        st = getattr(self._local, "state", None)
        return st if st is not None else self._new()

    def signature(self) -> dict:
        _, _, ind, outd, _, _ = self._state()
        return {"inputs": _io_table(ind), "outputs": _io_table(outd)}

    def invoke(self, x: np.ndarray) -> dict[str, np.ndarray]:
        m, si, _, outd, ins, outs = self._state()
        try:
            ins[0].write(np.ascontiguousarray(x, dtype=self.input_dtype))
            m.run_by_index(si, ins, outs)
            return {k: np.array(b.read(int(np.prod(d["shape"])), np.dtype(d["dtype"]))).reshape(d["shape"])
                    for (k, d), b in zip(outd.items(), outs)}
        except Exception as exc:
            raise InferenceError(f"LiteRT (CompiledModel) failed on {self.path.name}: {type(exc).__name__}: {exc}") from exc


def open_model(path: str | os.PathLike, backend: Backend | str = Backend.AUTO, *, threads: int | None = None,
               provider: Provider | str = Provider.AUTO, **options) -> ModelRunner:
    """A runner for ``path``: LiteRT for ``.tflite``, ONNX Runtime for ``.onnx`` (or as named)."""
    check_threads(threads, "threads", InputValidationError)
    kind = Backend(backend)
    if kind is Backend.AUTO:
        kind = Backend.for_path(path)
    suffix = Path(path).suffix.lower()
    want = {Backend.LITERT: ".tflite", Backend.LITERT_COMPILED: ".tflite", Backend.ONNXRUNTIME: ".onnx"}.get(kind)
    if want != suffix:
        raise InputValidationError(f"{Path(path).name}: backend {kind.value!r} cannot run a {suffix or 'suffix-less'} file")
    if kind is Backend.ONNXRUNTIME:
        return OnnxRuntimeRunner(path, threads, provider)
    if kind is Backend.LITERT_COMPILED:
        return LiteRTCompiledRunner(path, threads)
    return LiteRTRunner(path, threads, **options)
