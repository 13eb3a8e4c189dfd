"""The run folder and its manifest.

A run folder (``runs/<name>/``) holds everything one trained defence needs downstream: weights
(safetensors), the training log, metrics, later the exported and quantized models, and
``manifest.json``, which records shapes, layout, normalization, thresholds, versions and the
sha256 of every file.  Each stage reads the previous stage's artifacts through
:func:`load_manifest`, which refuses a folder whose files differ from what the manifest recorded.

The manifest carries a hash of its own canonical content (``manifest_sha256``).  That does not
stop a determined attacker (who can recompute it), but it does catch a hand-edited threshold or a
half-written file: an edited manifest is refused with a message naming it rather than silently
used.  Writes go to a temporary name and are renamed into place, so an interrupted stage never
leaves a half-written manifest behind.

Standard library only: the device-side runtime reads manifests too.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from dafar.errors import HashMismatchError, ManifestError, RunFolderError

__all__ = [
    "attach_command",
    "classifier_alone_message",
    "dataset_label",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "sha256_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "manifest_digest",
    "write_manifest",
    "read_manifest",
    "load_manifest",
    "verify_files",
    "refuse_outside_link",
    "file_entry",
    "get_field",
    "clean_stale_staging",
    "package_versions",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask() sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the process's umask.  Temporary files
    and folders (mkstemp, mkdtemp) are created 0600/0700; what is renamed into a run folder gets
    this mode instead, so a run one user builds can be read by another, or by a service account
    on the device, exactly as the umask allows."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _canonical(obj: dict) -> bytes:
    body = {k: v for k, v in obj.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_sha256`` field."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def file_entry(run_dir: str | os.PathLike, relpath: str, role: str, **extra: Any) -> dict:
    """A ``files`` entry of the manifest for ``run_dir/relpath``: sha256, size and role."""
    p = Path(run_dir) / relpath
    if not p.is_file():
        raise RunFolderError(f"{p} does not exist; cannot record it in the manifest")
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size, "role": role, **extra}


def write_manifest(run_dir: str | os.PathLike, manifest: dict) -> dict:
    """Stamp ``manifest`` with its digest and write it atomically to ``run_dir/manifest.json``."""
    m = dict(manifest)
    m.setdefault("schema_version", SCHEMA_VERSION)
    try:
        m["manifest_sha256"] = manifest_digest(m)
    except ValueError as exc:  # NaN/inf would make the JSON unreadable elsewhere
        raise ManifestError(f"manifest for {run_dir} holds a non-finite number: {exc}") from exc
    atomic_write_json(Path(run_dir) / MANIFEST_NAME, m)
    return m


# Limits on a manifest read from disk (it is input: a run folder may come from anyone).  A dafar
# manifest nests about 10 levels and weighs well under 1 MiB (a traced user classifier's graph
# included); these leave room and bound what a crafted one can cost.
MAX_MANIFEST_DEPTH = 64
# 16 MiB: reading one just under it costs about 5x its size (the string-free copy, the scan's
# chunks, the parsed objects); at the earlier 64 MiB limit that was 1.26 GB, more than a small
# device has
_DEFAULT_MAX_MANIFEST_BYTES = 16 << 20


def _max_manifest_bytes() -> int:
    env = os.environ.get("DAFAR_MAX_MANIFEST_BYTES")
    try:
        return int(env) if env else _DEFAULT_MAX_MANIFEST_BYTES
    except ValueError:
        raise ManifestError(f"DAFAR_MAX_MANIFEST_BYTES must be an integer, got {env!r}") from None


def _text_depth(raw: bytes, chunk: int = 1 << 20) -> int:
    """Deepest bracket nesting of JSON text, outside string literals, without parsing it (regex
    and numpy: linear, no recursion).  Scanned a chunk at a time, carrying the depth across: one
    pass over the whole text at once held 20 bytes of temporaries per byte of manifest."""
    import re

    import numpy as np

    bare = np.frombuffer(re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', raw), dtype=np.uint8)
    depth = deepest = 0
    for i in range(0, len(bare), chunk):
        a = bare[i: i + chunk]
        step = ((a == 91) | (a == 123)).astype(np.int32) - ((a == 93) | (a == 125))  # [ { minus ] }
        run = np.cumsum(step, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(run.max())), int(run[-1])
    return deepest


def refuse_outside_link(path: Path, run_dir: Path) -> None:
    """A symbolic link is followed only where it stays inside the run folder."""
    try:
        inside = path.resolve().is_relative_to(run_dir.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        raise ManifestError(f"{path} is a symbolic link to {os.path.realpath(path)}, outside the run folder; "
                            "refusing to use it")


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """Read and self-check ``run_dir/manifest.json`` (no file hashes checked)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing: {run_dir} is not a complete dafar run folder")
    refuse_outside_link(path, run_dir)  # like every file of the run
    limit = _max_manifest_bytes()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ManifestError(f"{path} is unreadable: {exc}") from exc
    if size > limit:  # refused before it is read: a crafted 200 MB manifest took 1.25 GB to parse
        raise ManifestError(f"{path} is {size / 2**20:.1f} MiB, above the limit of {limit / 2**20:.0f} MiB for a "
                            "manifest; set DAFAR_MAX_MANIFEST_BYTES to raise it")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path} is unreadable: {exc}") from exc
    depth = _text_depth(raw)  # before parsing: json's C parser crashed the process on "[" * 100000
    if depth > MAX_MANIFEST_DEPTH:
        raise ManifestError(f"{path} nests {depth} levels deep, above the limit of {MAX_MANIFEST_DEPTH} for a manifest")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is unreadable or not JSON: {exc}") from exc
    except RecursionError:
        raise ManifestError(f"{path} nests deeper than JSON parsing allows; not a dafar manifest") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {m.get('schema_version')!r}, this dafar reads {SCHEMA_VERSION}")
    stamped = m.get("manifest_sha256")
    try:
        actual = manifest_digest(m)
    except ValueError as exc:
        raise ManifestError(f"{path} holds a non-finite number: {exc}") from exc
    if stamped != actual:
        raise ManifestError(
            f"{path} was edited after dafar wrote it (manifest_sha256 {str(stamped)[:12]}... != "
            f"{actual[:12]}...); refusing to use thresholds or hashes from it"
        )
    _check_structure(m, path)
    return m


