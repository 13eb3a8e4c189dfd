"""The on-device runtime: one exported DAFAR graph from a run folder, numpy in, numpy out.

What ships to a phone or a Raspberry Pi: this module, ``dafar.manifest`` and ``dafar.errors``
(standard library only), numpy, and one backend: ``ai_edge_litert`` (or the older
``tflite_runtime``) for ``.tflite`` files, ``onnxruntime`` for ``.onnx`` files.  The backend is
imported inside the constructor, so importing this module costs nothing and never pulls torch or
tensorflow (a test checks it in a fresh interpreter).

Safety properties (each has a test):

* the model file's sha256 is checked against the manifest before the backend sees the file, and
  the manifest's own digest is checked (an edited alpha is refused);
* inputs are validated: rank, shape, dtype, value range and non-finite values, each with an
  :class:`~dafar.errors.InputValidationError` that says what was wrong; with ``on_invalid="reject"``
  the bad images of a batch are rejected (score NaN) and the good ones still classified;
* fail closed: an image whose score is not finite is rejected, whatever the graph said;
* thread safe: ONNX Runtime sessions are shared (``run`` is thread-safe); LiteRT interpreters are
  not, so each thread gets its own (created on first use, same file, same settings).
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from dafar.errors import InferenceError, InputValidationError, ManifestError, MissingExtraError
from dafar.limits import check_threads
from dafar.manifest import MANIFEST_NAME, classifier_alone_message, read_manifest, refuse_outside_link, verify_files
from dafar.schema import Detector, ExportEntry, Graph, InputContract, Mode, Precision

from .backends import Backend, Provider, litert_runtime, open_model, version_tuple

__all__ = ["OnInvalid", "Prediction", "Defence", "list_models", "default_model"]


class OnInvalid(str, Enum):
    RAISE = "raise"  # any bad image fails the whole call with InputValidationError
    REJECT = "reject"  # bad images come back rejected (score NaN, label -1); the rest are classified


@dataclass(frozen=True)
class Prediction:
    """Results for a batch of N images (arrays of length N).

    ``labels`` come from the purified path F(E(D(E(x)))) for hybrid defence graphs (the paper's),
    from F(E(x)) for ``--mode detect`` graphs and the victim-only graph; ``rejected`` is True for inputs flagged as adversarial, for inputs
    whose score is not finite, and (with ``on_invalid="reject"``) for invalid images.
    """

    labels: np.ndarray  # int64 (N,), -1 where the image was invalid
    scores: np.ndarray  # float32 (N,), NaN where no score exists
    rejected: np.ndarray  # bool (N,)
    logits: np.ndarray  # float32 (N, classes): the victim's F(E(x))
    purified_logits: np.ndarray | None = None  # float32 (N, classes); None for detect and victim graphs
    invalid: np.ndarray | None = None  # bool (N,), only with on_invalid="reject"
    reasons: tuple[str, ...] = ()  # one message per invalid image, in order
    seconds: float = 0.0  # wall time of the backend calls

    @property
    def accepted(self) -> np.ndarray:
        return ~self.rejected

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_records(self, alpha: float | None = None) -> list[dict]:
        out = []
        for i in range(len(self)):
            rec = {"label": int(self.labels[i]), "score": None if not np.isfinite(self.scores[i]) else float(self.scores[i]),
                   "rejected": bool(self.rejected[i]),
                   "verdict": "rejected" if self.rejected[i] else "accepted"}
            if alpha is not None:
                rec["alpha"] = alpha
            if self.invalid is not None and self.invalid[i]:
                rec["invalid"] = True
            out.append(rec)
        return out


def list_models(manifest: dict) -> list[str]:
    """Model files of a run folder, relative paths, in the manifest's order."""
    return [rel for rel in manifest.get("exports", {})]


def default_model(manifest: dict, prefer: str = "tflite") -> str:
    """The model a device runs when none is named: the defence graph with the L2 detector,
    int8 before float, ``prefer``-format first, hybrid before detect mode, batch 1, raw-pixel
    input first."""
    exports = manifest.get("exports", {})
    cands = [(rel, e) for rel, e in exports.items() if isinstance(e, dict) and e.get("graph") == Graph.DAFAR.value]
    if not cands:
        raise ManifestError(classifier_alone_message(manifest)
                            or "the run folder has no exported defence graph; run `dafar export` first")

    def rank(item):
        rel, e = item
        return (e.get("format") != prefer, e.get("precision", Precision.FLOAT32.value) != Precision.INT8.value,
                e.get("detector") != Detector.L2.value, (e.get("mode") or Mode.HYBRID.value) != Mode.HYBRID.value,
                e.get("batch") not in (1, "dynamic"),
                e.get("contract") != InputContract.UINT8_NHWC.value, rel)

    return sorted(cands, key=rank)[0][0]


def _plain_array(a, what: str) -> np.ndarray:
    """Every array-like goes through here, once, before any check: a plain, native-byte-order
    ndarray, or a refusal naming why.  ndarray subclasses behave differently (np.matrix keeps 2-D
    under indexing; a masked array hides values from min/max, so an out-of-range pixel behind a
    mask was accepted and fed to the model), so they are viewed as plain arrays; masked arrays
    are refused (which value is meant?).  Objects that expose the array protocol (a PIL image, a
    CPU torch tensor) are converted the same way."""
    if isinstance(a, np.ma.MaskedArray):
        raise InputValidationError(f"{what}: a masked array; fill the masked values first (a.filled(0))")
    if isinstance(a, np.ndarray):
        x = a.view(np.ndarray) if type(a) is not np.ndarray and not isinstance(a, np.memmap) else a
    elif (hasattr(a, "__array__") or hasattr(a, "__array_interface__") or isinstance(a, (list, tuple, memoryview))) \
            and not isinstance(a, (str, bytes)):
        # nested lists of numbers (rows of pixels), buffers and array-protocol objects: numpy's own
        # conversion, then every check a plain array gets (a list of ints becomes int64 and is
        # refused by the dtype rule below, exactly as an int64 array is)
        try:
            x = np.asarray(a)
        except Exception as exc:  # noqa: BLE001 - whatever the object's conversion raises (ragged lists, ...)
            raise InputValidationError(f"{what}: {type(a).__name__} could not be read as an array ({exc})") from None
        if x.dtype == object:
            raise InputValidationError(f"{what}: {type(a).__name__} holds things that are not numbers")
    else:
        raise InputValidationError(f"{what} must be a numpy array (or a list of arrays), got {type(a).__name__}")
    if x.dtype.byteorder == ">" or (x.dtype.byteorder == "<" and not np.little_endian):
        x = x.astype(x.dtype.newbyteorder("="))
    return x


class Defence:
    """One exported DAFAR graph, ready to classify images.

    >>> d = Defence("runs/mnist")                     # default model of the run folder
    >>> p = d.predict(pixels)                         # uint8 HxWxC / NxHxWxC, or float in [0, 1]
    >>> p.labels[p.accepted]

    ``model`` names a file of the run folder's manifest (``export/...``); ``threads`` sets the
    backend's intra-op threads (default 1, the phone-friendly setting); ``provider`` picks the
    ONNX Runtime execution provider.  The model runs through :mod:`dafar.runtime.backends`.
    """

    def __init__(self, run_dir: str | os.PathLike, model: str | os.PathLike | None = None, *,
                 backend: Backend | str = Backend.AUTO, threads: int | None = 1,
                 provider: Provider | str = Provider.AUTO, on_invalid: OnInvalid | str = OnInvalid.RAISE,
                 verify: bool = True, max_images: int = 100_000):
        t0 = time.perf_counter()
        self.run_dir = Path(run_dir)
        try:
            backend = Backend(backend)
            self.provider = Provider(provider)
            self.on_invalid = OnInvalid(on_invalid)
        except ValueError as exc:
            raise InputValidationError(str(exc)) from None
        check_threads(threads, "threads", InputValidationError)
        self.threads = threads
        if not isinstance(max_images, int) or max_images < 1:
            raise InputValidationError(f"max_images must be a positive integer, got {max_images!r}")
        self.max_images = max_images  # one call's limit: a huge array is refused, not ground through for hours
        self.manifest = read_manifest(self.run_dir)  # refuses an edited manifest
        rel = self._resolve_model(model)
        self.model_rel = rel
        self.spec = ExportEntry.parse(rel, self.manifest["exports"][rel], str(self.run_dir / MANIFEST_NAME))
        self.entry: dict = self.spec.raw
        if verify:
            verify_files(self.run_dir, self.manifest, [rel])  # before the backend reads a byte of it
        else:  # unverified still means inside the run folder: a link out of it is not followed
            refuse_outside_link(self.run_dir / rel, self.run_dir)
        self.model_path = self.run_dir / rel
        self._read_spec()
        if Backend.for_path(self.model_path) is Backend.ONNXRUNTIME and backend in (Backend.AUTO, Backend.ONNXRUNTIME):
            self._warn_int8_saturation()
        self._check_min_runtime(backend)
        self.runner = open_model(self.model_path, backend, threads=threads, provider=self.provider)
        self.backend_kind = self.runner.backend
        if self.runner.input_dtype != self.input_dtype:
            raise ManifestError(f"{rel}: the file takes {self.runner.input_dtype} input, the manifest says {self.input_dtype}")
        self.init_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ set-up
    def _check_min_runtime(self, backend: Backend) -> None:
        """Refuse, before loading, a tflite_runtime older than the file's recorded minimum (an old
        interpreter loads a file it cannot run and fails only on the first image)."""
        need = (self.entry.get("min_runtime") or {}).get("tflite")
        if not need or Backend.for_path(self.model_path) is not Backend.LITERT or backend is Backend.ONNXRUNTIME:
            return
        pkg, have = litert_runtime()
        if pkg == "tflite_runtime" and version_tuple(have) < version_tuple(need):
            raise MissingExtraError(f"{self.model_rel} needs a TFLite runtime >= {need}; this tflite_runtime is {have}: "
                                    f"pip install 'tflite-runtime>={need}' or 'dafar[litert]'")

    def _resolve_model(self, model) -> str:
        exports = self.manifest.get("exports", {})
        if model is None:
            return default_model(self.manifest)
        rel = str(model)
        p = Path(rel)
        if p.is_absolute() or (not rel.startswith("export") and p.exists()):
            try:
                rel = p.resolve().relative_to(self.run_dir.resolve()).as_posix()
            except ValueError:
                raise ManifestError(f"{model} is not inside the run folder {self.run_dir}") from None
        if rel not in exports and f"export/{rel}" in exports:
            rel = f"export/{rel}"
        if rel not in exports:
            raise ManifestError(f"{self.run_dir / MANIFEST_NAME} lists no exported model {model!r}; "
                                f"it has: {', '.join(exports) or 'none (run dafar export)'}")
        return rel

    def _read_spec(self) -> None:
        s = self.spec
        self.contract = s.contract.value
        self.batch = s.batch  # None: dynamic
        self.chw = s.chw
        self.input_dtype = s.contract.dtype
        self.graph = s.graph.value
        self.output_names = [o["name"] for o in self.entry.get("outputs", [])]
        self.alpha = s.alpha
        self.detector = s.detector.value if s.detector else None
        # hybrid: the label is the purified one; detect: the victim's own (no purified_logits)
        self.mode = s.mode.value if s.mode else None
        self.precision = s.precision.value
        self.num_classes = s.num_classes
        classes = self.manifest.get("dataset", {}).get("classes")
        self.classes = list(classes) if classes else [str(i) for i in range(self.num_classes)]

    def _warn_int8_saturation(self) -> None:
        if self.precision == "int8" and (self.entry.get("quantization") or {}).get("weight_bits", 8) == 8:
            from .cpu import int8_saturation_risk

            if int8_saturation_risk():
                warnings.warn(f"{self.model_rel} has full-range int8 weights, and this x86 CPU has no VNNI: ONNX "
                              "Runtime's int8 kernels saturate here and the model loses accuracy (the quantize "
                              "report's numbers do not hold on this CPU). Re-quantize with `dafar quantize "
                              "--onnx-weights int7` (the default), or run the .tflite file.", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ input handling
    def _as_batch(self, images) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Validate ``images`` and bring them to the model's contract.

        Returns (batch in the model's dtype/layout, per-image invalid mask, reasons)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise InputValidationError("no images given (an empty list)")
            arrs = [_plain_array(a, f"image {i}") for i, a in enumerate(images)]
            shapes = {a.shape for a in arrs}
            dtypes = {a.dtype for a in arrs}
            if len(shapes) != 1:
                raise InputValidationError(f"images in a list must share one shape, got {sorted(map(str, shapes))}")
            if len(dtypes) != 1:
                raise InputValidationError(f"images in a list must share one dtype, got {sorted(map(str, dtypes))}")
            x = np.stack(arrs)
        else:
            x = _plain_array(images, "images")
        dt = x.dtype
        if dt == np.uint8:
            kind = "uint8"
        elif dt in (np.float16, np.float32, np.float64):
            kind = "float"
        else:
            raise InputValidationError(
                f"images must be uint8 pixels (0..255) or floats in [0, 1]; got dtype {dt}"
                + (" (convert bools or integers explicitly)" if dt.kind in "biu" else ""))
        c, h, w = self.chw
        x = self._to_nchw(x, c, h, w)
        n = x.shape[0]
        if n == 0:
            raise InputValidationError("the batch holds no images (size 0)")
        if n > self.max_images:  # checked on views, before any conversion allocates memory
            raise InputValidationError(f"{n} images in one call exceed max_images={self.max_images}; split the batch")
        invalid = np.zeros(n, dtype=bool)
        reasons: list[str] = []
        if kind == "float":
            xf = x.astype(np.float32, copy=False)
            flat = xf.reshape(n, -1)
            with np.errstate(invalid="ignore"):
                nonfinite = ~np.isfinite(flat).all(axis=1)
                below = (flat < 0).any(axis=1) & ~nonfinite
                above = (flat > 1).any(axis=1) & ~nonfinite
            for i in np.flatnonzero(nonfinite | below | above):
                if nonfinite[i]:
                    reasons.append(f"image {i}: holds NaN or infinite values")
                else:
                    lo, hi = float(np.nanmin(flat[i])), float(np.nanmax(flat[i]))
                    reasons.append(f"image {i}: float values must lie in [0, 1] (pixels / 255), found [{lo:.4g}, {hi:.4g}]")
            invalid = nonfinite | below | above
            if invalid.any() and self.on_invalid is OnInvalid.RAISE:
                more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
                raise InputValidationError("; ".join(reasons[:3]) + more)
            if self.input_dtype == np.uint8:
                # a uint8 graph fed floats: round to the nearest pixel level (lossless for x = u8 / 255)
                safe = np.where(invalid[:, None, None, None], 0.0, xf)
                model_in = np.rint(safe * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
            else:
                model_in = np.where(invalid[:, None, None, None], np.float32(0.0), xf)
        else:
            if self.input_dtype == np.uint8:
                model_in = x.transpose(0, 2, 3, 1)
            else:
                model_in = x.astype(np.float32) * np.float32(1.0 / 255.0)
        return np.ascontiguousarray(model_in, dtype=self.input_dtype), invalid, reasons

    @staticmethod
    def _to_nchw(x: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
        """Accept HW (grayscale), HWC, CHW, NHW (grayscale), NHWC or NCHW; return NCHW."""
        want = f"(H, W{', C' if c > 1 else ''}) or (N, H, W, C) or (N, C, H, W) with H={h}, W={w}, C={c}"
        if x.ndim == 2 and c == 1 and x.shape == (h, w):
            return x[None, None]
        if x.ndim == 3:
            if x.shape == (h, w, c):
                return x.transpose(2, 0, 1)[None]
            if x.shape == (c, h, w):
                return x[None]
            if c == 1 and x.shape[1:] == (h, w):
                return x[:, None]
        if x.ndim == 4:
            if x.shape[1:] == (h, w, c):
                return x.transpose(0, 3, 1, 2)
            if x.shape[1:] == (c, h, w):
                return x
        raise InputValidationError(f"images of shape {tuple(x.shape)} do not fit this model: expected {want}")

    # ------------------------------------------------------------------ inference
    def prepare(self, images) -> np.ndarray:
        """Validate ``images`` and return them as this model's input array (raises
        :class:`InputValidationError` on any bad image, whatever ``on_invalid`` says)."""
        x, invalid, reasons = self._as_batch(images)
        if invalid.any():
            raise InputValidationError("; ".join(reasons[:3]))
        return x

    def run_prepared(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's raw outputs by name for an input already in the model's layout and dtype
        (from :meth:`prepare`): no validation, no fail-closed post-processing.  A fixed-batch file
        gets batches of its size (padded); for benchmarking, pass exactly one batch."""
        return self.runner.run(x)

    def predict(self, images, *, batch_size: int = 256) -> Prediction:
        """Classify ``images``: one image or a batch, uint8 pixels or floats in [0, 1]."""
        x, invalid, reasons = self._as_batch(images)
        n = x.shape[0]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputValidationError(f"batch_size must be a positive integer, got {batch_size!r}")
        if self.batch:
            batch_size = max(self.batch, batch_size - batch_size % self.batch)
        t0 = time.perf_counter()
        parts = [self.runner.run(x[i: i + batch_size], batch_size) for i in range(0, n, batch_size)]
        seconds = time.perf_counter() - t0
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for need in ("label", "logits"):
            if need not in out:
                raise InferenceError(f"{self.model_rel} has no output named {need!r} (outputs: {sorted(out)})")
        labels = out["label"].astype(np.int64)
        logits = out["logits"].astype(np.float32, copy=False)
        purified = out.get("purified_logits")
        if "score" in out:
            scores = out["score"].astype(np.float32).reshape(n)
            rejected = out["rejected"].astype(bool).reshape(n)
            # fail closed, whatever the graph decided: no finite score, no acceptance
            rejected = rejected | ~np.isfinite(scores)
        else:  # the undefended victim graph: nothing is ever rejected
            scores = np.full(n, np.nan, dtype=np.float32)
            rejected = np.zeros(n, dtype=bool)
        if invalid.any():
            scores = np.where(invalid, np.float32(np.nan), scores)
            rejected = rejected | invalid
            labels = np.where(invalid, -1, labels)
        return Prediction(labels, scores, rejected, logits,
                          None if purified is None else purified.astype(np.float32, copy=False),
                          invalid if self.on_invalid is OnInvalid.REJECT else None, tuple(reasons), seconds)

    __call__ = predict

    def describe(self) -> dict[str, Any]:
        return {"run": str(self.run_dir), "model": self.model_rel, "backend": self.backend_kind.value,
                "format": self.entry.get("format"), "precision": self.precision, "graph": self.graph,
                "detector": self.detector, "mode": self.mode, "contract": self.contract, "batch": self.batch or "dynamic",
                "alpha": self.alpha, "threshold_rule": self.entry.get("threshold_rule"), "threads": self.threads,
                "providers": getattr(self.runner, "providers", None)}

    def __repr__(self) -> str:
        return f"Defence({self.run_dir}, {self.model_rel!r}, backend={self.backend_kind.value})"
