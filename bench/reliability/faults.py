"""The fault classes a new user found in one afternoon, each tried on purpose (``dafar reliability``
section 6): resource bounds, the file system (read-only, full, a user's own file), two processes
on one run folder, the manifest as input, array-likes through the Python API, and the device
install (the runtime without torch or TensorFlow).

Every case states what must happen (an exit code and words in the message, or a result) and what
must not be lost; a case passes only when both hold.  The CLI cases run ``python -m dafar`` in a
subprocess, so a traceback, a crash (negative exit code) or a hang (timeout) is seen as the user
would see it.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from dafar.errors import DafarError, InputValidationError

__all__ = ["FAULT_CLASSES", "fault_checks"]

FAULT_CLASSES = ("resource bounds", "file system", "concurrency", "manifest parsing", "array-likes", "device install")

# modules a device install (pip install 'dafar[litert]') does not have
_HEAVY = ("torch", "tensorflow", "onnx2tf", "onnx", "onnxscript", "art", "sklearn", "tf_keras", "safetensors")

_BLOCKER = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Block())
from dafar.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args: list[str], *, env=None, timeout=300, preexec=None, blocked=(), wrap=None) -> dict:
    """``python -m dafar ARGS`` (with ``blocked`` modules made unimportable), as a user runs it."""
    if blocked:
        cmd = [sys.executable, "-c", _BLOCKER.format(blocked=set(blocked)), *args]
    else:
        cmd = [sys.executable, "-m", "dafar", *args]
    if wrap:
        cmd = wrap(cmd)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                             preexec_fn=preexec)
        rc, err, so = out.returncode, out.stderr, out.stdout
    except subprocess.TimeoutExpired:
        rc, err, so = None, f"timed out after {timeout} s (hang)", ""
    return {"exit": rc, "stderr": err.strip(), "stdout": so.strip(), "seconds": time.perf_counter() - t0}


def _verdict(r: dict, want_exit: int, words=()) -> tuple[bool, str]:
    """A clean refusal: the expected exit code, a message holding ``words``, and no traceback."""
    err = r["stderr"]
    if r["exit"] is None:
        return False, err
    if r["exit"] != want_exit:
        return False, f"exit {r['exit']}, expected {want_exit}: {err[-200:]}"
    if "Traceback (most recent call last)" in err:
        return False, "a traceback reached the user"
    missing = [w for w in words if w.lower() not in (err + r["stdout"]).lower()]
    if missing:
        return False, f"message lacks {missing}: {err[-200:]}"
    return True, (err.splitlines()[-1] if err else r["stdout"].splitlines()[-1] if r["stdout"] else "")[:200]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost nothing (a decompression
    bomb's header: Pillow sees the size before decoding anything)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _npy_header_only(path: Path, shape, dtype="<f4") -> None:
    """An .npy whose header declares ``shape`` and which holds no data."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, tuple(shape))
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))


