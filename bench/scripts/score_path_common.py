"""What the score-path scripts (score_path_16x8.py, score_path_ort16.py) share: the float-vs-
quantized comparison of one candidate and the interleaved latency loop."""
from __future__ import annotations

import time

import numpy as np

from dafar.threshold import calibrate, rejects


def compare(ft: dict, qv: dict, qt: dict, alpha: float, rule: dict) -> dict:
    """One quantized candidate against the float file: alpha recalibrated on its own validation
    scores ``qv`` with the run's rule (as ``dafar quantize`` does), then on the test outputs
    ``qt`` the agreement of reject decisions and labels with ``ft``, the FPR and the score's error."""
    params = {"z": rule["z"]} if rule["rule"] == "mean+zstd" else {"target_fpr": rule["target_fpr"]}
    alpha_q = calibrate(qv["score"], rule["rule"], **params).alpha
    sf, sq = ft["score"].astype(np.float64), qt["score"].astype(np.float64)
    rf, rq = rejects(sf, alpha), rejects(sq, alpha_q)
    rel = np.abs(sq - sf) / np.maximum(sf, 1e-9)
    return {"decision_agreement": float(np.mean(rf == rq)), "fpr_float": float(rf.mean()),
            "fpr_quantized": float(rq.mean()), "score_rel_err_median": float(np.median(rel)),
            "score_rel_err_p99": float(np.quantile(rel, 0.99)), "score_correlation": float(np.corrcoef(sf, sq)[0, 1]),
            "label_agreement": float(np.mean(ft["label"] == qt["label"]))}


def interleaved_times(runners: dict, x1: np.ndarray, runs: int, warmup: int = 20) -> dict[str, list[float]]:
    """Seconds per call of each runner on ``x1``, interleaved: a slow spell of the machine hits
    every file alike."""
    times = {k: [] for k in runners}
    for r in runners.values():
        for _ in range(warmup):
            r.invoke(x1)
    for _ in range(runs):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r.invoke(x1)
            times[k].append(time.perf_counter() - t0)
    return times
