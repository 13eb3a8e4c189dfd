"""Rebuild trained models from a run folder (manifest-checked, safetensors only)."""
from __future__ import annotations

import os
from pathlib import Path

from dafar.errors import ConfigError, ManifestError, RunFolderError
from dafar.manifest import classifier_alone_message, get_field, load_manifest

from .models import ArchSpec, DafarNet, Unpool, Victim, build_dafar, build_victim, spec_from_record
from .weights import load_into

__all__ = ["load_dafar", "load_victim_only"]


def _spec(manifest: dict, run_dir) -> ArchSpec:
    try:
        return spec_from_record(manifest)
    except (ConfigError, KeyError, TypeError) as exc:
        raise ManifestError(f"{Path(run_dir) / 'manifest.json'}: cannot rebuild the architecture ({exc})") from None


def load_dafar(run_dir: str | os.PathLike, manifest: dict | None = None) -> tuple[DafarNet, dict]:
    """E, F, D (and C when trained) from ``run_dir``, in eval mode, after checking every weight
    file's sha256 against the manifest."""
    run_dir = Path(run_dir)
    weights = ["weights/E.safetensors", "weights/F.safetensors", "weights/D.safetensors"]
    m = manifest if manifest is not None else load_manifest(run_dir, verify=False)
    if alone := classifier_alone_message(m, run_dir):
        raise RunFolderError(alone)
    has_c = bool(get_field(m, "architecture.detector", run_dir))
    if has_c:
        weights.append("weights/C.safetensors")
    from dafar.manifest import verify_files

    verify_files(run_dir, m, weights)
    spec = _spec(m, run_dir)
    try:
        unpool = Unpool(get_field(m, "architecture.unpool", run_dir))
    except ValueError as exc:
        raise ManifestError(f"{run_dir / 'manifest.json'}: {exc}") from None
    net = build_dafar(spec, unpool, with_detector=has_c, normalization=get_field(m, "input.normalization", run_dir))
    for name in ("E", "F", "D", "C") if has_c else ("E", "F", "D"):
        load_into(getattr(net, name), run_dir / f"weights/{name}.safetensors")
    return net.eval(), m


def load_victim_only(run_dir: str | os.PathLike, manifest: dict | None = None) -> Victim:
    """The separately trained victim-only model, if the run has one."""
    run_dir = Path(run_dir)
    m = manifest if manifest is not None else load_manifest(run_dir, verify=False)
    rel = "weights/victim_only.safetensors"
    if rel not in m.get("files", {}):
        raise ManifestError(f"{run_dir} has no victim-only model (train with --victim)")
    from dafar.manifest import verify_files

    verify_files(run_dir, m, [rel])
    v = build_victim(_spec(m, run_dir))
    load_into(v, run_dir / rel)
    return v.eval()
