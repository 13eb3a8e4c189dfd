"""GPU readiness without a GPU: what can be said about a run's files on a phone's GPU from a CPU.

Two checks, both part of ``dafar bench`` (skipped with ``--no-gpu-readiness`` or ``--device-only``):

* **The GPU delegate's static analyzer** (``tf.lite.experimental.Analyzer`` with
  ``gpu_compatibility=True``, shipped with TensorFlow) on every ``.tflite`` file: "compatible", or
  the ops it names as unsupported.  A static check of op types and shapes only: it does not run
  the delegate, and says itself that runtime incompatibilities can remain.
* **fp16 fidelity**: GPU delegates compute in 16-bit floats by default (LiteRT's GPU delegate
  unless precision loss is disallowed; Android GPUs generally), while every number dafar reports is
  float32.  Each float graph exported (per detector and mode, and the victim) is run by torch in
  float32 and in float16 (weights and activations stored as fp16; torch's CPU kernels may
  accumulate in fp32, as most mobile GPU kernels also do) on the same test images: label and
  reject-decision agreement, the score's relative drift, and how many clean images the drift moves
  across alpha.  int8 files are not simulated: a GPU delegate dequantizes them and computes in
  fp16, so their fidelity is bounded by both this and the int8 report.
* **fp16-weights TFLite files** (``--fp16-tflite``): each float graph converted again, batch 1,
  with the TFLite converter's float16 weight option (the file usually handed to a GPU delegate; half
  the size), and run by LiteRT on the CPU against the float32 file.  A CPU interpreter dequantizes
  the weights to fp32, so this isolates the rounding of the weights; the torch rows above add fp16
  arithmetic.  The files are kept in ``RUN/bench/fp16/`` for trying on a phone's GPU delegate.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

__all__ = ["delegate_verdicts", "fp16_fidelity", "fp16_tflite_fidelity", "parse_analyzer"]

_COMPATIBLE = "looks compatible with GPU delegate"


def parse_analyzer(text: str) -> dict:
    """The verdict in the analyzer's printed report.  It prints one "GPU COMPATIBILITY WARNING: ..."
    line per op it cannot delegate (and a summary line naming the nodes); a report with none of
    those and its closing "looks compatible" sentence is compatible; anything else is not
    confirmed, which is reported as not compatible."""
    problems = sorted({ln.strip() for ln in text.splitlines() if re.search(r"COMPATIBILITY WARNING|FAILURE", ln)})
    ok = _COMPATIBLE in text and not problems
    if not ok and not problems:
        problems = ["the analyzer did not report the model compatible"]
    return {"compatible": ok, "problems": problems[:20]}


def _analyze(path: Path) -> dict:
    import tensorflow as tf

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tf.lite.experimental.Analyzer.analyze(model_path=str(path), gpu_compatibility=True)
    return {**parse_analyzer(buf.getvalue()), "tool": f"tf.lite.experimental.Analyzer (TensorFlow {tf.__version__})"}


def delegate_verdicts(run_dir, rels) -> dict[str, dict]:
    """The GPU delegate analyzer's verdict for each ``.tflite`` file in ``rels`` (paths inside the
    run folder): ``{"compatible": bool, "problems": [...], "tool": ...}``, or ``{"skipped": why}``."""
    run_dir = Path(run_dir)
    out: dict[str, dict] = {}
    tfl = [r for r in rels if r.endswith(".tflite")]
    if not tfl:
        return out
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return {r: {"skipped": "TensorFlow is not installed (pip install 'dafar[export]')"} for r in tfl}
    for rel in tfl:
        try:
            out[rel] = _analyze(run_dir / rel)
        except Exception as exc:  # a side check: report it, never abort the benchmark
            out[rel] = {"skipped": f"analyzer failed: {type(exc).__name__}: {exc}"}
    return out


def _outputs(module, x: np.ndarray, names, dtype, batch: int = 250) -> dict[str, np.ndarray]:
    import torch

    outs: dict[str, list] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i: i + batch])).to(dtype)
            for n, r in zip(names, module(xb)):
                outs[n].append(r.float().numpy() if r.is_floating_point() else r.numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


def _fp32_vs_fp16(full: dict, half: dict, labels: np.ndarray, alpha: float | None) -> dict:
    """One graph's outputs in fp32 against fp16 (torch half, or fp16 weights on LiteRT): labels
    and logits, and for a defence graph (``alpha`` given) decisions, FPR and the score's drift."""
    lf, lh = full["label"].astype(np.int64), half["label"].astype(np.int64)
    row = {"label_agreement": float(np.mean(lf == lh)), "fp32_label_acc": float(np.mean(lf == labels)),
           "fp16_label_acc": float(np.mean(lh == labels)),
           "max_logit_diff": float(np.max(np.abs(full["logits"] - half["logits"])))}
    if alpha is None:
        return row
    s32, s16 = full["score"].astype(np.float64), half["score"].astype(np.float64)
    rel = np.abs(s16 - s32) / np.maximum(np.abs(s32), 1e-12)
    p99 = float(np.percentile(rel, 99))
    return {**row, "alpha": alpha, "decision_agreement": float(np.mean(full["rejected"] == half["rejected"])),
            "decisions_flipped": int(np.sum(full["rejected"] != half["rejected"])),
            "fpr_fp32": float(np.mean(full["rejected"])), "fpr_fp16": float(np.mean(half["rejected"])),
            "score_rel_diff_median": float(np.median(rel)), "score_rel_diff_p99": p99,
            "score_rel_diff_max": float(rel.max()), "scores_within_1e-3": float(np.mean(rel <= 1e-3)),
            # clean images whose fp32 score lies within the 99th-percentile drift of alpha: the
            # ones an fp16 GPU could decide either way
            "near_alpha": int(np.sum(np.abs(s32 - alpha) <= p99 * alpha))}


