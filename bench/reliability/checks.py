"""``dafar reliability``: how the shipped pieces hold up, measured, in ``RUN/reliability_report.md``.

1. Input fuzzing of :class:`dafar.runtime.Defence` with hypothesis: shapes and ranks, dtypes
   (bool, ints, floats of every width, complex, object, strings), empty and huge batches, NaN,
   infinities, negative and out-of-range values, non-contiguous and read-only arrays, batches that
   mix good and bad images, things that are not arrays.  A case passes when it ends in a correct
   result (invalid images rejected, never a NaN image accepted) or in the documented
   ``InputValidationError``; anything else (another exception, a crash, a hang) is a failure.
2. Files: a model file truncated, bit-flipped or swapped for another, a manifest edited (alpha,
   a hash), a pickle disguised as safetensors: each must be refused before use with a message
   naming the file, and the pickle must never run.
3. Long run: 100,000 inferences per backend in one process, resident memory sampled; growth after
   warm-up and latency drift between the first and the last 10%.
4. Concurrency: 8 threads sharing one runtime object for 10,000 inferences; results identical to
   the single-threaded ones; throughput.
5. The CLI on bad arguments, and a stage killed mid-way (the run folder must stay consistent).
6. Fault classes (:mod:`.faults`): resource bounds, the file system (read-only, full, a user's own
   file), two processes on one run folder, the manifest as input, array-likes, the device install.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, DafarError, InputValidationError
from dafar.manifest import atomic_write_json, atomic_write_text, classifier_alone_message, read_manifest
from dafar.limits import check_threads
from dafar.options import option, to_argv

__all__ = ["ReliabilityConfig", "ReliabilityResult", "check_reliability", "fuzz", "file_checks", "long_run",
           "concurrency", "cli_checks", "interrupted_stage", "run_reliability", "write_reliability_report"]


@dataclass(frozen=True)
class ReliabilityConfig:
    fuzz_cases: int = option(10_000, help="hypothesis cases per model")
    long_run: int = option(100_000, help="inferences per backend in one process")
    threads: int = option(8, help="threads sharing one runtime object")
    concurrent: int = option(10_000, help="inferences shared by the threads")

    def __post_init__(self):
        for k in ("fuzz_cases", "long_run", "threads", "concurrent"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        check_threads(self.threads, "threads", ConfigError)  # Python threads here, bounded like a runtime's


@dataclass(frozen=True)
class ReliabilityResult:
    run_dir: Path
    summary: dict
    report: Path


# ---------------------------------------------------------------- 1. fuzzing
def _strategy(chw):
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    c, h, w = chw
    good_shapes = [(h, w, c), (c, h, w), (1, h, w, c), (3, h, w, c), (2, c, h, w)] + ([(h, w), (4, h, w)] if c == 1 else [])
    special = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 1.5, 256.0, -1e30, 1e30, 0.0, 1.0, 0.5])
    dtypes = st.sampled_from(["bool", "int8", "int16", "int32", "int64", "uint16", "uint32", "float16", "float32", "float64",
                              "complex64", "uint8"])

    @st.composite
    def case(draw):
        kind = draw(st.sampled_from(["valid_u8", "valid_float", "random_array", "nan_inf", "out_of_range", "mixed_batch",
                                     "noncontiguous", "readonly", "empty", "huge", "not_an_array", "list", "object"]))
        shape = draw(st.sampled_from(good_shapes))
        if kind == "valid_u8":
            return kind, draw(hnp.arrays(np.uint8, shape))
        if kind == "valid_float":
            return kind, draw(hnp.arrays(draw(st.sampled_from([np.float16, np.float32, np.float64])), shape,
                                         elements=st.floats(0, 1, width=16)))
        if kind == "random_array":
            dt = np.dtype(draw(dtypes))
            shp = draw(hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=30))
            return kind, draw(hnp.arrays(dt, shp))
        if kind in ("nan_inf", "out_of_range"):
            x = draw(hnp.arrays(np.float32, shape, elements=st.floats(0, 1, width=32)))
            flat = x.reshape(-1)
            k = draw(st.integers(1, min(10, flat.size)))
            for i in draw(st.lists(st.integers(0, flat.size - 1), min_size=k, max_size=k)):
                flat[i] = draw(special) if kind == "nan_inf" else draw(st.sampled_from([-0.5, 1.01, 300.0, -1e9]))
            return kind, x
        if kind == "mixed_batch":
            n = draw(st.integers(2, 6))
            x = draw(hnp.arrays(np.float32, (n, c, h, w), elements=st.floats(0, 1, width=32)))
            bad = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
            for i in bad:
                x[i, draw(st.integers(0, c - 1)), draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(special)
            return kind, x
        if kind == "noncontiguous":
            big = draw(hnp.arrays(np.uint8, (2, 2 * h, 2 * w, c)))
            return kind, big[:, ::2, ::2, :]
        if kind == "readonly":
            x = draw(hnp.arrays(np.uint8, shape))
            x.flags.writeable = False
            return kind, x
        if kind == "empty":
            return kind, np.zeros((0, h, w, c), np.uint8)
        if kind == "huge":
            n = draw(st.sampled_from([10**6, 10**8, 2**40]))
            return kind, np.broadcast_to(np.zeros((1, h, w, c), np.uint8), (n, h, w, c))
        if kind == "not_an_array":
            return kind, draw(st.sampled_from([None, 3, 2.5, "image.png", b"\x89PNG", {"x": 1}, object()]))
        if kind == "list":
            return kind, draw(st.lists(hnp.arrays(np.uint8, shape[-3:] if len(shape) == 4 else shape), max_size=3))
        return kind, np.array([[object()]], dtype=object)

    return case()


def _check_case(d, x) -> tuple[str, str]:
    """Run one input: ('ok', how) or ('fail', why)."""
    nonfinite_images = None
    if isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim >= 3 and x.size and x.size < 10**7:
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(x) | (x < 0) | (x > 1)
        nonfinite_images = bad.reshape(bad.shape[0], -1).any(1) if x.ndim == 4 else None
    try:
        p = d.predict(x)
    except InputValidationError as exc:
        return ("ok", "InputValidationError") if str(exc) else ("fail", "InputValidationError without a message")
    except Exception as exc:  # any other exception type is a failure
        return "fail", f"{type(exc).__name__}: {exc}"
    n = len(p)
    if not (p.labels.shape == p.scores.shape == p.rejected.shape == (n,)) or p.logits.shape[0] != n:
        return "fail", f"inconsistent output shapes for {getattr(x, 'shape', None)}"
    if np.any(~np.isfinite(p.scores) & ~p.rejected):
        return "fail", "an image without a finite score was accepted"
    if nonfinite_images is not None and len(nonfinite_images) == n and np.any(nonfinite_images & ~p.rejected):
        return "fail", "an image holding NaN/inf or out-of-range values was accepted"
    return "ok", "result"


def fuzz(run_dir, model: str, cases: int = 10_000, seed: int = 0, log=print) -> dict:
    from hypothesis import HealthCheck, Phase, given, settings

    from dafar.runtime import Defence

    d_raise = Defence(run_dir, model)
    d_reject = Defence(run_dir, model, on_invalid="reject")
    stats = {"cases": 0, "failures": 0, "outcomes": {}, "kinds": {}, "failure_examples": [], "max_seconds": 0.0}

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=_strategy(d_raise.chw))
    def run(case):
        kind, x = case
        for d in (d_raise, d_reject):
            t0 = time.perf_counter()
            status, how = _check_case(d, x)
            dt = time.perf_counter() - t0
            stats["max_seconds"] = max(stats["max_seconds"], dt)
            if dt > 30:
                status, how = "fail", f"took {dt:.0f} s (hang)"
            stats["cases"] += 1
            key = f"{d.on_invalid.value}:{how}"
            stats["outcomes"][key] = stats["outcomes"].get(key, 0) + 1
            stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
            if status == "fail":
                stats["failures"] += 1
                if len(stats["failure_examples"]) < 10:
                    stats["failure_examples"].append({"kind": kind, "why": how, "input": repr(x)[:200]})

    t0 = time.perf_counter()
    run()
    stats["seconds"] = time.perf_counter() - t0
    stats["model"] = model
    log(f"fuzz {model}: {stats['cases']} cases, {stats['failures']} failures")
    return stats


# ---------------------------------------------------------------- 2. files
def _expect_refusal(fn, name: str) -> dict:
    try:
        fn()
    except DafarError as exc:
        msg = str(exc)
        return {"refused": True, "error": type(exc).__name__, "names_file": name in msg, "message": msg[:300]}
    except Exception as exc:
        return {"refused": False, "error": f"unexpected {type(exc).__name__}", "message": str(exc)[:300]}
    return {"refused": False, "error": None, "message": "accepted"}


def file_checks(run_dir, model: str) -> list[dict]:
    from dafar.manifest import load_manifest
    from dafar.run import RunFolder
    from dafar.runtime import Defence

    run_dir = Path(run_dir)
    results = []
    name = Path(model).name
    m = read_manifest(run_dir)
    other = next(r for r in m["exports"] if r != model and r.endswith(Path(model).suffix))

    def fresh():
        tmp = Path(tempfile.mkdtemp(prefix="dafar-rel-"))
        dst = tmp / "run"
        # everything the manifest lists travels (attack sets included); derived reports do not
        shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("bench", "eval", "checkpoints", "plots", "reliability"))
        return dst

    def case(label, mutate, check, target_name):
        dst = fresh()
        try:
            mutate(dst)
            r = _expect_refusal(lambda: check(dst), target_name)
        finally:
            shutil.rmtree(dst.parent, ignore_errors=True)
        results.append({"case": label, **r})

    def load_model(dst):
        Defence(dst, model).predict(np.zeros((1, *Defence(dst, model).chw[1:], Defence(dst, model).chw[0]), np.uint8))

    p = lambda dst: dst / model  # noqa: E731
    case("model truncated", lambda d: p(d).write_bytes(p(d).read_bytes()[: len(p(d).read_bytes()) // 2]), load_model, name)
    case("model bit-flipped", lambda d: p(d).write_bytes(_flip(p(d).read_bytes())), load_model, name)
    case("model swapped for another file", lambda d: p(d).write_bytes((d / other).read_bytes()), load_model, name)
    case("model deleted", lambda d: p(d).unlink(), load_model, name)

    def edit_alpha(d):
        mm = json.loads((d / "manifest.json").read_text())
        e = mm["exports"][model]
        e["alpha"] = (e.get("alpha") or 1.0) * 10
        (d / "manifest.json").write_text(json.dumps(mm))

    case("manifest alpha edited", edit_alpha, load_model, "manifest.json")

    def edit_hash(d):
        mm = json.loads((d / "manifest.json").read_text())
        mm["files"][model]["sha256"] = "0" * 64
        (d / "manifest.json").write_text(json.dumps(mm))

    case("manifest hash edited", edit_hash, load_model, "manifest.json")
    case("manifest truncated", lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:200]),
         load_model, "manifest.json")
    def load_weights_only(d):
        from dafar.train.loading import load_dafar

        load_dafar(d)  # what export, quantize and eval do first

    case("weights bit-flipped (export stage)", lambda d: (d / "weights/E.safetensors").write_bytes(
        _flip((d / "weights/E.safetensors").read_bytes())), load_weights_only, "E.safetensors")
    case("a listed file missing (any stage)", lambda d: (d / "metrics.json").unlink(), lambda d: load_manifest(d),
         "metrics.json")

    # a pickle that would leave a marker file if it were ever unpickled, disguised as safetensors,
    # with its hash recorded (so only the loader stands between it and execution)
    marker = Path(tempfile.gettempdir()) / f"dafar-pickle-ran-{os.getpid()}"
    marker.unlink(missing_ok=True)

    def plant(d):
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        (d / "weights/F.safetensors").write_bytes(pickle.dumps(Evil()))
        RunFolder.open(d, verify=False).register({"weights/F.safetensors": {"role": "weights", "module": "F"}})

    def load_weights(d):
        from dafar.train.loading import load_dafar

        load_dafar(d)

    case("pickle disguised as safetensors", plant, load_weights, "F.safetensors")
    results[-1]["pickle_executed"] = marker.exists()
    if marker.exists():
        results[-1]["refused"] = False
        marker.unlink()
    return results


def _flip(b: bytes) -> bytes:
    a = bytearray(b)
    a[len(a) // 2] ^= 0x40
    return bytes(a)


# ---------------------------------------------------------------- 3. long run
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def long_run(run_dir, model: str, n: int = 100_000, sample_every: int = 1000) -> dict:
    from dafar.runtime import Defence

    d = Defence(run_dir, model)
    rng = np.random.default_rng(0)
    c, h, w = d.chw
    pool = [rng.integers(0, 256, (h, w, c), dtype=np.uint8) for _ in range(64)]
    times = np.empty(n)
    rss = []
    for i in range(n):
        t0 = time.perf_counter()
        d.predict(pool[i % 64])
        times[i] = time.perf_counter() - t0
        if i % sample_every == 0:
            rss.append((i, _rss_kib()))
    rss.append((n, _rss_kib()))
    warm = next(v for i, v in rss if i >= n // 10)  # after a 10% warm-up
    k = n // 10
    return {"model": model, "inferences": n, "rss_samples_kib": rss, "rss_after_warmup_kib": warm,
            "rss_end_kib": rss[-1][1], "rss_growth_after_warmup_mib": (rss[-1][1] - warm) / 1024,
            "latency_first10_p50_ms": float(np.median(times[:k]) * 1e3),
            "latency_last10_p50_ms": float(np.median(times[-k:]) * 1e3),
            "latency_drift_pct": float(100 * (np.median(times[-k:]) / np.median(times[:k]) - 1)),
            "seconds": float(times.sum())}


# ---------------------------------------------------------------- 4. concurrency
def concurrency(run_dir, model: str, threads: int = 8, total: int = 10_000) -> dict:
    from dafar.runtime import Defence

    d = Defence(run_dir, model)
    rng = np.random.default_rng(1)
    c, h, w = d.chw
    x = rng.integers(0, 256, (256, h, w, c), dtype=np.uint8)
    ref = [d.predict(x[i]) for i in range(len(x))]
    errors: list[str] = []
    mismatches = [0]
    per = total // threads

    def work(t):
        try:
            for j in range(per):
                i = (t * per + j) % len(x)
                p = d.predict(x[i])
                if p.labels[0] != ref[i].labels[0] or p.scores[0] != ref[i].scores[0] and not (
                        np.isnan(p.scores[0]) and np.isnan(ref[i].scores[0])) or p.rejected[0] != ref[i].rejected[0]:
                    mismatches[0] += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    secs = time.perf_counter() - t0
    t1 = time.perf_counter()
    for j in range(per * threads):
        d.predict(x[j % len(x)])
    single = time.perf_counter() - t1
    return {"model": model, "threads": threads, "inferences": per * threads, "mismatches": mismatches[0], "errors": errors[:5],
            "identical": mismatches[0] == 0 and not errors, "throughput_per_s": per * threads / secs,
            "single_thread_throughput_per_s": per * threads / single}


# ---------------------------------------------------------------- 5. CLI and interrupted stages
def _cli(args: list[str], env=None, timeout=600) -> dict:
    out = subprocess.run([sys.executable, "-m", "dafar", *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return {"args": args, "exit": out.returncode, "stderr": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else ""}


def cli_checks(run_dir, tmp: Path) -> list[dict]:
    run_dir = Path(run_dir)
    ro = tmp / "readonly"
    ro.mkdir(exist_ok=True)
    os.chmod(ro, 0o500)
    cases = [
        ("missing run folder", ["info", str(tmp / "nope")], 4),
        ("unknown data set", ["train", "--dataset", "imagenet", "--out", str(tmp / "x")], 2),
        ("unknown export format", ["export", str(run_dir), "--format", "coreml"], 2),
        ("unknown quantize layout", ["quantize", str(run_dir), "--layout", "int4"], 2),
        ("too few calibration images", ["quantize", str(run_dir), "--calib", "3"], 2),
        ("CIFAR-10 folder missing, offline", ["train", "--dataset", "cifar10", "--data-dir", str(tmp / "none"), "--out",
                                              str(tmp / "c"), "--no-download"], 3),
        ("bad thread list", ["bench", str(run_dir), "--threads", "x"], 2),
        ("predict on a missing image", ["predict", str(run_dir), str(tmp / "missing.png")], 2),
    ]
    if os.geteuid() != 0:  # root ignores directory permissions
        cases.append(("unwritable output folder", ["train", "--out", str(ro / "run"), "--train-limit", "64"], 4))
    out = []
    for label, args, want in cases:
        r = _cli(args, env={"DAFAR_OFFLINE": "1"})
        r.update({"case": label, "expected_exit": want, "ok": r["exit"] == want and bool(r["stderr"])})
        out.append(r)
    os.chmod(ro, 0o700)
    return out


def interrupted_stage(run_dir, tmp: Path, after_s: float = 8.0) -> dict:
    """Kill `dafar export` mid-way with SIGKILL; the run folder must still verify and list only
    complete files, and the next export must clean up and succeed."""
    from dafar.manifest import load_manifest, sha256_file

    dst = tmp / "killed"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("bench", "eval", "checkpoints", "plots", "reliability"))
    before = sha256_file(dst / "manifest.json")
    proc = subprocess.Popen([sys.executable, "-m", "dafar", "export", str(dst), "--format", "tflite", "--detector",
                             "autoencoder", "--tflite-batch", "2", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(after_s)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after = sha256_file(dst / "manifest.json")
    leftovers = [p.name for p in dst.glob(".staging-*")]
    try:
        load_manifest(dst)  # every listed file verifies
        consistent = True
    except DafarError:
        consistent = False
    r = _cli(["export", str(dst), "--format", "onnx", "--detector", "l2", "--validate", "200", "--quiet"])
    return {"killed_mid_way": killed, "manifest_unchanged": before == after, "folder_verifies": consistent,
            "staging_left_behind": leftovers, "next_export_exit": r["exit"],
            "staging_after_next_export": [p.name for p in dst.glob(".staging-*")]}


# ---------------------------------------------------------------- all of it
def run_reliability(run_dir, *, fuzz_cases: int = 10_000, long_n: int = 100_000, threads: int = 8,
                    concurrent_total: int = 10_000, log=print) -> dict:
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    exports = m.get("exports", {})
    pick = {}
    for fmt in ("tflite", "onnx"):
        cands = sorted(r for r, e in exports.items() if e["format"] == fmt and e["graph"] == "dafar" and e.get("batch") in (1, "dynamic"))
        if cands:
            pick[fmt] = cands[0]
    if not pick:
        raise DafarError(classifier_alone_message(m, run_dir) or f"{run_dir} has no exported defence graph; run dafar export first")
    res: dict = {"run": run_dir.name, "models": pick, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    res["fuzz"] = [fuzz(run_dir, mdl, fuzz_cases, log=log) for mdl in pick.values()]
    res["files"] = {mdl: file_checks(run_dir, mdl) for mdl in pick.values()}
    log("file checks done")
    res["long_run"] = []
    for mdl in pick.values():
        res["long_run"].append(long_run(run_dir, mdl, long_n))
        log(f"long run {mdl}: growth {res['long_run'][-1]['rss_growth_after_warmup_mib']:.2f} MiB")
    res["concurrency"] = [concurrency(run_dir, mdl, threads, concurrent_total) for mdl in pick.values()]
    log("concurrency done")
    with tempfile.TemporaryDirectory(prefix="dafar-rel-") as tmp:
        res["cli"] = cli_checks(run_dir, Path(tmp))
        res["interrupted"] = interrupted_stage(run_dir, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="dafar-rel-") as tmp:
        from .faults import fault_checks

        res["faults"] = fault_checks(run_dir, next(iter(pick.values())), Path(tmp), log=log)
    out = run_dir / "reliability"
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "summary.json", res)
    return res


def write_reliability_report(run_dir, cmd: str = "dafar reliability RUN_DIR") -> Path:
    run_dir = Path(run_dir)
    r = json.loads((run_dir / "reliability" / "summary.json").read_text())
    L = ["# Reliability report", "", f"Reproduce: `{cmd}` (started {r['started']}).", "", "## Input fuzzing (hypothesis)", "",
         "Each case goes to two runtime objects (on_invalid=raise and =reject). Pass: a correct result (every image "
         "holding NaN, inf or out-of-range values rejected; no image without a finite score accepted) or the "
         "documented InputValidationError with a message. Anything else, or a call over 30 s, fails.", "",
         "| model | cases | failures | slowest case (s) | outcomes |", "|---|---|---|---|---|"]
    for f in r["fuzz"]:
        outs = ", ".join(f"{k} {v}" for k, v in sorted(f["outcomes"].items()))
        L.append(f"| `{f['model']}` | {f['cases']} | {f['failures']} | {f['max_seconds']:.2f} | {outs} |")
        for ex in f["failure_examples"]:
            L.append(f"|  | failure: {ex['kind']} | {ex['why'][:100]} | | |")
    kinds = r["fuzz"][0]["kinds"]
    L += ["", "Case kinds (first model): " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ".", "",
          "## Tampered and corrupt files", "", "| model | case | refused | error | message names the file |", "|---|---|---|---|---|"]
    for mdl, rows in r["files"].items():
        for c in rows:
            extra = " (pickle never ran)" if c.get("pickle_executed") is False else (" (PICKLE RAN)" if c.get("pickle_executed") else "")
            L.append(f"| `{Path(mdl).name}` | {c['case']} | {'yes' if c['refused'] else 'NO'}{extra} | {c['error']} | "
                     f"{'yes' if c.get('names_file') else 'no'} |")
    L += ["", "## Long runs", "", "| model | inferences | RSS after warm-up MiB | RSS at end MiB | growth MiB | "
          "p50 first 10% ms | p50 last 10% ms | drift |", "|---|---|---|---|---|---|---|---|"]
    for x in r["long_run"]:
        L.append(f"| `{x['model']}` | {x['inferences']:,} | {x['rss_after_warmup_kib'] / 1024:.1f} | {x['rss_end_kib'] / 1024:.1f} | "
                 f"{x['rss_growth_after_warmup_mib']:.2f} | {x['latency_first10_p50_ms']:.3f} | {x['latency_last10_p50_ms']:.3f} | "
                 f"{x['latency_drift_pct']:+.1f}% |")
    L += ["", "## Concurrency", "", "| model | threads | inferences | identical to single-threaded | throughput /s | "
          "single-thread throughput /s |", "|---|---|---|---|---|---|"]
    for x in r["concurrency"]:
        L.append(f"| `{x['model']}` | {x['threads']} | {x['inferences']:,} | {'yes' if x['identical'] else 'NO'} "
                 f"({x['mismatches']} mismatches) | {x['throughput_per_s']:.0f} | {x['single_thread_throughput_per_s']:.0f} |")
    L += ["", "## The CLI on bad arguments", "", "| case | exit (expected) | message |", "|---|---|---|"]
    for c in r["cli"]:
        L.append(f"| {c['case']} | {c['exit']} ({c['expected_exit']}){'' if c['ok'] else ' MISMATCH'} | {c['stderr'][:150]} |")
    it = r["interrupted"]
    L += ["", "## A stage killed mid-way", "",
          f"`dafar export` killed with SIGKILL after 8 s (killed mid-way: {it['killed_mid_way']}): manifest unchanged "
          f"{it['manifest_unchanged']}, every listed file verifies {it['folder_verifies']}, staging folders left behind "
          f"{len(it['staging_left_behind'])} (removed by the next stage run: {not it['staging_after_next_export']}, "
          f"its exit code {it['next_export_exit']}).", ""]
    L += _fault_section(r.get("faults", []))
    path = run_dir / "reliability_report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def _fault_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    from .faults import FAULT_CLASSES

    L = ["## Fault classes", "",
         "Each case is what a new user tried (a CLI command in a subprocess, or a Python API call) with what must "
         "happen: the documented exit code and words in the message, no traceback, nothing lost.", "",
         "| class | cases | passed |", "|---|---|---|"]

    def passed(xs):
        n, skipped = sum(x["ok"] and not x.get("skipped") for x in xs), sum(bool(x.get("skipped")) for x in xs)
        return f"{n}" + (f" ({skipped} skipped: could not be set up here)" if skipped else "") + \
            ("" if all(x["ok"] for x in xs) else " (FAILURES)")

    for cls in FAULT_CLASSES:
        L.append(f"| {cls} | {sum(x['class'] == cls for x in rows)} | {passed([x for x in rows if x['class'] == cls])} |")
    L += [f"| all | {len(rows)} | {passed(rows)} |", "", "| class | case | expected | result | detail |",
          "|---|---|---|---|---|"]
    for x in rows:
        detail = x["detail"].replace("|", "/").replace("\n", " ")[:160]
        result = "skipped" if x.get("skipped") else "ok" if x["ok"] else "FAILED"
        L.append(f"| {x['class']} | {x['case']} | {x['expected']} | {result} | {detail} |")
    return L + [""]


def check_reliability(run_dir, cfg: ReliabilityConfig = ReliabilityConfig(), *, log=print) -> ReliabilityResult:
    """``dafar reliability``: every check above, then ``reliability_report.md``."""
    summary = run_reliability(run_dir, fuzz_cases=cfg.fuzz_cases, long_n=cfg.long_run, threads=cfg.threads,
                              concurrent_total=cfg.concurrent, log=log)
    cmd = " ".join(["dafar reliability RUN_DIR"] + to_argv(cfg, always=("fuzz_cases", "long_run", "threads", "concurrent")))
    return ReliabilityResult(Path(run_dir), summary, write_reliability_report(run_dir, cmd))
