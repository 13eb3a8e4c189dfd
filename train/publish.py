"""Publish a trained run folder as a pretrained model shipped inside the package
(maintainers: the result goes into ``core/assets/pretrained/<name>/`` and is committed).

Needs torch (float16 storage, recalibration); :mod:`dafar.pretrained` lists and materializes
published models with the standard library only.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dafar.errors import ConfigError, RunFolderError
from dafar.manifest import classifier_alone_message, file_entry, load_manifest
from dafar.pretrained import DROP_FIELDS, KEEP_ROLES, PRETRAINED_DIR
from dafar.run import RunFolder

from .weights import save_state

__all__ = ["publish"]


def _to_float16(path: Path) -> None:
    """Rewrite a weights file with its floating-point tensors stored as float16 (needs torch)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dafar", "{}"))
    state = load_file(str(path))
    save_state(path, {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()},
               {**meta, "stored_dtype": "float16"})


def publish(run_dir: str | os.PathLike, name: str, command: str, hardware: str | None = None,
            dest: str | os.PathLike | None = None, weights_dtype: str = "float32",
            data_dir: str | os.PathLike | None = None) -> Path:
    """Write run folder ``run_dir``'s training stage as pretrained model ``name`` (maintainers:
    the result goes into ``core/assets/pretrained/<name>/`` and is committed).

    ``command`` is the command that trained the run, recorded with the seed, epochs, seconds and
    ``hardware`` (default: this machine's platform and CPU count).  ``weights_dtype="float16"``
    halves the files (for models that would not fit a repository comfortably); the weights are
    upcast to float32 at load, and alpha, the false-positive rates and the accuracies are then
    recalibrated on the weights as loaded, with the run's own data (``data_dir``) and rules."""
    if weights_dtype not in ("float32", "float16"):
        raise ConfigError(f"weights_dtype must be float32 or float16, got {weights_dtype!r}")
    run_dir = Path(run_dir)
    m = load_manifest(run_dir, verify=True)
    if alone := classifier_alone_message(m, run_dir):
        raise RunFolderError(alone)
    files = {rel: e for rel, e in m["files"].items()
             if e.get("role") in KEEP_ROLES and rel != "quantize_scores.npz"}  # that one is dafar quantize's
    missing = {"weights/E.safetensors", "weights/F.safetensors", "weights/D.safetensors", "metrics.json"} - set(files)
    if missing:
        raise RunFolderError(f"{run_dir} lacks {sorted(missing)}; is it a finished training run?")
    dest = Path(dest) if dest is not None else PRETRAINED_DIR / name
    if dest.exists():
        shutil.rmtree(dest)
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / rel, dest / rel)
    training = m.get("training", {})
    cfg = training.get("config", {})
    pub = {k: v for k, v in m.items() if k not in DROP_FIELDS}
    if weights_dtype == "float16":
        for rel, e in list(files.items()):
            if e.get("role") == "weights":
                _to_float16(dest / rel)
                files[rel] = file_entry(dest, rel, "weights", **({"module": e["module"]} if "module" in e else {}),
                                        stored_dtype="float16")
    pub["files"] = files
    pub["provenance"] = {
        "pretrained_name": name,
        "published_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_utc": m.get("created_utc"),
        "command": command,
        "seed": cfg.get("seed"),
        "epochs": {"joint": cfg.get("epochs"), "detector": cfg.get("detector_epochs") if cfg.get("detector") else 0,
                   "victim_only": cfg.get("epochs") if cfg.get("train_victim") else 0},
        "total_seconds": training.get("total_seconds"),
        "device": training.get("device"),
        "threads": training.get("threads"),
        "hardware": hardware or f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, no GPU",
        "versions": m.get("versions"),
        "weights_dtype": weights_dtype,
    }
    parent = training.get("init_from")
    if parent:  # a run continued from another (``--init-from``): the model's whole training
        prov = pub["provenance"]
        prov["continued_from"] = {k: parent.get(k) for k in
                                  ("manifest_sha256", "epochs_total", "total_seconds", "config", "victim_test_acc")}
        if parent.get("mode") == "classifier":  # E and F trained alone first, then jointly with D
            prov["continued_from"]["mode"] = "classifier"
            prov["epochs"]["classifier"] = int(parent.get("epochs_total") or 0)
        else:
            prov["epochs"]["joint_in_all"] = int(cfg.get("epochs") or 0) + int(parent.get("epochs_total") or 0)
        prov["total_seconds_in_all"] = float(training.get("total_seconds") or 0) + float(parent.get("total_seconds") or 0)
    attached = training.get("attached_to") or {}
    if attached.get("mode") == "classifier" and attached.get("total_seconds") is not None:
        # plug-in on a classifier trained by dafar (--classifier-only): the model's whole training is both
        prov = pub["provenance"]
        prov["classifier"] = {k: attached.get(k) for k in ("manifest_sha256", "epochs", "total_seconds", "config",
                                                           "victim_test_acc")}
        prov["epochs"]["classifier"] = attached.get("epochs")
        prov["total_seconds_in_all"] = float(training.get("total_seconds") or 0) + float(attached["total_seconds"])
    RunFolder.create(dest, pub)
    if weights_dtype == "float16":
        from .calibrate import recalibrate

        recalibrate(dest, data_dir, reason="weights stored as float16 (upcast to float32 at load); alpha, FPRs and "
                                           "accuracies re-measured on the weights as loaded", download=False)
    load_manifest(dest, verify=True)
    from dafar.run import LOCK_NAME

    (dest / LOCK_NAME).unlink(missing_ok=True)  # the stages' advisory lock file: not part of the model
    return dest
