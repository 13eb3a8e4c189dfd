"""Pretrained DAFAR weights shipped inside the package, so a user can export, quantize and
benchmark without training.

A published model is a training-stage run folder with nothing else in it: ``manifest.json``
(shapes, normalization, thresholds, metrics, the training config and timing, file hashes),
the weights (safetensors), ``metrics.json``, ``config.json``, ``train_log.jsonl`` and
``scores.npz``, plus a ``provenance`` record in the manifest (the command, seed, epochs, time,
hardware and the run it came from).  :func:`materialize` copies it into a new run folder and
verifies every file's sha256 against the manifest, so the copy is exactly what was published and
every later stage (``dafar export/quantize/bench/eval``) treats it like a folder ``dafar train``
wrote.

Standard library only (the device install can materialize a model and run ``dafar info``).
"""
from __future__ import annotations

import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from dafar.errors import ConfigError, RunFolderError
from dafar.manifest import MANIFEST_NAME, load_manifest, write_manifest

__all__ = ["PRETRAINED_DIR", "available", "describe", "materialize", "publish"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "pretrained"

# What a published model keeps from its run folder: the training stage only.  Exports, int8
# models and attack sets are rebuilt by the user's own `dafar export/quantize/eval` (they depend
# on the installed converter versions, and would add tens of MB).
_KEEP_ROLES = {"weights", "scores", "metrics", "config", "log"}
_DROP_FIELDS = {"exports", "attacks", "quantize_config", "export_versions", "manifest_sha256"}


def available() -> list[str]:
    """Names of the pretrained models in this installation (e.g. ``['mnist']``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / MANIFEST_NAME).is_file())


def _source(name: str) -> Path:
    names = available()
    if name not in names:
        have = ", ".join(names) if names else "none in this installation"
        raise ConfigError(f"no pretrained model {name!r} (available: {have})")
    return PRETRAINED_DIR / name


def describe(name: str) -> dict:
    """The published manifest (verified: every file's sha256 is checked)."""
    return load_manifest(_source(name), verify=True)


def materialize(name: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy pretrained model ``name`` into the run folder ``out`` and verify it.

    The copy is written to a staging folder beside ``out`` and renamed into place only after its
    hashes check out, so a failed copy never leaves a half-made run folder."""
    src = _source(name)
    load_manifest(src, verify=True)  # a damaged installation is refused before anything is written
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise RunFolderError(f"{out} already exists; pass --overwrite to replace it")
        if out.is_dir() and not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
            raise RunFolderError(f"{out} exists and is not a dafar run folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".staging-pretrained-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(src, staging)
        for p in staging.rglob("*"):  # package files may be read-only; the run folder is the user's
            p.chmod(0o755 if p.is_dir() else 0o644)
        load_manifest(staging, verify=True)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _to_float16(path: Path) -> None:
    """Rewrite a weights file with its floating-point tensors stored as float16 (needs torch)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from dafar.train.weights import save_state

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
    files = {rel: e for rel, e in m["files"].items()
             if e.get("role") in _KEEP_ROLES and rel != "quantize_scores.npz"}  # that one is dafar quantize's
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
    pub = {k: v for k, v in m.items() if k not in _DROP_FIELDS}
    if weights_dtype == "float16":
        from dafar.manifest import file_entry

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
        prov["epochs"]["joint_in_all"] = int(cfg.get("epochs") or 0) + int(parent.get("epochs_total") or 0)
        prov["total_seconds_in_all"] = float(training.get("total_seconds") or 0) + float(parent.get("total_seconds") or 0)
    write_manifest(dest, pub)
    if weights_dtype == "float16":
        from dafar.train.calibrate import recalibrate

        recalibrate(dest, data_dir, reason="weights stored as float16 (upcast to float32 at load); alpha, FPRs and "
                                           "accuracies re-measured on the weights as loaded", download=False)
    load_manifest(dest, verify=True)
    return dest


def summary_lines(name: str) -> list[str]:
    """A few human lines about a pretrained model (for ``dafar pretrained --list``)."""
    m = describe(name)
    met, prov = m.get("metrics", {}), m.get("provenance", {})
    size = sum(e.get("bytes", 0) for e in m["files"].values())
    lines = [f"{name}: {m.get('architecture', {}).get('name')} on {m.get('dataset', {}).get('name')} "
             f"({size / 1e6:.1f} MB)"]
    if "victim_test_acc" in met:
        lines.append(f"  victim {100 * met['victim_test_acc']:.2f}%, purified {100 * met.get('purified_test_acc', float('nan')):.2f}%")
    for det, th in m.get("thresholds", {}).items():
        d = th["rules"][th["default"]]
        lines.append(f"  {det}: alpha {d['alpha']:.4f} ({th['default']}), test FPR {100 * d['test_fpr']:.2f}%")
    if prov:
        ep = ", ".join(f"{k} {v}" for k, v in (prov.get("epochs") or {}).items() if v)
        secs = prov.get("total_seconds_in_all", prov.get("total_seconds")) or 0
        lines.append(f"  trained with `{prov.get('command')}` (seed {prov.get('seed')}; epochs: {ep}; "
                     f"{secs:.0f} s on {prov.get('hardware')})")
    return lines

