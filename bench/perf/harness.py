"""``dafar bench``: cost, latency, memory and accuracy of every model file of a run folder.

What is measured, and how:

* **Cost**: parameters of E, F, D, C and the overhead relative to the victim (beside the paper's
  Table 6), MACs per subnetwork and for the fused graph (:mod:`dafar.bench.perf.macs`), file sizes.
* **Latency** (per model, backend, threads and batch size), like TFLite's ``benchmark_model``:
  init time (constructing the runtime: hash check, backend load), first inference, then warm-up
  runs (not counted), then timed runs over a fixed count or duration: mean, std, min, max,
  p50, p90, p99.  The clock wraps the backend call alone (input already prepared), so python-side
  validation is not counted; :class:`~dafar.runtime.Defence` adds about 0.1 ms on top.
* **Fused-to-victim ratio**: the defence graph and the undefended victim of the same format,
  precision, contract and threads are timed *interleaved* (blocks of runs alternating between the
  two), so a noisy, shared machine slows both alike; the ratio of medians is reported beside the
  MAC ratio, the arithmetic floor for it.
* **Memory**: each model is loaded and run in a fresh child process; its peak resident set size
  (VmHWM) minus the resident size just before loading (backend already imported) is the model's cost.
* **Accuracy**: the test set through the runtime: victim and purified accuracy, false-positive
  rate at the model's alpha, for float and int8 models.
* **torch eager** (where torch is installed) as the reference, and GPU rows (ONNX Runtime's CUDA
  provider, torch CUDA) where a GPU is present.

Output: ``RUN/bench/<model>__<backend>__t<threads>__b<batch>.json`` (one record each), and
``RUN/bench_report.md`` with plots.  ``--device-only`` needs only numpy and a runtime backend.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, MissingExtraError
from dafar.manifest import atomic_write_json, classifier_alone_message
from dafar.limits import check_threads
from dafar.options import option
from dafar.run import RunFolder
from dafar.schema import Detector, Graph, InputContract

__all__ = ["BenchConfig", "BenchResult", "bench", "run_bench", "latency_stats", "PAPER_TABLE6"]

PAPER_TABLE6 = {"without_C": 0.5, "with_C": 1.0}  # extra parameters as a multiple of the victim's n


@dataclass(frozen=True)
class BenchConfig:
    threads: tuple[int, ...] = option((1, 2), help="comma list of thread counts")
    batches: tuple[int, ...] = option((1,), flag="--batch", help="comma list of batch sizes for dynamic-batch models")
    runs: int = option(200, help="timed runs per measurement (at least; see --min-seconds)")
    warmup: int = option(20, help="untimed warm-up runs")
    min_seconds: float = option(0.0, help="keep timing each measurement until this much time has passed (0: count only)")
    models: tuple[str, ...] | None = option(None, none="all", metavar="FILES",
                                            help="comma list of model files of the run folder (default: every export)")
    accuracy_images: int | None = option(None, none="all",
                                         help="test images for the accuracy rows, 'all', or 0 to skip")
    memory: bool = option(True, help="skip the peak-memory measurement")
    torch: bool = option(True, help="skip the torch eager reference rows")
    gpu: bool = option(True, help="skip the CUDA rows")
    stage_profile: bool = option(True, help="skip the per-stage cost profile (ONNX Runtime's profiler; LiteRT sub-graph "
                                            "timings) and LiteRT's official benchmark tool beside ours")
    # each round: the official tool on the defence, then on the victim (a process each), then ours
    # on the pair interleaved; the medians over rounds are compared (one round is noise on a VM)
    official_rounds: int = option(3, help="rounds of LiteRT's official benchmark tool beside ours per defence file")
    gpu_readiness: bool = option(True, help="skip the GPU-readiness checks (the GPU delegate analyzer on each .tflite "
                                            "file; float16 against float32 on the float graphs)")
    # torch has no fast float16 convolutions on a CPU: 1,000 images cost about 20 s on MNIST
    fp16_images: int = option(1000, help="test images for the float16 fidelity check")
    # off by default: one TFLite conversion per float graph (about 30 s each here)
    fp16_tflite: bool = option(False, help="also convert each float graph to a float16-weights TFLite file (what a GPU "
                                           "delegate is usually given) and compare it with the float32 file on LiteRT")
    device_only: bool = option(False, help="only the runtime (numpy + backend): for a Pi or phone with the run folder "
                                           "copied over")

    def __post_init__(self):
        for name in ("threads", "batches"):
            v = tuple(getattr(self, name))
            if not v or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in v):
                raise ConfigError(f"{name} must be positive integers, got {v!r}")
            object.__setattr__(self, name, tuple(dict.fromkeys(v)))
        for t in self.threads:
            check_threads(t)
        if not isinstance(self.runs, int) or self.runs < 5:
            raise ConfigError(f"runs must be an integer >= 5, got {self.runs!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.official_rounds, int) or isinstance(self.official_rounds, bool) or self.official_rounds < 1:
            raise ConfigError(f"official_rounds must be a positive integer, got {self.official_rounds!r}")
        if not isinstance(self.fp16_images, int) or isinstance(self.fp16_images, bool) or self.fp16_images < 1:
            raise ConfigError(f"fp16_images must be a positive integer, got {self.fp16_images!r}")
        if self.min_seconds < 0:
            raise ConfigError("min_seconds must be >= 0")
        if self.device_only:
            object.__setattr__(self, "torch", False)
            object.__setattr__(self, "gpu_readiness", False)  # needs torch and TensorFlow


def latency_stats(ms: list[float] | np.ndarray) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"count": int(a.size), "mean_ms": float(a.mean()), "std_ms": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min_ms": float(a.min()), "max_ms": float(a.max()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99))}


def _input_for(contract: InputContract, batch: int, chw, rng) -> np.ndarray:
    shape = contract.shape(chw, batch)
    if contract is InputContract.UINT8_NHWC:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.random(shape, dtype=np.float32)


class _Timed:
    """One model under one backend setting: a prepared input and a bare call to time."""

    def __init__(self, run_dir: Path, rel: str, threads: int, batch: int, chw, provider: str = "cpu"):
        from dafar.runtime import Defence

        t0 = time.perf_counter()
        self.d = Defence(run_dir, rel, threads=threads, provider=provider)
        self.init_ms = 1e3 * (time.perf_counter() - t0)
        self.rel, self.threads = rel, threads
        fixed = self.d.batch
        self.batch = batch if fixed is None else fixed
        self.x = _input_for(self.d.spec.contract, self.batch, chw, np.random.default_rng(0))
        t0 = time.perf_counter()
        self.call()
        self.first_ms = 1e3 * (time.perf_counter() - t0)

    def call(self):
        return self.d.run_prepared(self.x)

    def time_once(self) -> float:
        t0 = time.perf_counter()
        self.call()
        return 1e3 * (time.perf_counter() - t0)


def _measure(timed: list[_Timed], cfg: BenchConfig) -> list[list[float]]:
    """Warm up each, then time them interleaved in blocks of 10 runs until ``runs`` and
    ``min_seconds`` are both reached; returns per-model lists of milliseconds."""
    for t in timed:
        for _ in range(cfg.warmup):
            t.call()
    out: list[list[float]] = [[] for _ in timed]
    t_start = time.perf_counter()
    while min(len(o) for o in out) < cfg.runs or time.perf_counter() - t_start < cfg.min_seconds:
        for t, o in zip(timed, out):
            for _ in range(10):
                o.append(t.time_once())
    return out


def _memory_child(run_dir: Path, rel: str, threads: int, runs: int = 20) -> dict:
    """Resident memory of a fresh process that loads ``rel`` and runs it (KiB, from
    /proc/self/status: VmHWM is reset by exec, unlike ru_maxrss, which a child inherits from the
    parent's peak).  ``model_peak_kib`` = peak after the runs minus the resident size just before
    loading, with numpy, dafar and the backend already imported; ``backend_import_kib`` is the
    backend's own import."""
    code = f"""
import json, sys
def status():
    out = {{}}
    with open('/proc/self/status') as f:
        for line in f:
            k, _, v = line.partition(':')
            if k in ('VmRSS', 'VmHWM'):
                out[k] = int(v.split()[0])
    return out
import numpy as np
from dafar.runtime import Defence
before_backend = status()['VmRSS']
if {rel!r}.endswith('.onnx'):
    import onnxruntime
else:
    try:
        import ai_edge_litert.interpreter
    except ImportError:
        import tflite_runtime.interpreter
base = status()['VmRSS']
d = Defence({str(run_dir)!r}, {rel!r}, threads={threads})
loaded = status()['VmRSS']
c, h, w = d.chw
b = d.batch or 1
x = np.zeros((b, h, w, c), np.uint8) if d.input_dtype == np.uint8 else np.zeros((b, c, h, w), np.float32)
for _ in range({runs}):
    d.run_prepared(x)
st = status()
print(json.dumps({{"backend_import_kib": base - before_backend, "before_load_kib": base, "after_load_kib": loaded,
                  "peak_kib": st['VmHWM'], "model_peak_kib": st['VmHWM'] - base}}))
"""
    if not Path("/proc/self/status").exists():
        return {"error": "no /proc/self/status on this system"}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # memory is a side measurement: report, never abort the bench
        return {"error": f"{type(exc).__name__}: {exc}"}


def _accuracy(run_dir: Path, rel: str, u8: np.ndarray, y: np.ndarray) -> dict:
    from dafar.runtime import Defence

    d = Defence(run_dir, rel, threads=2)
    p = d.predict(u8)
    r = {"images": int(len(y)), "victim_acc": float(np.mean(p.logits.argmax(1) == y))}
    if d.graph == "dafar":
        r.update({"purified_acc": float(np.mean(p.labels == y)), "fpr": float(np.mean(p.rejected)),
                  "alpha": d.alpha, "defended_clean_acc": float(np.mean(~p.rejected & (p.labels == y)))})
    return r


def _machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from dafar.runtime.cpu import int8_saturation_risk

    info["onnx_int8_saturation_risk"] = int8_saturation_risk()  # x86 without VNNI: full-range int8 ONNX loses accuracy
    import importlib.metadata as md

    for pkg in ("numpy", "onnxruntime", "ai-edge-litert", "tflite-runtime", "torch"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def run_bench(run_dir, cfg: BenchConfig = BenchConfig(), *, data_dir=None, log=print) -> dict:
    """Run every measurement; write the JSON records and return the summary."""
    from .macs import fused_costs, subnet_costs

    run = RunFolder.open(run_dir, verify=False)
    run_dir, m = run.path, run.manifest
    exports = m.get("exports", {})
    specs = run.exports()
    if not exports:
        raise ConfigError(classifier_alone_message(m, run_dir)
                          or f"{run_dir} has no exported models to benchmark: run `dafar export` (and `dafar quantize`) first")
    models = list(cfg.models) if cfg.models else list(exports)
    skipped_formats: list[str] = []
    if cfg.device_only and not cfg.models:  # a device install has one backend: time what it can run
        from dafar.runtime.backends import installed_suffixes

        have = installed_suffixes()
        skipped_formats = sorted({Path(r).suffix for r in models} - have)
        models = [r for r in models if Path(r).suffix in have]
        if not models:
            raise MissingExtraError(f"{run_dir} holds {', '.join(skipped_formats)} models and this install runs none of "
                                    "them: pip install 'dafar[litert]' (.tflite) or 'dafar[onnx-runtime]' (.onnx)")
        if skipped_formats:
            log(f"--device-only: no runtime installed for the {', '.join(skipped_formats)} files; timing the others")
    missing = [r for r in models if r not in exports]
    if missing:
        raise ConfigError(f"not models of {run_dir}: {missing}; it has {list(exports)}")
    run.verify(models)
    chw = tuple(m["input"]["shape"])
    out_dir = run_dir / "bench"
    out_dir.mkdir(exist_ok=True)
    machine = _machine()
    summary: dict = {"run": run_dir.name, "machine": machine, "config": {
        "threads": list(cfg.threads), "batches": list(cfg.batches), "runs": cfg.runs, "warmup": cfg.warmup,
        "min_seconds": cfg.min_seconds, "device_only": cfg.device_only, "skipped_formats": skipped_formats,
        "stage_profile": cfg.stage_profile, "gpu_readiness": cfg.gpu_readiness,
        # the rest of the config, so the report's reproduce line rebuilds it whole
        "models": None if cfg.models is None else list(cfg.models), "accuracy_images": cfg.accuracy_images,
        "memory": cfg.memory, "torch": cfg.torch, "gpu": cfg.gpu, "fp16_images": cfg.fp16_images,
        "fp16_tflite": cfg.fp16_tflite, "official_rounds": cfg.official_rounds}, "records": [], "ratios": []}

    # ---- cost
    sub = subnet_costs(m)
    n = sub["E"]["params"] + sub["F"]["params"]
    summary["cost"] = {
        "subnetworks": sub, "victim_params": n,
        "overhead_without_C": sub["D"]["params"] / n, "overhead_with_C": (sub["D"]["params"] + sub["C"]["params"]) / n,
        "paper_table6": PAPER_TABLE6, "fused_l2": fused_costs(m, "l2"), "fused_autoencoder": fused_costs(m, "autoencoder"),
        "fused_l2_detect": fused_costs(m, "l2", "detect"),
        "fused_autoencoder_detect": fused_costs(m, "autoencoder", "detect"),
        "file_bytes": {rel: m["files"][rel]["bytes"] for rel in models},
    }

    # ---- latency, interleaving each defence graph with its victim counterpart
    victims = {e.pair_key: rel for rel, e in specs.items() if e.graph is Graph.VICTIM}
    defences = [r for r in models if specs[r].graph is Graph.DAFAR]
    lone = [r for r in models if specs[r].graph is Graph.VICTIM]
    from dafar.progress import progress as tqdm  # silent on a device install ([onnx-runtime]): no tqdm there

    groups = []
    for rel in defences:
        groups.append((rel, victims.get(specs[rel].pair_key)))
    for rel in lone:
        if rel not in {v for _, v in groups}:
            groups.append((rel, None))
    settings = [(t, b) for t in cfg.threads for b in cfg.batches]
    bar = tqdm(total=len(groups) * len(settings), desc="latency", unit="setting", leave=False)
    for rel, vrel in groups:
        for threads, batch in settings:
            bar.update(1)
            if exports[rel]["format"] == "tflite" and batch != exports[rel]["batch"]:
                continue  # fixed-batch file: measured at its own batch only
            timed = [_Timed(run_dir, rel, threads, batch, chw)]
            if vrel is not None:
                timed.append(_Timed(run_dir, vrel, threads, batch, chw))
            times = _measure(timed, cfg)
            recs = []
            for t, ms in zip(timed, times):
                e = exports[t.rel]
                rec = {"model": t.rel, "backend": t.d.backend_kind.value, "format": e["format"],
                       "precision": e.get("precision", "float32"), "graph": e["graph"], "detector": e.get("detector"),
                       "mode": e.get("mode", "hybrid") if e["graph"] == "dafar" else None, "contract": e["contract"], "threads": threads, "batch": t.batch, "init_ms": t.init_ms,
                       "first_inference_ms": t.first_ms, "warmup_runs": cfg.warmup, **latency_stats(ms),
                       "per_image_p50_ms": float(np.percentile(ms, 50)) / t.batch, "samples_ms": [round(v, 4) for v in ms],
                       "machine": machine}
                recs.append(rec)
            if vrel is not None:
                ratio = recs[0]["p50_ms"] / recs[1]["p50_ms"]
                mac = fused_costs(m, exports[rel].get("detector"), exports[rel].get("mode"))["mac_ratio"]
                recs[0]["victim_model"] = vrel
                recs[0]["fused_to_victim_ratio"] = ratio
                recs[0]["mac_ratio"] = mac
                summary["ratios"].append({"model": rel, "victim": vrel, "threads": threads, "batch": recs[0]["batch"],
                                          "latency_ratio": ratio, "mac_ratio": mac,
                                          "ratio_over_mac": ratio / mac})
            for rec in recs:
                if any(r["model"] == rec["model"] and r["threads"] == threads and r["batch"] == rec["batch"]
                       for r in summary["records"]):
                    continue  # a victim timed with several defences: keep its first measurement
                name = f"{Path(rec['model']).name}__{rec['backend']}__t{threads}__b{rec['batch']}.json"
                atomic_write_json(out_dir / name, rec)
                summary["records"].append({k: v for k, v in rec.items() if k not in ("samples_ms", "machine")})
            log(f"{rel} t{threads} b{recs[0]['batch']}: p50 {recs[0]['p50_ms']:.3f} ms"
                + (f", victim {recs[1]['p50_ms']:.3f} ms, ratio {recs[0]['fused_to_victim_ratio']:.2f}"
                   f" (MACs {recs[0]['mac_ratio']:.2f})" if vrel is not None else ""))
    bar.close()

    # ---- torch eager reference (and CUDA) where torch is installed
    if cfg.torch:
        summary["torch"] = _torch_rows(run_dir, m, cfg, chw, log)
    if cfg.gpu:
        summary["gpu"] = _gpu_rows(run_dir, models, exports, cfg, chw, log)
    if cfg.gpu_readiness:
        summary["gpu_readiness"] = _gpu_readiness(run_dir, m, models, data_dir, log, cfg.fp16_images, cfg.fp16_tflite)
    if cfg.stage_profile:
        summary["stages"] = _stage_rows(run_dir, m, models, exports, summary["ratios"], cfg, log)

    # ---- memory, in fresh processes
    if cfg.memory:
        summary["memory"] = {}
        for rel in tqdm(models, desc="memory", unit="model", leave=False):
            summary["memory"][rel] = _memory_child(run_dir, rel, cfg.threads[0])

    # ---- accuracy on the test set
    if cfg.accuracy_images != 0:
        u8, y = _test_set(m, run_dir, data_dir, cfg)
        if u8 is not None:
            summary["accuracy"] = {}
            for rel in tqdm(models, desc="accuracy", unit="model", leave=False):
                summary["accuracy"][rel] = _accuracy(run_dir, rel, u8, y)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _test_set(m: dict, run_dir: Path, data_dir, cfg: BenchConfig):
    """Test images and labels: the data set loaders (numpy only) or, on a device, ``RUN/bench/test.npz``."""
    cache = run_dir / "bench" / "test_images.npz"
    try:
        from dafar.run import RunFolder

        test = RunFolder(run_dir, m).test_set(data_dir, cfg.accuracy_images)
        return test.images, test.labels.astype(np.int64)
    except Exception:
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                u8, y = z["images"], z["labels"]
            if cfg.accuracy_images:
                u8, y = u8[: cfg.accuracy_images], y[: cfg.accuracy_images]
            return u8, y.astype(np.int64)
        return None, None


def _torch_rows(run_dir: Path, m: dict, cfg: BenchConfig, chw, log) -> list[dict]:
    try:
        import torch
    except ImportError:
        return [{"skipped": "torch is not installed"}]
    from dafar.export.api import graph_module
    from dafar.train.loading import load_dafar

    net, _ = load_dafar(run_dir, m)
    norm = m["input"]["normalization"]
    rows = []
    old = torch.get_num_threads()
    # every (detector, mode) exported, so torch eager is compared with the same graphs
    dets = sorted({(e.get("detector"), e.get("mode") or "hybrid") for e in m.get("exports", {}).values()
                   if e.get("detector")}) or [("l2", "hybrid")]
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for batch in cfg.batches:
            x = torch.from_numpy(np.random.default_rng(0).random((batch, *chw), dtype=np.float32))
            mods = [(f"torch:dafar-{d}" + ("-detect" if mode == "detect" else ""),
                     graph_module(net, Graph.DAFAR, d, InputContract.FLOAT_NCHW, 1.0, norm, mode)) for d, mode in dets]
            mods.append(("torch:victim", graph_module(net, Graph.VICTIM, None, InputContract.FLOAT_NCHW, None, norm)))

            class _T:
                def __init__(self, mod):
                    self.mod = mod

                def call(self):
                    with torch.inference_mode():
                        return self.mod(x)

                def time_once(self):
                    t0 = time.perf_counter()
                    self.call()
                    return 1e3 * (time.perf_counter() - t0)

            timed = [_T(mod) for _, mod in mods]
            times = _measure(timed, cfg)
            vict = float(np.percentile(times[-1], 50))
            for (name, _), ms in zip(mods, times):
                rec = {"model": name, "backend": "torch-eager", "precision": "float32", "threads": threads, "batch": batch,
                       **latency_stats(ms)}
                if name != "torch:victim":
                    rec["fused_to_victim_ratio"] = rec["p50_ms"] / vict
                rows.append(rec)
                log(f"{name} t{threads} b{batch}: p50 {rec['p50_ms']:.3f} ms")
    torch.set_num_threads(old)
    return rows


def _gpu_rows(run_dir: Path, models, exports, cfg: BenchConfig, chw, log) -> list[dict]:
    rows = []
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        rows.append({"skipped": "onnxruntime has no CUDAExecutionProvider on this machine"})
    else:
        for rel in [r for r in models if exports[r]["format"] == "onnx"]:
            for batch in cfg.batches:
                t = _Timed(run_dir, rel, 1, batch, chw, provider="cuda")
                ms = _measure([t], cfg)[0]
                rows.append({"model": rel, "backend": "onnxruntime-cuda", "batch": t.batch, "init_ms": t.init_ms,
                             "first_inference_ms": t.first_ms, **latency_stats(ms)})
                log(f"{rel} cuda b{t.batch}: p50 {rows[-1]['p50_ms']:.3f} ms")
    if cfg.torch:
        try:
            import torch

            if torch.cuda.is_available():
                from dafar.export.api import graph_module
                from dafar.train.loading import load_dafar

                net, m = load_dafar(run_dir)
                net = net.cuda()
                norm = m["input"]["normalization"]
                for batch in cfg.batches:
                    x = torch.rand(batch, *chw, device="cuda")
                    for name, mod in (("torch:dafar-l2", graph_module(net, Graph.DAFAR, Detector.L2, InputContract.FLOAT_NCHW,
                                                                      1.0, norm)),
                                      ("torch:victim", graph_module(net, Graph.VICTIM, None, InputContract.FLOAT_NCHW,
                                                                    None, norm))):
                        mod = mod.cuda().eval()
                        with torch.inference_mode():
                            for _ in range(cfg.warmup):
                                mod(x)
                            torch.cuda.synchronize()
                            ms = []
                            for _ in range(cfg.runs):
                                t0 = time.perf_counter()
                                mod(x)
                                torch.cuda.synchronize()
                                ms.append(1e3 * (time.perf_counter() - t0))
                        rows.append({"model": name, "backend": "torch-cuda", "batch": batch, **latency_stats(ms)})
            else:
                rows.append({"skipped": "torch sees no CUDA device"})
        except ImportError:
            pass
    return rows


def _stage_rows(run_dir: Path, m: dict, models, exports, ratios, cfg: BenchConfig, log) -> dict:
    """Where the time goes (:mod:`dafar.bench.perf.stages`): ONNX Runtime's per-node profile of each
    float ONNX defence graph, LiteRT stage costs from cumulative graphs, and LiteRT's official
    benchmark tool on each TFLite defence graph and its victim, beside our ratio."""
    from .stages import litert_stage_profile, official_tool, onnx_stage_profile

    threads = min(cfg.threads)
    out: dict = {"threads": threads, "onnxruntime": [], "litert": [], "official": []}
    onnx_files = [r for r in models if exports[r]["format"] == "onnx" and exports[r]["graph"] == "dafar"
                  and exports[r].get("precision", "float32") == "float32"]
    for rel in onnx_files:
        try:
            out["onnxruntime"].append(onnx_stage_profile(run_dir, rel, threads, runs=cfg.runs, warmup=cfg.warmup))
        except ImportError as exc:  # the onnx package (to read the graph's scopes) is not on a device install
            out["onnxruntime"] = [{"skipped": f"{exc} (pip install 'dafar[export]')"}]
            break
    kinds = sorted({(exports[r].get("precision", "float32"), exports[r]["contract"]) for r in models
                    if exports[r]["format"] == "tflite"})
    selected = {"exports": {r: exports[r] for r in models}, "input": m["input"]}  # the files asked for only
    for precision, contract in kinds:
        row = litert_stage_profile(run_dir, selected, precision, contract, threads, cfg, log)
        if row is not None:
            out["litert"].append(row)
    pairs = [(r["model"], r["victim"]) for r in ratios
             if r["threads"] == threads and r["batch"] == 1 and r["model"].endswith(".tflite")]
    chw = tuple(m["input"]["shape"])

    def ours(drel: str, vrel: str) -> float:  # our interleaved ratio, measured right after the tool's
        md, mv = _measure([_Timed(run_dir, drel, threads, 1, chw), _Timed(run_dir, vrel, threads, 1, chw)], cfg)
        return float(np.median(md) / np.median(mv))

    for row in official_tool(run_dir, pairs, threads, runs=cfg.runs, warmup=cfg.warmup, rounds=cfg.official_rounds,
                             ours=ours):
        if row.get("official_ratio") is not None and row.get("our_ratio"):
            row["agreement"] = row["official_ratio"] / row["our_ratio"] - 1
            log(f"official tool {row['model']}: ratio {row['official_ratio']:.2f}, ours {row['our_ratio']:.2f}")
        out["official"].append(row)
    return out


def _gpu_readiness(run_dir: Path, m: dict, models, data_dir, log, images: int = 1000, tflite: bool = False) -> dict:
    """The GPU delegate analyzer's verdict per .tflite file and fp16 fidelity of the float graphs
    (:mod:`dafar.bench.perf.gpu_ready`): what can be said about a phone's GPU without one."""
    from .gpu_ready import delegate_verdicts, fp16_fidelity, fp16_tflite_fidelity

    out: dict = {"analyzer": delegate_verdicts(run_dir, models)}
    try:
        import torch  # noqa: F401
    except ImportError:
        out["fp16"] = {"skipped": "torch is not installed (pip install 'dafar[train]')"}
        return out
    try:
        test = RunFolder(run_dir, m).test_set(data_dir, images)
    except Exception as exc:  # no data here (a copied run folder): say so, keep the rest
        out["fp16"] = {"skipped": f"no test images ({type(exc).__name__}: {exc})"}
        return out
    out["fp16"] = {"rows": fp16_fidelity(run_dir, m, test.images, test.labels.astype(np.int64))}
    for r in out["fp16"]["rows"]:
        log(f"fp16 {r['graph']} {r['detector'] or ''} {r['mode'] or ''}: labels agree {100 * r['label_agreement']:.2f}%"
            + (f", decisions {100 * r['decision_agreement']:.2f}%, score drift median {r['score_rel_diff_median']:.1e}"
               if "decision_agreement" in r else ""))
    if tflite:
        try:
            out["fp16_tflite"] = {"rows": fp16_tflite_fidelity(run_dir, m, test.images, test.labels.astype(np.int64), log)}
        except ImportError as exc:  # TensorFlow/onnx2tf (the export extra) missing: say so, keep the rest
            out["fp16_tflite"] = {"skipped": str(exc)}
    return out


@dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured (``RUN/bench/summary.json``) and the report it wrote."""

    run_dir: Path
    summary: dict
    report: Path


def bench(run_dir, cfg: BenchConfig = BenchConfig(), *, data_dir=None, log=print) -> BenchResult:
    """``dafar bench``: :func:`run_bench`, then ``bench_report.md`` with its plots."""
    from .report import write_bench_report

    summary = run_bench(run_dir, cfg, data_dir=data_dir, log=log)
    return BenchResult(Path(run_dir), summary, write_bench_report(run_dir))