# The manifest's sections that are JSON objects wherever dafar writes them, and those whose every
# row is one too.  A digest proves who wrote a file, not that it is well formed: a manifest
# re-stamped by hand with "exports": [] once reached a stage as an AttributeError.
_TABLES = ("architecture", "dataset", "files", "input", "metrics", "provenance", "score", "thresholds", "training",
           "versions", "exports", "attacks", "recalibrated")
_ROWS_ARE_OBJECTS = ("files", "exports", "thresholds")


def _check_structure(m: dict, path: Path) -> None:
    for key in _TABLES:
        if key in m and not isinstance(m[key], dict):
            raise ManifestError(f"{path}: '{key}' should be a JSON object, got {type(m[key]).__name__}")
    for key in _ROWS_ARE_OBJECTS:
        for name, row in m.get(key, {}).items():
            if not isinstance(row, dict):
                raise ManifestError(f"{path}: {key}[{name!r}] should be a JSON object, got {type(row).__name__}")


def verify_files(run_dir: str | os.PathLike, manifest: dict, names: Iterable[str] | None = None) -> None:
    """Check the sha256 of the named files (default: every file) against the manifest."""
    run_dir = Path(run_dir)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{run_dir / MANIFEST_NAME} has no 'files' table")
    for rel in names if names is not None else files:
        entry = files.get(rel)
        if entry is None:
            raise ManifestError(f"{run_dir / MANIFEST_NAME} does not list {rel}")
        p = run_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ManifestError(f"{run_dir / MANIFEST_NAME} lists a path outside the run folder: {rel}")
        refuse_outside_link(p, run_dir)
        if not p.is_file():
            raise RunFolderError(f"{p} is listed in the manifest but missing")
        digest = sha256_file(p)
        if digest != entry.get("sha256"):
            raise HashMismatchError(
                f"{p}: sha256 {digest[:16]}... differs from the manifest's {str(entry.get('sha256'))[:16]}... "
                "(file corrupted, swapped or edited)"
            )