def _tree_digest(path: Path) -> str:
    """What a user's file or folder holds (names and bytes), to prove it was not touched."""
    import hashlib

    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _can_mount_readonly() -> bool:
    """Whether a private read-only bind mount is possible (root with CAP_SYS_ADMIN): then a
    read-only folder can be made even for root, whom permission bits do not stop."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {d} {d} && ! touch {d}/x 2>/dev/null"],
                           capture_output=True)
        return r.returncode == 0


def _readonly_wrap(folder: Path):
    """How to run a command that sees ``folder`` read-only: permission bits for a normal user, a
    private read-only bind mount for root; None where neither works."""
    if os.geteuid() != 0:
        return "chmod", None
    if _can_mount_readonly():
        return "mount", lambda cmd: ["unshare", "-m", "sh", "-c",
                                     f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"', "sh", *cmd]
    return None, None


def _copy_run(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("bench", "eval", "checkpoints", "plots", "reliability"))
    return dst


def fault_checks(run_dir, model: str, tmp, *, with_concurrency: bool = True, log=print) -> list[dict]:
    """Every fault class above against ``run_dir`` (an exported run; ``model`` one of its defence
    graphs).  One row per case: class, case, expected, ok, detail.  Nothing in ``run_dir`` changes:
    every case that writes works on a copy under ``tmp``."""
    from PIL import Image

    from dafar.manifest import load_manifest, read_manifest
    from dafar.runtime import Defence

    run_dir, tmp = Path(run_dir), Path(tmp)
    rows: list[dict] = []
    d = Defence(run_dir, model)
    c, h, w = d.chw
    good_png = tmp / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w) if c == 1 else (h, w, 3), dtype=np.uint8)).save(good_png)

    def add(cls, case, expected, ok, detail, skipped=False):
        # a case that could not be set up here is not failed, and not counted as passed either
        rows.append({"class": cls, "case": case, "expected": expected, "ok": bool(ok), "detail": str(detail)[:300],
                     **({"skipped": True} if skipped else {})})
        log(f"  [{cls}] {case}: {'skipped' if skipped else 'ok' if ok else 'FAILED'}")

    def cli(cls, case, args, want_exit, words=(), **kw):
        r = _run(args, **kw)
        ok, detail = _verdict(r, want_exit, words)
        add(cls, case, f"exit {want_exit}" + (f", names {', '.join(words)}" if words else ""), ok, detail)
        return r

    # ------------------------------------------------------------ resource bounds
    cls = "resource bounds"
    bomb = tmp / "bomb.png"
    _png_header_only(bomb, 14000, 14000)
    cli(cls, "a 14000x14000 PNG (decompression bomb)", ["predict", str(run_dir), str(bomb), "--model", model], 2,
        ("DAFAR_MAX_IMAGE_PIXELS",))
    cli(cls, "an image above a lowered pixel limit", ["predict", str(run_dir), str(good_png), "--model", model], 2,
        ("DAFAR_MAX_IMAGE_PIXELS",), env={"DAFAR_MAX_IMAGE_PIXELS": str(max(1, h * w // 4))})
    huge = tmp / "huge.npy"
    _npy_header_only(huge, (2**32, h, w, c))
    cli(cls, ".npy header declaring terabytes", ["predict", str(run_dir), str(huge), "--model", model], 2,
        ("DAFAR_MAX_ARRAY_BYTES",))
    forged = tmp / "forged.npy"
    _npy_header_only(forged, (8, h, w, c), "|u1")
    cli(cls, ".npy header declaring more data than the file holds", ["predict", str(run_dir), str(forged), "--model",
                                                                      model], 2, ("truncated",))
    by_format = {}  # one defence graph per format (ONNX Runtime hung here, LiteRT segfaulted)
    for r, e in sorted(read_manifest(run_dir)["exports"].items(), key=lambda kv: kv[0] != model):
        if e["graph"] == "dafar":
            by_format.setdefault(Path(r).suffix, r)
    for fmt_model in by_format.values():
        cli(cls, f"--threads 100000 ({Path(fmt_model).suffix[1:]})",
            ["predict", str(run_dir), str(good_png), "--model", fmt_model, "--threads", "100000"], 2, ("DAFAR_MAX_THREADS",),
            timeout=120)
    cli(cls, "bench --threads 100000", ["bench", str(run_dir), "--threads", "1,100000", "--quiet"], 2,
        ("DAFAR_MAX_THREADS",), timeout=120)
    try:
        Defence(run_dir, model, threads=100_000)
        add(cls, "Python API: Defence(threads=100000)", "ConfigError", False, "accepted")
    except DafarError as exc:
        add(cls, "Python API: Defence(threads=100000)", "ConfigError", "DAFAR_MAX_THREADS" in str(exc), exc)

    # ------------------------------------------------------------ the file system
    cls = "file system"
    user_file = tmp / "notes.txt"
    user_file.write_text("a user's own file\n")
    before = _tree_digest(user_file)
    cli(cls, "--overwrite given a user's regular file", ["pretrained", "mnist", "--out", str(user_file), "--overwrite"], 4,
        ("only replaces run folders",))
    add(cls, "... the file is untouched", "same bytes", user_file.is_file() and _tree_digest(user_file) == before, user_file)
    user_dir = tmp / "photos"
    (user_dir / "2026").mkdir(parents=True)
    (user_dir / "2026" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    before = _tree_digest(user_dir)
    cli(cls, "--overwrite given a folder of other things", ["pretrained", "mnist", "--out", str(user_dir), "--overwrite"], 4,
        ("only replaces run folders",))
    add(cls, "... the folder is untouched", "same files", _tree_digest(user_dir) == before, user_dir)
    noted = _copy_run(run_dir, tmp / "noted-run")
    (noted / "notes.txt").write_text("a user's notes kept beside the run\n")
    before = _tree_digest(noted)
    cli(cls, "--overwrite of a run folder that also holds a user's file", ["pretrained", "mnist", "--out", str(noted),
                                                                           "--overwrite"], 4, ("notes.txt",))
    add(cls, "... the run folder and the file are untouched", "same files", _tree_digest(noted) == before, noted)

    full = tmp / "full-disk-run"

    def small_disk():  # a file-size limit: every write past 256 KiB fails as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    cli(cls, "pretrained --out on a full disk (writes fail)", ["pretrained", "mnist", "--out", str(full)], 4,
        ("cannot use",), preexec=small_disk)
    leftovers = [p.name for p in tmp.glob(".staging-*")]
    add(cls, "... no half-made run folder or staging left", "absent", not full.exists() and not leftovers,
        f"run folder exists: {full.exists()}, staging: {leftovers}")

    for mask, want in ((0o022, 0o644), (0o077, 0o600)):
        out = tmp / f"umask-{mask:03o}"
        r = _run(["pretrained", "mnist", "--out", str(out)], preexec=lambda m=mask: os.umask(m))
        modes = {p.name: p.stat().st_mode & 0o777 for p in (out / "manifest.json", out / "report.md") if p.exists()}
        add(cls, f"file modes follow umask {mask:03o}", f"{want:03o}", r["exit"] == 0 and modes and
            all(v == want for v in modes.values()), {k: f"{v:03o}" for k, v in modes.items()} or r["stderr"][-200:])

    ro = _copy_run(run_dir, tmp / "readonly-run")
    how, wrap = _readonly_wrap(ro)
    if how is None:
        add(cls, "export on a read-only run folder", "exit 4", True, "root without mount rights (permission bits do "
            "not stop root)", skipped=True)
    else:
        if how == "chmod":
            for p in [ro, *ro.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
        before = _tree_digest(ro)
        cli(cls, f"export on a read-only run folder ({'permissions' if how == 'chmod' else 'read-only mount'})",
            ["export", str(ro), "--format", "onnx", "--detector", "l2", "--validate", "50", "--quiet"], 4,
            ("cannot use",), wrap=wrap)
        if how == "chmod":
            for p in [ro, *ro.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o755)
        add(cls, "... the read-only run is unchanged", "same files", _tree_digest(ro) == before, ro)

    linked = _copy_run(run_dir, tmp / "linked-run")
    outside = tmp / "outside.bin"
    shutil.copy2(linked / model, outside)
    (linked / model).unlink()
    (linked / model).symlink_to(outside)
    cli(cls, "a listed file is a symbolic link out of the run folder (info)", ["info", str(linked)], 4,
        ("symbolic link",))
    cli(cls, "... and predict refuses it", ["predict", str(linked), str(good_png), "--model", model], 4,
        ("symbolic link",))

    # ------------------------------------------------------------ two processes, one run folder
    cls = "concurrency"
    locked = _copy_run(run_dir, tmp / "locked-run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dafar.run import run_lock\n"
        f"with run_lock({str(locked)!r}, 'export'):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        cli(cls, "a stage while another holds the run folder", ["export", str(locked), "--format", "onnx", "--detector",
                                                                 "l2", "--validate", "50", "--quiet"], 4, ("in use by",))
        before = _tree_digest(locked)
        cli(cls, "--overwrite of a run folder another stage holds", ["pretrained", "mnist", "--out", str(locked),
                                                                      "--overwrite"], 4, ("in use by",))
        add(cls, "... the held run folder is unchanged", "same files", _tree_digest(locked) == before, locked)
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, so a crash never leaves a folder locked
        holder.wait()
    cli(cls, "the same stage after the holder was killed", ["export", str(locked), "--format", "onnx", "--detector", "l2",
                                                             "--validate", "50", "--quiet"], 0)
    if with_concurrency:
        both = _copy_run(run_dir, tmp / "raced-run")
        args = ["export", str(both), "--format", "onnx", "--detector", "l2", "--validate", "50", "--quiet"]
        procs = [subprocess.Popen([sys.executable, "-m", "dafar", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        codes = sorted(rc for rc, _ in outs)
        clean = all(rc == 0 or (rc == 4 and "in use by" in err) for rc, err in outs) and 0 in codes
        misleading = [err.strip().splitlines()[-1][:150] for rc, err in outs if rc not in (0, 4) and err.strip()]
        try:
            load_manifest(both, verify=True)
            consistent = not list(both.glob(".staging-*"))
        except DafarError as exc:
            consistent, misleading = False, misleading + [str(exc)[:150]]
        add(cls, "two exports at once on one run folder", "one finishes, the other finishes or is refused (exit 4)",
            clean and consistent, f"exits {codes}; folder verifies, no staging left: {consistent}"
            + (f"; {misleading}" if misleading else ""))

    # ------------------------------------------------------------ the manifest as input
    cls = "manifest parsing"

    def edited(name, edit_text=None, edit_json=None):
        """A copy of the run with its manifest edited; a JSON edit is re-stamped with a valid digest
        (as a forger would), so the case reaches what it tests rather than the digest check."""
        from dafar.manifest import manifest_digest

        dst = _copy_run(run_dir, tmp / name)
        mp = dst / "manifest.json"
        if edit_text is not None:
            mp.write_text(edit_text)
        else:
            mm = json.loads(mp.read_text())
            edit_json(mm)
            mm["manifest_sha256"] = manifest_digest(mm)
            mp.write_text(json.dumps(mm))
        return dst

    deep = edited("deep-run", edit_text='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    cli(cls, "a manifest nested 100,000 deep (info)", ["info", str(deep)], 4, ("manifest.json", "nest"))
    cli(cls, "... (predict)", ["predict", str(deep), str(good_png), "--model", model], 4, ("manifest.json", "nest"))
    try:
        Defence(deep, model)
        add(cls, "... (Python API)", "ManifestError", False, "accepted")
    except DafarError as exc:
        add(cls, "... (Python API)", "ManifestError", "nest" in str(exc), exc)
    cli(cls, "a manifest above the size limit", ["info", str(run_dir)], 4, ("DAFAR_MAX_MANIFEST_BYTES",),
        env={"DAFAR_MAX_MANIFEST_BYTES": "1024"})

    def bad_rank(mm):  # the shape predict reads: the model's own export entry
        shape = mm["exports"][model]["input"]["shape"]
        mm["exports"][model]["input"]["shape"] = shape[1:]

    wrong = edited("rank-run", edit_json=bad_rank)
    cli(cls, "a recorded input shape of the wrong rank", ["predict", str(wrong), str(good_png), "--model", model], 4,
        ("manifest.json", model, "4 dimensions"))

    def odd_dims(mm):
        shape = mm["exports"][model]["input"]["shape"]
        mm["exports"][model]["input"]["shape"] = [shape[0], "x", *shape[2:]]

    cli(cls, "a recorded input shape with a non-integer dimension", ["predict", str(edited("dims-run", edit_json=odd_dims)),
                                                                     str(good_png), "--model", model], 4,
        ("manifest.json", model, "positive integer"))
    for key, args in (("exports", ["predict", "RUN", str(good_png), "--model", model]), ("thresholds", ["info", "RUN"]),
                      ("files", ["info", "RUN"])):
        bad = edited(f"list-{key}-run", edit_json=lambda mm, key=key: mm.__setitem__(key, list(mm[key])))
        cli(cls, f"a re-stamped manifest whose '{key}' is a list ({args[0]})",
            [str(bad) if a == "RUN" else a for a in args], 4, ("manifest.json", key, "JSON object"))
    away = _copy_run(run_dir, tmp / "manifest-link-run")
    (away / "manifest.json").rename(tmp / "manifest-away.json")
    (away / "manifest.json").symlink_to(tmp / "manifest-away.json")
    cli(cls, "manifest.json is a symbolic link out of the run folder", ["info", str(away)], 4, ("symbolic link",))

    cli(cls, "a manifest that is valid JSON but not a manifest", ["info", str(edited("empty-run", edit_text="[1, 2, 3]"))],
        4, ("manifest.json",))

    # ------------------------------------------------------------ array-likes
    cls = "array-likes"
    d_raise = Defence(run_dir, model)
    u8 = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    f32 = u8.astype(np.float32) / 255
    ref = d_raise.predict(u8)

    class ArrayLike:  # an object with __array__ (a PIL image, a tensor, a pandas frame all are)
        def __array__(self, dtype=None, copy=None):
            return u8 if dtype is None else u8.astype(dtype)

    class Sub(np.ndarray):
        pass

    same = {
        "rows of float pixels (nested lists)": f32.tolist(),
        "a list of float images": [f32, f32],
        "tuple of rows": tuple(map(tuple, f32.reshape(h, w * c).tolist())) if c == 1 else None,
        "big-endian float": f32.astype(">f4"),
        "Fortran-ordered": np.asfortranarray(u8),
        "ndarray subclass": u8.view(Sub),
        "object with __array__": ArrayLike(),
        "memoryview": memoryview(np.ascontiguousarray(u8)),
    }
    if c == 1:
        same["np.matrix (H x W)"] = np.matrix(u8[:, :, 0])
    for name, x in same.items():
        if x is None:
            continue
        try:
            p = d_raise.predict(x)
            ok = p.labels[0] == ref.labels[0] and (np.isclose(p.scores[0], ref.scores[0], rtol=1e-5)
                                                   or (np.isnan(p.scores[0]) and np.isnan(ref.scores[0])))
            add(cls, name, "the plain array's result", ok, f"label {p.labels[0]} score {p.scores[0]:.5f}")
        except InputValidationError as exc:
            add(cls, name, "the plain array's result", False, f"refused: {exc}")
        except Exception as exc:  # noqa: BLE001
            add(cls, name, "the plain array's result", False, f"{type(exc).__name__}: {exc}")
    bad = f32.copy()
    bad[0, 0, 0] = 3.0  # out of range: must never be accepted, whatever carries it
    refused = {
        "masked array": np.ma.masked_array(u8, mask=np.zeros_like(u8, bool)),
        "rows of integer pixels (int64, as an int64 array is)": u8.tolist(),
        "out-of-range nested list": bad.tolist(),
        "out-of-range in an __array__ object": type("Bad", (), {"__array__": lambda self, dtype=None, copy=None: bad})(),
        "out-of-range big-endian": bad.astype(">f8"),
        "ragged list": [f32.tolist(), f32[:-1].tolist()],
        "string array": np.array([["a"]]),
        "bytes": bytes(u8.tobytes()),
    }
    d_reject = Defence(run_dir, model, on_invalid="reject")
    for name, x in refused.items():
        try:
            d_raise.predict(x)
            add(cls, name, "InputValidationError", False, "accepted")
        except InputValidationError as exc:
            ok = bool(str(exc))
            try:  # with on_invalid=reject the image is rejected, never accepted
                p = d_reject.predict(x)
                ok = ok and bool(np.all(p.rejected))
                detail = f"refused ({str(exc)[:120]}); reject mode: rejected"
            except InputValidationError:
                detail = f"refused ({str(exc)[:120]}); reject mode: refused"
            add(cls, name, "InputValidationError", ok, detail)
        except Exception as exc:  # noqa: BLE001
            add(cls, name, "InputValidationError", False, f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ the device install
    cls = "device install"
    r = cli(cls, "predict an image without torch or TensorFlow", ["predict", str(run_dir), str(good_png), "--model", model],
            0, ("label",), blocked=_HEAVY)
    cli(cls, "predict an .npy without torch or TensorFlow", ["predict", str(run_dir), str(_save_npy(tmp, u8)), "--model",
                                                              model], 0, ("label",), blocked=_HEAVY)
    scratch = _copy_run(run_dir, tmp / "device-run")
    for sub, extra in (("export", "export"), ("quantize", "eval"), ("eval", "eval"), ("train", "train")):
        args = ["train", "--out", str(tmp / "device-train")] if sub == "train" else [sub, str(scratch)]
        cli(cls, f"{sub} without its extra", args, 6, (f"dafar[{extra}]",), blocked=_HEAVY)  # noqa: B023
    cli(cls, "pipeline without its extra", ["pipeline", "--out", str(tmp / "device-pipe")], 6, ("dafar[",),
        blocked=_HEAVY)
    cli(cls, "predict an image without Pillow", ["predict", str(run_dir), str(good_png), "--model", model], 6,
        ("dafar[images]",), blocked=(*_HEAVY, "PIL"))
    return rows


def _save_npy(tmp: Path, a: np.ndarray) -> Path:
    p = tmp / "image.npy"
    np.save(p, a)
    return p
