"""Where the time goes: the defence's cost per stage (preprocessing, E, F, D, C, the score, the
purification pass E and F again), and the official LiteRT benchmark tool beside ours.

* **ONNX Runtime, per node**: the float ONNX graph is run with ONNX Runtime's profiler on; every
  node's kernel time is attributed to the stage whose module produced it.  The exporter records
  each node's module path (``pkg.torch.onnx.name_scopes``: ``E``, ``F``, ``D``, ``C``, ``pre``);
  E and F nodes that come after D in the graph are the purification pass; the rest is the score,
  the decision and the label.  Nodes ONNX Runtime fuses or inserts are matched by the names it
  gives them (``fused <node>``, ``<output>_nchwc``; its layout reorders are their own row).
* **LiteRT, by sub-graph**: a .tflite file is one fused graph the Python API cannot profile per
  op, so the stages come from timing, interleaved, graphs that each add one stage to the previous:
  the victim (E + F), the detect graph (+ D and the score), the hybrid graph (+ the purification
  pass), and the autoencoder graph (+ C); without a detect graph, D, the score and the
  purification pass stay one row.  A stage's cost is a difference of medians, so it
  can come out slightly negative for a stage that costs next to nothing.
* **The official tool**: ``benchmark_litert_model.py`` (shipped in the ai-edge-litert wheel; it
  runs the CompiledModel API, CPU) on each TFLite defence graph and its victim, alternating; its
  defence/victim ratio beside ours (the Interpreter API, interleaved): they should agree within 10%.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["STAGES", "onnx_node_stages", "onnx_stage_profile", "litert_stage_profile", "official_tool"]

STAGES = ("preprocess", "E", "F", "D", "C", "score and decision", "purification (E, F again)", "label",
          "layout (ORT-inserted)", "unattributed")


def onnx_node_stages(path) -> dict[str, str]:
    """{node name or output name: stage} for an exported ONNX graph (see the module docstring)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, str] = {}
    seen_d = False
    for n in model.graph.node:
        md = {p.key: p.value for p in n.metadata_props}
        try:
            scopes = ast.literal_eval(md.get("pkg.torch.onnx.name_scopes", "[]"))  # a list literal, never code
        except (ValueError, SyntaxError):
            scopes = []
        top = scopes[1] if len(scopes) > 1 else ""
        if top == "D":
            seen_d, stage = True, "D"
        elif top in ("E", "F"):
            stage = "purification (E, F again)" if seen_d else top
        elif top == "C":
            stage = "C"
        elif top == "pre":
            stage = "preprocess"
        elif n.op_type == "ArgMax":
            stage = "label"
        elif not scopes:
            stage = "unattributed"  # a graph written by another tool (an int8 rewrite) keeps no scopes
        else:
            stage = "score and decision"
        out[n.name] = stage
        for o in n.output:
            out.setdefault(o, stage)
    return out


def _stage_of(name: str, stages: dict[str, str]) -> str:
    if name.startswith("Reorder"):
        return "layout (ORT-inserted)"
    base = name[len("fused "):] if name.startswith("fused ") else name
    base = base[: -len("_nchwc")] if base.endswith("_nchwc") else base
    for cand in (name, base, "node_" + base):
        if cand in stages:
            return stages[cand]
    return "unattributed"


def onnx_stage_profile(run_dir, rel: str, threads: int = 1, runs: int = 200, warmup: int = 20) -> dict:
    """Per-stage kernel time (microseconds per inference) of ``rel`` under ONNX Runtime's profiler,
    with the whole run's time beside it (the difference is the executor's own overhead)."""
    from dafar.runtime import Defence
    from dafar.runtime.backends import OnnxRuntimeRunner

    path = Path(run_dir) / rel
    d = Defence(run_dir, rel, threads=threads)  # verifies the file's hash and gives its input spec
    c, h, w = d.chw
    rng = np.random.default_rng(0)
    b = d.batch or 1
    x = rng.integers(0, 256, (b, h, w, c), dtype=np.uint8) if d.input_dtype == np.uint8 else \
        rng.random((b, c, h, w), dtype=np.float32)
    stages = onnx_node_stages(path)
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxRuntimeRunner(path, threads, "cpu", profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(warmup + runs):
            runner.invoke(x)
        events = json.loads(runner.end_profiling().read_text())
    # the warm-up runs are in the trace too: count only what starts after the last of them ends
    run_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                    key=lambda e: e["ts"])
    start = run_ev[warmup - 1]["ts"] + run_ev[warmup - 1]["dur"] if warmup and len(run_ev) > warmup else 0
    per: dict[str, float] = {s: 0.0 for s in STAGES}
    nodes: dict[str, float] = {}
    total = 0.0
    n_runs = 0
    for e in events:
        if e.get("ts", 0) < start:
            continue
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per[_stage_of(name, stages)] += float(e["dur"])
            nodes[name] = nodes.get(name, 0.0) + float(e["dur"])
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            total += float(e["dur"])
            n_runs += 1
    n_runs = max(n_runs, 1)
    per_us = {k: v / n_runs for k, v in per.items() if v > 0}
    return {"model": rel, "backend": "onnxruntime", "threads": threads, "batch": b, "runs": n_runs,
            "stage_us": per_us, "kernels_us": sum(per_us.values()), "run_us": total / n_runs,
            "nodes": len(nodes)}