def load_manifest(run_dir: str | os.PathLike, verify: bool | Iterable[str] = True) -> dict:
    """Read the manifest and verify file hashes (all files, a subset by name, or none)."""
    m = read_manifest(run_dir)
    if verify is True:
        verify_files(run_dir, m)
    elif verify:
        verify_files(run_dir, m, list(verify))
    return m


def clean_stale_staging(run_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted stage left behind: ``.staging-*`` folders and ``.*.tmp`` files of
    atomic writes.  Nothing the manifest lists is touched (those are never written in place).

    The caller holds the run folder's lock, so no staging folder is live.  A ``.*.tmp`` file may
    be: bench, eval and report write theirs without the lock (an atomic write lasts milliseconds),
    so only those older than a minute count as left behind."""
    import shutil
    import time

    removed = []
    run_dir = Path(run_dir)
    cutoff = time.time() - 60
    tmps = []
    for p in run_dir.rglob(".*.tmp"):
        try:
            if p.stat().st_mtime < cutoff:
                tmps.append(p)
        except OSError:  # gone meanwhile: its writer renamed it into place
            pass
    for p in list(run_dir.glob(".staging-*")) + tmps:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(run_dir)))
    return removed


def get_field(manifest: dict, dotted: str, run_dir: str | os.PathLike | None = None) -> Any:
    """``manifest['a']['b']`` for ``'a.b'``, with an error naming the missing field."""
    cur: Any = manifest
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            where = f"{Path(run_dir) / MANIFEST_NAME}" if run_dir else "the manifest"
            raise ManifestError(f"{where} lacks the field '{dotted}'")
        cur = cur[part]
    return cur


def classifier_alone_message(manifest: dict, run_dir: str | os.PathLike | None = None) -> str | None:
    """What to do with a ``--classifier-only`` run, which holds no defence yet (None for any other
    run): every stage that needs a decoder or an exported defence says this instead of its own
    "export first"."""
    if (manifest.get("training") or {}).get("mode") != "classifier":
        return None
    where = str(run_dir) if run_dir is not None else "the run folder"
    return (f"{where} holds a classifier alone (trained with --classifier-only), no defence: attach DAFAR to it "
            f"first ({attach_command(manifest, run_dir)})")


def attach_command(manifest: dict, run_dir: str | os.PathLike | None = None) -> str:
    """``dafar attach`` for the classifier of run ``run_dir`` (an image folder's data named as it was read)."""
    ds = manifest.get("dataset") or {}
    data = f" --data-dir {ds.get('source')}" if ds.get("name") == "imagefolder" and ds.get("source") else ""
    return f"dafar attach --victim {run_dir if run_dir is not None else 'RUN'}{data} --out RUN_DIR"


def dataset_label(manifest: dict) -> str:
    """The data set as every report names it. The JPEG re-encoding of CIFAR-10 changes the numbers
    (a lossy copy of every image), so its results always say "CIFAR-10 (JPEG q75)"."""
    ds = manifest.get("dataset", {})
    name, src = ds.get("name", "?"), str(ds.get("source", "")).lower()
    if name == "cifar10":
        return "CIFAR-10 (JPEG q75)" if ("jpg" in src or "jpeg" in src) else "CIFAR-10"
    return "MNIST" if name == "mnist" else str(name)


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (distribution names); absent ones are left out."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
