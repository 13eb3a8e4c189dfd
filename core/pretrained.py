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

Standard library only (the device install can materialize a model and run ``dafar info``);
publishing a model (which needs torch) is :func:`dafar.train.publish.publish`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from dafar.errors import ConfigError, RunFolderError
from dafar.manifest import MANIFEST_NAME, load_manifest, umask_mode
from dafar.run import replaceable_run_folder

__all__ = ["PRETRAINED_DIR", "available", "describe", "materialize", "summary_lines", "KEEP_ROLES", "DROP_FIELDS"]

PRETRAINED_DIR = Path(__file__).resolve().parent / "assets" / "pretrained"

# What a published model keeps from its run folder: the training stage only.  Exports, int8
# models and attack sets are rebuilt by the user's own `dafar export/quantize/eval` (they depend
# on the installed converter versions, and would add tens of MB).
KEEP_ROLES = {"weights", "scores", "metrics", "config", "log"}
DROP_FIELDS = {"exports", "attacks", "quantize_config", "export_versions", "manifest_sha256"}


def available() -> list[str]:
    """Names of the pretrained models in this installation (e.g. ``['mnist']``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / MANIFEST_NAME).is_file())


def _source(name: str) -> Path:
    names = available()
    if name not in names:
        have = ", ".join(names) if names else (
            "none in this installation: the published models live in the repository's core/assets/pretrained, "
            "not in the installed package; install dafar from a clone with pip install -e")
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
    if out.exists() or out.is_symlink():
        replaceable_run_folder(out)  # a user's file or folder of other things is never replaced (nor suggested)
        if not overwrite and any(out.iterdir()):
            raise RunFolderError(f"{out} already holds a run folder; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".staging-pretrained-{out.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(src, staging)
        # package files may be read-only; the run folder is the user's, with the modes their umask gives
        for p in [staging, *staging.rglob("*")]:
            p.chmod(umask_mode(directory=p.is_dir()) | (0o700 if p.is_dir() else 0o600))
        load_manifest(staging, verify=True)
        if out.exists():
            shutil.rmtree(out)  # a run folder or an empty one (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


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

