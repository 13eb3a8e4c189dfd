"""The int8 score path, measured: can the detector's score leave float and keep its decisions?

    .venv/bin/python bench/scripts/score_path_16x8.py RUN_DIR [--mode detect] [--images 2000] [--out result.json]

RUN_DIR is an exported run (``dafar export RUN --detector l2 --input float-nchw --mode hybrid,detect``).
From the same static-batch float graph (the one ``dafar quantize`` converts) this builds, in a
temporary folder, the fixed-batch TFLite file of each candidate score path:

* ``precise`` int8: what ``dafar quantize`` ships by default (E on the input and D in float with
  int8-stored weights; the residual onwards float);
* ``mixed`` int8: E and D in int8 too, only the residual, the norm and the comparison in float;
* ``naive`` 16x8: LiteRT's 16-bit-activation / 8-bit-weight mode on the whole graph, the score
  included.  (The converter's selective quantization, which keeps ops in float, ignores the 16x8
  op set: a "mixed 16x8" file comes out identical to mixed int8 in size and outputs, so this is the only 16x8
  layout the converter can make.)

For each: alpha recalibrated on validation scores with the run's own rule (as ``dafar quantize``
does), then on test images the agreement of reject decisions with the float file, the FPR, the
score's relative error and correlation; and LiteRT latency at 1 thread, interleaved with the float
defence and the float victim (median of 200 runs).  Printed as JSON (and written to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from dafar.errors import DafarError
from dafar.export.api import source_onnx
from dafar.quantize.tflite_quant import quantize_tflite
from dafar.run import RunFolder
from dafar.runtime.backends import LiteRTRunner
from dafar.schema import Detector, Graph, InputContract, Mode
from dafar.train.loading import load_dafar
from score_path_common import compare, interleaved_times

CANDIDATES = (("precise", "int8"), ("mixed", "int8"), ("naive", "int16"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--mode", default="detect", choices=[m.value for m in Mode])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    run = RunFolder.open(a.run_dir)
    mode, c = Mode(a.mode), InputContract.FLOAT_NCHW
    found = [e for e in run.exports().values() if e.graph is Graph.DAFAR and (e.mode or Mode.HYBRID) is mode
             and e.format.value == "tflite" and e.detector is Detector.L2 and e.contract is c and e.batch == 1
             and e.precision.value == "float32"]
    if not found:
        sys.exit(f"{run.path}: no float l2 float-nchw b1 TFLite file in mode {mode.value}; export it first")
    e = found[0]
    victim = next(v for v in run.exports().values() if v.graph is Graph.VICTIM and v.pair_key == e.pair_key)
    sp = run.splits()
    calib = sp.train.images[np.random.default_rng(0).choice(len(sp.train.images), 256, replace=False)]
    xv, xt = c.from_pixels(sp.val.images[:a.images]), c.from_pixels(sp.test.images[:a.images])
    ref = LiteRTRunner(run.path / e.rel)
    ft = ref.run(xt)  # float reference decisions at the float alpha
    rule = run.manifest["thresholds"]["l2"]["rules"][e.threshold_rule]
    net, _ = load_dafar(run.path, run.manifest)
    results = {"run": str(run.path), "mode": mode.value, "images": int(len(xt)), "candidates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = source_onnx(net, e.graph, e.detector, e.alpha, run.normalization, run.chw, 1, work / "src.onnx", mode)
        files = {}
        for layout, acts in CANDIDATES:
            out = work / f"{layout}-{acts}.tflite"
            quantize_tflite(src, out, contract=c.value, batch=1, input_chw=run.chw, output_names=e.output_names,
                            calib=c.from_pixels(calib), layout=layout, work_dir=work, activations=acts)
            q = LiteRTRunner(out)
            results["candidates"][f"{layout}-{acts}"] = {**compare(ft, q.run(xv), q.run(xt), e.alpha, rule),
                                                         "file_bytes": out.stat().st_size}
            files[f"{layout}-{acts}"] = out
        # latency: every file and the float victim, interleaved, 1 thread, batch 1
        runners = {"float": LiteRTRunner(run.path / e.rel, threads=1),
                   "victim-float": LiteRTRunner(run.path / victim.rel, threads=1),
                   **{k: LiteRTRunner(p, threads=1) for k, p in files.items()}}
        times = interleaved_times(runners, xt[:1], a.runs)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    results["p50_ms"] = med
    for k in results["candidates"]:
        results["candidates"][k]["p50_over_float_defence"] = med[k] / med["float"]
        results["candidates"][k]["p50_over_float_victim"] = med[k] / med["victim-float"]
    text = json.dumps(results, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DafarError as exc:  # a missing or damaged run folder, data, a failed conversion: one line
        sys.exit(f"score_path_16x8: error: {exc}")