def fp16_fidelity(run_dir, manifest: dict, images_u8: np.ndarray, labels: np.ndarray) -> list[dict]:
    """float16 against float32 for every float graph the run exported (torch, CPU): one row per
    (graph, detector, mode) with label/decision agreement and the score's relative drift."""
    import copy

    import torch

    from dafar.export.api import graph_module
    from dafar.schema import Graph, InputContract, output_names
    from dafar.train.loading import load_dafar

    net, m = load_dafar(run_dir, manifest)
    norm = m["input"]["normalization"]
    x = images_u8.astype(np.float32) / 255.0  # NCHW in [0, 1]: the float-nchw contract
    graphs: dict[tuple, float | None] = {}
    for e in m.get("exports", {}).values():
        if e.get("precision", "float32") != "float32":
            continue
        key = (e["graph"], e.get("detector"), (e.get("mode") or "hybrid") if e["graph"] == "dafar" else None)
        graphs.setdefault(key, e.get("alpha"))
    rows = []
    for (graph, det, mode), alpha in sorted(graphs.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        names = output_names(graph, mode or "hybrid")
        mod = graph_module(net, graph, det, InputContract.FLOAT_NCHW, alpha, norm, mode or "hybrid")
        full = _outputs(mod, x, names, torch.float32)
        half = _outputs(copy.deepcopy(mod).half(), x, names, torch.float16)
        row = {"graph": graph, "detector": det, "mode": mode, "images": int(len(x)),
               **_fp32_vs_fp16(full, half, labels, alpha if Graph(graph) is Graph.DAFAR else None)}
        rows.append(row)
    return rows


def fp16_tflite_fidelity(run_dir, manifest: dict, images_u8: np.ndarray, labels: np.ndarray, log=print) -> list[dict]:
    """Every float32 batch-1 float-nchw TFLite graph of the run against its float16-weights twin
    (converted here into ``RUN/bench/fp16/``), both on LiteRT's CPU interpreter, on the same
    images: label and decision agreement, score drift, file sizes."""
    import tempfile

    from dafar.export.api import source_onnx
    from dafar.export.tflite_export import check_builtin_only, convert_to_tflite
    from dafar.runtime.backends import LiteRTRunner
    from dafar.schema import Graph, InputContract, output_names
    from dafar.train.loading import load_dafar

    run_dir = Path(run_dir)
    net, m = load_dafar(run_dir, manifest)
    norm = m["input"]["normalization"]
    chw = tuple(int(v) for v in images_u8.shape[1:])
    x = InputContract.FLOAT_NCHW.from_pixels(images_u8)
    out_dir = run_dir / "bench" / "fp16"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for rel, e in sorted(m.get("exports", {}).items()):
        if (e.get("format") != "tflite" or e.get("precision", "float32") != "float32" or e.get("batch") != 1
                or e.get("contract") != InputContract.FLOAT_NCHW.value):
            continue
        graph = Graph(e["graph"])
        mode = (e.get("mode") or "hybrid") if graph is Graph.DAFAR else "hybrid"
        names = output_names(graph, mode)
        dst = out_dir / Path(rel).name.replace("-b1.tflite", "-fp16w-b1.tflite")
        with tempfile.TemporaryDirectory(prefix="dafar-fp16-") as tmp:
            src = source_onnx(net, graph, e.get("detector"), e.get("alpha"), norm, chw, 1, Path(tmp) / "src.onnx", mode)
            convert_to_tflite(src, dst, contract=InputContract.FLOAT_NCHW.value, batch=1, input_chw=chw,
                              output_names=names, worker="dafar.bench.perf._fp16_worker")
        ops = check_builtin_only(dst)
        full = LiteRTRunner(run_dir / rel, threads=1).run(x)
        half = LiteRTRunner(dst, threads=1).run(x)
        row = {"model": rel, "fp16_file": str(dst.relative_to(run_dir)), "images": int(len(x)),
               "bytes_fp32": (run_dir / rel).stat().st_size, "bytes_fp16": dst.stat().st_size,
               "dequantize_ops": int(ops.get("DEQUANTIZE", 0)),
               **_fp32_vs_fp16(full, half, labels, e.get("alpha") if graph is Graph.DAFAR else None)}
        log(f"fp16-weights {rel}: labels agree {100 * row['label_agreement']:.2f}%"
            + (f", decisions {100 * row['decision_agreement']:.2f}%, score drift max {row['score_rel_diff_max']:.1e}"
               if "decision_agreement" in row else ""))
        rows.append(row)
    return rows
