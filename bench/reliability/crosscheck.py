"""Cross-platform check of the runtime: record every model's outputs on one machine, rerun them on
another (an emulated aarch64 Raspberry Pi, a real Pi, a phone's Python), and compare.

    python -m dafar.bench.reliability.crosscheck record RUN_DIR ref.npz [--images 200]
    python -m dafar.bench.reliability.crosscheck compare RUN_DIR ref.npz [--json out.json]

numpy and a runtime backend only (it runs inside the target).  Tolerances: float32 models must
give the same labels and decisions and scores within 1e-4 relative (median) / 1e-3 (max outside
0.5% of images: unpooling near-ties, see ``dafar/export/validate.py``); int8 models the same
labels and decisions, with scores within 1e-3 relative (an int8 op off by one quantum moves the
float score it feeds by far less than that).  Emulated timings are never recorded: correctness only.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

__all__ = ["record", "compare", "main"]


def _inputs(n: int, chw) -> np.ndarray:
    """Deterministic inputs without a data set: the vendored MNIST test digits when they fit, else
    smooth random images (uint8 NHWC)."""
    c, h, w = chw
    if (c, h, w) == (1, 28, 28):
        try:
            from dafar.data import load_mnist

            s = load_mnist(val_size=2)
            return np.ascontiguousarray(s.test.images[:n].transpose(0, 2, 3, 1))
        except Exception:
            pass
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (n, h // 4, w // 4, c)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.uint8)


def record(run_dir, out, n: int = 200) -> dict:
    from dafar.manifest import read_manifest
    from dafar.runtime import Defence

    m = read_manifest(run_dir)
    x = _inputs(n, tuple(m["input"]["shape"]))
    arrays = {"inputs": x}
    for rel in m.get("exports", {}):
        p = Defence(run_dir, rel, threads=1).predict(x)
        for k in ("labels", "scores", "rejected", "logits"):
            arrays[f"{rel}|{k}"] = getattr(p, k)
    arrays["machine"] = np.array(json.dumps({"machine": platform.machine(), "platform": platform.platform()}))
    np.savez_compressed(out, **arrays)
    return {"models": len(m.get("exports", {})), "images": n}


def compare(run_dir, ref_path) -> dict:
    from dafar.manifest import read_manifest
    from dafar.runtime import Defence

    m = read_manifest(run_dir)
    with np.load(ref_path, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    x = ref["inputs"]
    results = {"machine": platform.machine(), "platform": platform.platform(),
               "reference_machine": json.loads(str(ref["machine"])), "models": {}}
    ok_all = True
    for rel, e in m.get("exports", {}).items():
        if f"{rel}|labels" not in ref:
            continue
        p = Defence(run_dir, rel, threads=1).predict(x)
        int8 = e.get("precision") == "int8"
        r = {"precision": e.get("precision", "float32"), "format": e["format"],
             "label_agreement": float(np.mean(p.labels == ref[f"{rel}|labels"])),
             "decision_agreement": float(np.mean(p.rejected == ref[f"{rel}|rejected"])),
             "logits_max_abs_diff": float(np.abs(p.logits - ref[f"{rel}|logits"]).max())}
        s, sr = p.scores.astype(np.float64), ref[f"{rel}|scores"].astype(np.float64)
        if np.isfinite(sr).any():
            fin = np.isfinite(s) & np.isfinite(sr)
            rel_err = np.abs(s[fin] - sr[fin]) / np.maximum(np.abs(sr[fin]), 1e-9)
            r["score_rel_err_median"] = float(np.median(rel_err))
            r["score_rel_err_max"] = float(rel_err.max())
            r["score_outliers"] = int(np.sum(rel_err > 1e-3))
            score_ok = r["score_rel_err_median"] <= (1e-3 if int8 else 1e-4) and r["score_outliers"] <= max(1, 0.005 * len(x))
        else:
            score_ok = True
        min_agree = 0.995
        r["ok"] = bool(r["label_agreement"] >= min_agree and r["decision_agreement"] >= min_agree and score_ok)
        ok_all &= r["ok"]
        results["models"][rel] = r
    results["ok"] = bool(ok_all and results["models"])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dafar.bench.reliability.crosscheck")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("record")
    a.add_argument("run")
    a.add_argument("out")
    a.add_argument("--images", type=int, default=200)
    b = sub.add_parser("compare")
    b.add_argument("run")
    b.add_argument("ref")
    b.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        print(json.dumps(record(args.run, args.out, args.images)))
        return 0
    res = compare(args.run, args.ref)
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    for rel, r in res["models"].items():
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {rel}: labels {100 * r['label_agreement']:.2f}%, decisions "
              f"{100 * r['decision_agreement']:.2f}%, score rel err median {r.get('score_rel_err_median', 0):.1e}",
              file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