def litert_stage_profile(run_dir, m: dict, precision: str, contract: str, threads: int, cfg, log=print) -> dict | None:
    """Stages of the .tflite graphs of one precision and input contract from interleaved timings of
    cumulative graphs (victim; l2 detect; l2 hybrid; autoencoder detect).  None when the run lacks
    the victim or the l2 detect graph of that kind."""
    from .harness import _measure, _Timed

    chw = tuple(m["input"]["shape"])
    files: dict[tuple, str] = {}
    for rel, e in m.get("exports", {}).items():
        if e["format"] != "tflite" or e.get("precision", "float32") != precision or e["contract"] != contract:
            continue
        files[(e["graph"], e.get("detector"), (e.get("mode") or "hybrid") if e["graph"] == "dafar" else None)] = rel
    victim = files.get(("victim", None, None))
    detect, hybrid = files.get(("dafar", "l2", "detect")), files.get(("dafar", "l2", "hybrid"))
    if victim is None or (detect is None and hybrid is None):
        return None
    order = [("victim", victim)] + [(n, r) for n, r in (("l2 detect", detect), ("l2 hybrid", hybrid)) if r]
    ae_detect, ae_hybrid = files.get(("dafar", "autoencoder", "detect")), files.get(("dafar", "autoencoder", "hybrid"))
    if ae_detect and detect:
        order.append(("autoencoder detect", ae_detect))
    elif ae_hybrid and hybrid:
        order.append(("autoencoder hybrid", ae_hybrid))
    timed = [_Timed(Path(run_dir), rel, threads, 1, chw) for _, rel in order]
    times = _measure(timed, cfg)
    p50 = {name: float(np.percentile(t, 50)) for (name, _), t in zip(order, times)}
    stages = {"E + F (the victim)": p50["victim"]}
    if detect:
        stages["D + score and decision"] = p50["l2 detect"] - p50["victim"]
        if hybrid:
            stages["purification (E, F again)"] = p50["l2 hybrid"] - p50["l2 detect"]
    else:  # no detect graph exported: D, the score and the purification pass stay together
        stages["D + score + purification"] = p50["l2 hybrid"] - p50["victim"]
    if "autoencoder detect" in p50:
        stages["C"] = p50["autoencoder detect"] - p50["l2 detect"]
    elif "autoencoder hybrid" in p50:
        stages["C"] = p50["autoencoder hybrid"] - p50["l2 hybrid"]
    log(f"litert stages {precision} {contract} t{threads}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in stages.items()))
    return {"backend": "litert", "precision": precision, "contract": contract, "threads": threads,
            "graphs": {name: rel for name, rel in order}, "p50_ms": p50, "stage_ms": stages}


def _official_once(path: Path, threads: int, runs: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model", f"--model={path}",
               f"--num_threads={threads}", f"--num_runs={runs}", f"--warmup_runs={warmup}", f"--result_json={out}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0 or not out.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"benchmark_litert_model exited {p.returncode}: {tail[0]}")
        return json.loads(out.read_text())["latency"]


def official_tool(run_dir, pairs: list[tuple[str, str]], threads: int = 1, runs: int = 100, warmup: int = 10,
                  rounds: int = 2, ours=None) -> list[dict]:
    """LiteRT's own ``benchmark_litert_model.py`` on each (defence, victim) pair of .tflite files,
    alternating defence and victim ``rounds`` times.  Each round gives one official ratio (its
    defence median over its victim median) and, with ``ours(defence, victim) -> ratio``, one of
    ours measured right after it, so both see the same minutes of a noisy machine; the row holds
    the per-round ratios and their medians."""
    import importlib.util

    try:  # (find_spec of a dotted name imports its parents: without ai_edge_litert it raises)
        tool = importlib.util.find_spec("ai_edge_litert.tools.benchmark_litert_model")
    except (ImportError, ValueError):
        tool = None
    if tool is None:
        return [{"skipped": "ai-edge-litert's benchmark_litert_model.py is not installed (ai-edge-litert >= 2.1)"}]
    rows = []
    for drel, vrel in pairs:
        med_d, med_v, off_r, our_r = [], [], [], []
        try:
            for _ in range(rounds):
                med_d.append(_official_once(Path(run_dir) / drel, threads, runs, warmup)["median_ms"])
                med_v.append(_official_once(Path(run_dir) / vrel, threads, runs, warmup)["median_ms"])
                if med_v[-1] > 0:
                    off_r.append(med_d[-1] / med_v[-1])
                if ours is not None:
                    our_r.append(float(ours(drel, vrel)))
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as exc:
            rows.append({"model": drel, "victim": vrel, "error": f"{type(exc).__name__}: {exc}"})
            continue
        d, v = float(np.median(med_d)), float(np.median(med_v))
        row = {"model": drel, "victim": vrel, "threads": threads, "official_median_ms": d,
               "official_victim_median_ms": v, "official_ratio": float(np.median(off_r)) if off_r else None,
               "official_ratios": off_r, "rounds": rounds, "runs": runs}
        if our_r:
            row.update({"our_ratio": float(np.median(our_r)), "our_ratios": our_r})
        rows.append(row)
    return rows
