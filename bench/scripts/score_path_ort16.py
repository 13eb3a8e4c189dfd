"""The int8 score path on ONNX Runtime, measured: 8-bit against 16-bit activations (QDQ A16W8).

    .venv/bin/python bench/scripts/score_path_ort16.py RUN_DIR [--images 2000] [--runs 200] [--out result.json]

RUN_DIR is an exported run (``dafar export RUN --detector l2 --input float-nchw --mode detect``).
From its dynamic-batch float detect graph and its float victim this builds, in a temporary folder,
with the same quantizer ``dafar quantize`` uses (``quantize_onnx``: QDQ, MinMax calibration on 256
training images, per-channel 7-bit weights):

* ``precise-uint8``: what ``dafar quantize`` ships by default (E on the input and D float);
* ``mixed-uint8``: E and D in 8-bit too, the residual, the norm and the comparison float;
* ``mixed-uint16``: the same ops with 16-bit activations (A16W8: issue 21's "ONNX Runtime QDQ with
  16-bit activations" for the score path);
* ``naive-uint16``: 16-bit activations everywhere, the residual and the norm included;
* the victim in 8-bit (what each defence is compared with).

For each: alpha recalibrated on validation scores with the run's own rule (as ``dafar quantize``
does), then on test images the agreement of reject decisions with the float graph, the FPR, the
score's relative error and correlation; and ONNX Runtime latency at 1 thread, batch 1, interleaved
with the float defence and both victims (median of ``--runs``).  Printed as JSON (and written to
``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from dafar.errors import DafarError
from dafar.quantize.onnx_quant import quantize_onnx
from dafar.run import RunFolder
from dafar.runtime.backends import OnnxRuntimeRunner
from dafar.schema import Detector, Graph, InputContract, Mode
from score_path_common import compare, interleaved_times

CANDIDATES = (("precise", "uint8"), ("mixed", "uint8"), ("mixed", "uint16"), ("naive", "uint16"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    run = RunFolder.open(a.run_dir)
    c = InputContract.FLOAT_NCHW

    def one(graph, **kw):
        found = [e for e in run.exports().values() if e.graph is graph and e.format.value == "onnx"
                 and e.contract is c and e.precision.value == "float32"
                 and all(getattr(e, k) is v for k, v in kw.items())]
        if not found:
            sys.exit(f"{run.path}: no float float-nchw ONNX {graph.value} file {kw}; export it first")
        return found[0]

    e = one(Graph.DAFAR, detector=Detector.L2, mode=Mode.DETECT)
    victim = one(Graph.VICTIM)
    sp = run.splits()
    calib = c.from_pixels(sp.train.images[np.random.default_rng(0).choice(len(sp.train.images), 256, replace=False)])
    xv, xt = c.from_pixels(sp.val.images[:a.images]), c.from_pixels(sp.test.images[:a.images])
    ft = OnnxRuntimeRunner(run.path / e.rel).run(xt)
    rule = run.manifest["thresholds"]["l2"]["rules"][e.threshold_rule]
    results = {"run": str(run.path), "images": int(len(xt)), "candidates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = {"victim-uint8": work / "victim-uint8.onnx"}
        quantize_onnx(run.path / victim.rel, files["victim-uint8"], calib, "naive", "uint8", work_dir=work)
        for layout, acts in CANDIDATES:
            out = work / f"{layout}-{acts}.onnx"
            info = quantize_onnx(run.path / e.rel, out, calib, layout, acts, work_dir=work)
            q = OnnxRuntimeRunner(out)
            results["candidates"][f"{layout}-{acts}"] = {**compare(ft, q.run(xv), q.run(xt), e.alpha, rule),
                                                         "file_bytes": out.stat().st_size,
                                                         "float_nodes": info["float_nodes"]}
            files[f"{layout}-{acts}"] = out
        runners = {"float": OnnxRuntimeRunner(run.path / e.rel, threads=1),
                   "victim-float": OnnxRuntimeRunner(run.path / victim.rel, threads=1),
                   **{k: OnnxRuntimeRunner(p, threads=1) for k, p in files.items()}}
        times = interleaved_times(runners, xt[:1], a.runs)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    results["p50_ms"] = med
    results["p90_ms"] = {k: 1e3 * float(np.quantile(v, 0.9)) for k, v in times.items()}
    for k in results["candidates"]:
        results["candidates"][k]["p50_over_float_defence"] = med[k] / med["float"]
        results["candidates"][k]["p50_over_float_victim"] = med[k] / med["victim-float"]
        results["candidates"][k]["p50_over_int8_victim"] = med[k] / med["victim-uint8"]
    text = json.dumps(results, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DafarError as exc:  # a missing or damaged run folder, data, a failed conversion: one line
        sys.exit(f"score_path_ort16: error: {exc}")
