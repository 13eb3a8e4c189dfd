"""Recalibrate a run folder's thresholds on its weights as they are now stored.

Used when weights change representation after training, e.g. published as float16 to keep the
repository small: the scores of the float16 weights (upcast to float32 at load) differ slightly
from the float32 ones, so alpha, the false-positive rates and the accuracies are measured again
on the same validation and test splits, with the same rules, and the manifest says so.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import torch

from dafar.data import load_dataset
from dafar.errors import DataError
from dafar.manifest import atomic_write_json
from dafar.run import RunFolder

from .config import TrainConfig
from .loading import load_dafar, load_victim_only
from .trainer import _metrics, _save_scores, _tensors, _thresholds, evaluate_arrays

__all__ = ["recalibrate"]


def recalibrate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, reason: str,
                download: bool = True) -> dict:
    """Re-measure scores, thresholds and metrics of ``run_dir`` and rewrite its manifest.

    The data must be the data the run was trained on (same content fingerprint), or the
    validation split would not be the one the run held out."""
    run = RunFolder.open(run_dir)
    run_dir, m = run.path, run.manifest
    cfg = TrainConfig.from_dict(m["training"]["config"])
    splits = load_dataset(cfg.dataset, data_dir, download=download, val_size=cfg.val_size, seed=cfg.seed)
    want = m["dataset"]["fingerprint_sha256"]
    if splits.fingerprint != want:
        raise DataError(f"the {cfg.dataset.value} data in {splits.source} is not the data {run_dir} was trained on "
                        f"(content sha256 {splits.fingerprint[:12]}... != {want[:12]}...); its validation split "
                        "would not be held out")
    data = _tensors(splits, cfg)
    net, _ = load_dafar(run_dir, m)
    victim = load_victim_only(run_dir, m) if "weights/victim_only.safetensors" in m["files"] else None
    dev = torch.device("cpu")
    with torch.no_grad():
        ev_val = evaluate_arrays(net, data.val_x, dev, cfg.eval_batch_size, purify=False)
        ev_test = evaluate_arrays(net, data.test_x, dev, cfg.eval_batch_size, victim)
    thresholds = _thresholds(cfg, ev_val, ev_test, splits.name.value)
    metrics = _metrics(cfg, ev_val, ev_test, data, thresholds)
    metrics["timing"] = {k: m["training"].get(k) for k in (  # the trainer stores timing flat in "training"
        "device", "threads", "seconds_per_epoch", "eval_seconds", "total_seconds", "seconds_in_earlier_calls", "resumed")}
    _save_scores(run_dir / "scores.npz", ev_val, ev_test, data.test_y)
    atomic_write_json(run_dir / "metrics.json", metrics)
    before = {k: m["metrics"].get(k) for k in ("victim_test_acc", "purified_test_acc", "l2_alpha", "l2_test_fpr",
                                               "autoencoder_alpha", "autoencoder_test_fpr") if k in m["metrics"]}
    return run.register({"scores.npz": {"role": "scores"}, "metrics.json": {"role": "metrics"}}, fields={
        "thresholds": thresholds, "metrics": {k: v for k, v in metrics.items() if k != "timing"},
        "recalibrated": {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "reason": reason,
                         "before": before, "data_source": splits.source}})
