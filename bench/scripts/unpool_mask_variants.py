"""The decoder's unpool mask, exact equality against a tolerant comparison: detection and
cross-precision score stability on a trained model, without retraining (issue 24, item 4).

    python bench/scripts/unpool_mask_variants.py RUN_DIR [--tol 1e-5] [--out results.json]

RUN_DIR needs the model's weights and its attack sets (`dafar quantize RUN_DIR` makes them). For
each mask: clean test FPR at the model's alpha, ROC AUC and detection on each attack set, and
the share of clean test scores that move by more than 1e-3 relative when the same network computes
in float64 instead of float32, a stand-in for one runtime's rounding against another's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import dafar.train.models as models
from dafar.manifest import load_manifest
from dafar.run import RunFolder
from dafar.train.loading import load_dafar

EXACT = models.mask_unpool


def tolerant(tol: float):
    def mask_unpool(h, pre, pooled):
        up = models._upsample2(pooled)
        # every position within tol (relative) of its window's maximum counts as the maximum:
        # a near-tie is then a tie in every runtime, not equal in one and a float step apart in another
        mask = ((up - pre) <= tol * up.abs() + 1e-12).to(h.dtype)
        return models._upsample2(h) * mask
    return mask_unpool


def auc(neg, pos):
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    allv = np.concatenate([neg, pos])
    ranks = allv.argsort().argsort() + 1.0
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


@torch.no_grad()
def scores(net, x01: np.ndarray, dtype=torch.float32, batch: int = 100) -> np.ndarray:
    out = []
    for i in range(0, len(x01), batch):
        x = net.norm(torch.from_numpy(x01[i: i + batch]).to(dtype))
        _, recon = net(x)
        out.append(net.l2_score(x, recon).double().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    m = load_manifest(a.run, verify=False)
    net, _ = load_dafar(a.run, m)
    alpha = float(m["metrics"]["l2_alpha"]) if "l2_alpha" in m.get("metrics", {}) else float(
        json.loads((Path(a.run) / "metrics.json").read_text())["l2_alpha"])
    test = RunFolder(a.run, m).test_set(None, None)
    x01 = test.images.astype(np.float32) / 255.0
    attacks = {f.stem.split("-n")[0]: np.load(f)["x_adv"] for f in sorted((Path(a.run) / "attacks").glob("*.npz"))}
    res = {"run": str(a.run), "alpha": alpha, "test_images": len(x01), "tol": a.tol, "masks": {}}
    for name, fn in (("exact", EXACT), (f"tolerant-{a.tol:g}", tolerant(a.tol))):
        models.mask_unpool = fn
        s32 = scores(net, x01)
        s64 = scores(net.double(), x01, torch.float64)
        net.float()
        rel = np.abs(s32 - s64) / np.maximum(np.abs(s64), 1e-12)
        row = {"fpr": float(np.mean(s32 > alpha)), "fp32_vs_fp64_rel_max": float(rel.max()),
               "fp32_vs_fp64_over_1e-3": float(np.mean(rel > 1e-3)),
               "fp32_vs_fp64_decisions_flipped": int(np.sum((s32 > alpha) != (s64 > alpha))), "attacks": {}}
        for k, xa in attacks.items():
            sa = scores(net, xa)
            row["attacks"][k] = {"auc": auc(s32, sa), "detected": float(np.mean(sa > alpha))}
        res["masks"][name] = row
        print(name, json.dumps(row))
    models.mask_unpool = EXACT
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
