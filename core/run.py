"""The run folder as one object: open and verify it, read its vocabulary, load its data, stage
new files and register them in the manifest.

Every stage goes through :class:`RunFolder`, so there is one way to

* open a run (the manifest's own digest checked, and the files a stage builds on hashed),
* load the data set the run was trained on, with the same validation split (``splits``),
* build new files out of sight (``staging``: a ``.staging-<stage>-*`` folder inside the run,
  removed whatever happens) and move them in only when every one passed its checks (``place``),
* and record them (``register``): the manifest is re-read, the new files hashed, the stage's
  tables merged, and the result written atomically with its digest.

Standard library and numpy only (the device can open runs too); the data loaders need Pillow
only for image folders.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dafar.errors import DafarError, DataError, ManifestError, RunFolderError
from dafar.manifest import (
    MANIFEST_NAME,
    clean_stale_staging,
    file_entry,
    get_field,
    load_manifest,
    read_manifest,
    verify_files,
    write_manifest,
)
from dafar.schema import ExportEntry

__all__ = ["RunFolder", "replaceable_run_folder", "run_lock"]

LOCK_NAME = ".dafar.lock"
_held: dict[str, list] = {}  # run folder -> [open lock file, depth, owning thread]: re-entrant in that thread
_held_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold the run folder's advisory lock (``.dafar.lock``, flock) while a stage writes into it.

    Two stages on one run folder otherwise race: one's clean-up of stale staging folders deleted
    the other's live one.  A second process is refused at once with a message naming the holder;
    the lock is released when the stage ends or its process dies (the kernel drops it), so a
    crash never leaves the folder locked.  Re-entrant within the thread that holds it; another
    thread of the same process is refused like another process (flock is per process, so two
    threads would otherwise share it and clean up each other's staging).  A no-op where flock
    does not exist (Windows)."""
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        if held is not None and held[2] != me:
            raise RunFolderError(f"{path} is in use by dafar {held[3]} in another thread of this process; wait for it "
                                 "to finish, then rerun")
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            held[1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    f = open(Path(path) / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunFolderError(f"{path} is in use by {holder}; wait for it to finish, then rerun") from None
        f.seek(0)
        f.truncate()
        f.write(f"dafar {stage} (pid {os.getpid()})")
        f.flush()
        with _held_guard:
            _held[key] = [f, 1, me, stage]
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()


# What dafar's stages write at the top of a run folder (besides the manifest's own files)
_RUN_ENTRIES = frozenset({
    MANIFEST_NAME, LOCK_NAME, "config.json", "checkpoints", "weights", "metrics.json", "scores.npz", "train_log.jsonl",
    "report.md", "plots", "export", "attacks", "quantize_report.md", "quantize_report.json", "quantize_scores.npz",
    "bench", "bench_report.md", "eval", "eval_report.md", "reliability", "reliability_report.md", "compat",
    "robust.json", "robust.md", "pareto.json", "pareto.md", "pareto.png"})


def _foreign_entries(out: Path) -> list[str]:
    """Top-level entries of the run folder ``out`` that no dafar stage wrote (a user's notes, say)."""
    listed: set[str] = set()
    try:  # read_manifest bounds size and depth; an edited or broken manifest: judge by the names alone
        files = read_manifest(out).get("files", {})
        listed = {Path(rel).parts[0] for rel in files if isinstance(rel, str) and Path(rel).parts}
    except (DafarError, OSError, AttributeError):
        pass
    return sorted(p.name for p in out.iterdir()
                  if p.name not in _RUN_ENTRIES and p.name not in listed
                  and not p.name.startswith(".staging-") and not p.name.endswith(".tmp"))


def replaceable_run_folder(out: str | os.PathLike) -> bool:
    """May ``--overwrite`` delete ``out``?  Only a run folder (finished, or an interrupted run's
    checkpoints and config) or an empty folder; anything else (a user's file, a folder of other
    things, a link) raises :class:`RunFolderError` naming it, so no user data is ever replaced.
    Returns False when ``out`` does not exist."""
    out = Path(out)
    if out.is_symlink():
        raise RunFolderError(f"{out} is a symbolic link; --overwrite only replaces run folders, never a link's target")
    if not out.exists():
        return False
    if not out.is_dir():
        raise RunFolderError(f"{out} exists and is a file, not a run folder; --overwrite only replaces run folders "
                             "(choose another --out)")
    if not any(out.iterdir()):
        return True
    if (out / MANIFEST_NAME).is_file() or (out / "checkpoints").is_dir() or (out / "config.json").is_file():
        foreign = _foreign_entries(out)
        if foreign:  # a user's file kept inside a run folder would go with it
            raise RunFolderError(
                f"{out} is a run folder but also holds {', '.join(foreign[:5])}"
                f"{f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''}, which dafar did not write; "
                "--overwrite would delete it: move it out of the folder first")
        if (out / LOCK_NAME).is_file():  # a stage writing there now would die of the deletion
            with run_lock(out, "overwrite"):
                pass
        return True
    raise RunFolderError(f"{out} is not empty and is not a dafar run folder; --overwrite only replaces run folders")


class RunFolder:
    """A dafar run folder and its manifest (see :mod:`dafar.manifest`)."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._splits: dict = {}

    # ------------------------------------------------------------------ opening and creating
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | Iterable[str] = True) -> "RunFolder":
        """Read the manifest (an edited one is refused) and check the sha256 of every file it
        lists (``verify=True``), of the named ones, or of none (``False``)."""
        return cls(path, load_manifest(path, verify=verify))

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict, files: dict[str, dict] | None = None) -> "RunFolder":
        """Write the first manifest of a new run folder: ``manifest`` plus a ``files`` table built
        by hashing ``files`` (``{relpath: {"role": ..., **extra}}``).  Written last by the stage
        that made the folder: a folder without a manifest is an unfinished run."""
        path = Path(path)
        m = dict(manifest)
        table = dict(m.get("files", {}))
        for rel, info in (files or {}).items():
            info = dict(info)
            table[rel] = file_entry(path, rel, info.pop("role"), **info)
        m["files"] = table
        return cls(path, write_manifest(path, m))

    def reload(self, verify: bool | Iterable[str] = False) -> dict:
        self.manifest = load_manifest(self.path, verify=verify)
        return self.manifest

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Check the sha256 of the named files (default: all) against the manifest."""
        verify_files(self.path, self.manifest, None if names is None else list(names))

    # ------------------------------------------------------------------ what the run is
    def field(self, dotted: str) -> Any:
        return get_field(self.manifest, dotted, self.path)

    @property
    def chw(self) -> tuple[int, int, int]:
        shape = self.field("input.shape")
        if not isinstance(shape, list) or len(shape) != 3:
            raise ManifestError(f"{self.path / MANIFEST_NAME}: input.shape should be [C, H, W], got {shape!r}")
        return tuple(int(v) for v in shape)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.field("architecture.num_classes"))

    @property
    def normalization(self) -> dict:
        return self.field("input.normalization")

    @property
    def dataset(self) -> str:
        return str(self.field("dataset.name"))

    @property
    def has_autoencoder(self) -> bool:
        return bool(self.manifest.get("architecture", {}).get("detector"))

    def exports(self) -> dict[str, ExportEntry]:
        """Every exported model, typed, in the manifest's order."""
        where = str(self.path / MANIFEST_NAME)
        return {rel: ExportEntry.parse(rel, e, where) for rel, e in self.manifest.get("exports", {}).items()}

    def export(self, rel: str) -> ExportEntry:
        e = self.manifest.get("exports", {}).get(rel)
        if e is None:
            raise ManifestError(f"{self.path / MANIFEST_NAME} lists no exported model {rel!r}")
        return ExportEntry.parse(rel, e, str(self.path / MANIFEST_NAME))

    # ------------------------------------------------------------------ data
    def _data_dir(self, data_dir):
        if data_dir is not None:
            return data_dir
        ds = self.manifest.get("dataset", {})
        src = str(ds.get("source", ""))
        # MNIST reads the vendored copy unless told otherwise; other data sets re-read their source
        if ds.get("name") != "mnist" and src and not src.startswith("vendored"):
            return src
        return None

    def splits(self, data_dir=None, *, download: bool = True):
        """The run's data set with the validation split it was trained with (never test)."""
        from dafar.data import load_dataset

        key = (str(data_dir), download)
        if key not in self._splits:
            ds = self.manifest.get("dataset", {})
            vs = ds.get("val_split") or {}
            pre = ds.get("preprocess")
            if pre is None:
                self._splits[key] = load_dataset(self.dataset, self._data_dir(data_dir), download=download,
                                                 val_size=int(vs.get("size", 5000)), seed=int(vs.get("seed", 0)))
            else:  # an image folder, read again exactly as it was for training (same cache)
                self._splits[key] = load_dataset(
                    self.dataset, self._data_dir(data_dir), download=download, val_size=pre.get("val_size_requested"),
                    seed=int(vs.get("seed", 0)), image_size=pre["image_size"] if pre.get("resize") else None,
                    channels=int(pre["channels"]), skip_bad_images=bool(pre.get("skip_bad_images")))
                self._check_fingerprint(self._splits[key])
        return self._splits[key]

    def _check_fingerprint(self, splits) -> None:
        want = self.manifest.get("dataset", {}).get("fingerprint_sha256")
        if want and splits.fingerprint != want:
            raise DataError(f"the images in {splits.source} are not the ones {self.path} was trained on (content sha256 "
                            f"{splits.fingerprint[:12]}... != {want[:12]}...); its validation split would not be held "
                            "out: pass --data-dir with the original images")

    def test_set(self, data_dir=None, limit: int | None = None, seed: int = 0):
        """``limit`` test images (all for None), a fixed class-mixed sample: image folders are read
        class by class, so the first N would be a few classes only."""
        return self.splits(data_dir).test.sample(limit, seed)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def staging(self, stage: str, log: Callable[..., None] = print) -> Iterator[Path]:
        """A fresh ``.staging-<stage>-*`` folder inside the run (same file system, so files move in
        atomically), removed afterwards whatever happens.  What an interrupted stage left behind
        is removed first."""
        if not self.path.is_dir():
            raise RunFolderError(f"run folder {self.path} does not exist")
        with run_lock(self.path, stage):  # no other stage is writing here: stale staging is really stale
            for left in clean_stale_staging(self.path):
                log(f"removed {left} (left by an interrupted run)")
            tmp = Path(tempfile.mkdtemp(prefix=f".staging-{stage}-", dir=self.path))
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def place(self, src: str | os.PathLike, rel: str) -> Path:
        """Move a staged file to ``rel`` inside the run folder (an atomic rename)."""
        dst = self.path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return dst

    def register(self, files: dict[str, dict] | None = None, *, tables: dict[str, dict] | None = None,
                 fields: dict[str, Any] | None = None) -> dict:
        """Record new files and results in the manifest and write it atomically.

        ``files``: ``{relpath: {"role": ..., **extra}}``, hashed from disk now; ``tables``: rows
        merged into the manifest's tables (``{"exports": {rel: entry}}``); ``fields``: top-level
        values replaced.  The manifest is re-read first (its digest checked), so what another
        stage recorded meanwhile is kept."""
        with run_lock(self.path, "register"):
            return self._register(files, tables, fields)

    def _register(self, files, tables, fields) -> dict:
        m = read_manifest(self.path)
        table = dict(m.get("files", {}))
        for rel, info in (files or {}).items():
            info = dict(info)
            table[rel] = file_entry(self.path, rel, info.pop("role"), **info)
        m["files"] = table
        for name, rows in (tables or {}).items():
            m[name] = {**m.get(name, {}), **rows}
        m.update(fields or {})
        self.manifest = write_manifest(self.path, m)
        return self.manifest

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"
