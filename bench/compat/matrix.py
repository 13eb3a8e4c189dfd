"""The compatibility matrix: every exported file of a run on the runtimes our users have.

    python -m dafar.bench.compat.matrix RUN_DIR [--images 1000] [--out DIR] [--envs DIR]

Each runtime runs in its own virtual environment (made once under ``--envs``, default
``~/.cache/dafar/compat``), holding numpy and that runtime only, exactly as a device would, and
runs :mod:`probe` (standalone, no dafar) on the run's first ``--images`` test images: one child
process per file, so a runtime that crashes on one file (a segfault) costs only that cell.
ONNX Runtime for JavaScript runs ``examples/node/classify.js``, the Node client we ship.  A
runtime that cannot be installed here (no network, no node) is skipped with the reason.

Reference per format: ONNX Runtime (this environment's, the version dafar pins) for ``.onnx``,
LiteRT's Interpreter (this environment's) for ``.tflite``.  Per cell: whether the file loaded and
ran, label and decision agreement with the reference, the largest relative score difference and
the share of images whose score is within 1e-3 (relative) of the reference's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dafar.manifest import atomic_write_json, atomic_write_text

__all__ = ["RUNTIMES", "Runtime", "compat_matrix", "write_matrix_report"]

PROBE = Path(__file__).with_name("probe.py")
NODE_CLIENT = Path(__file__).resolve().parents[2] / "examples" / "node" / "classify.js"
SCORE_RTOL = 1e-3  # the bar: relative score difference <= 1e-3 on >= 99.9% of images


@dataclass(frozen=True)
class Runtime:
    key: str  # column name
    probe: str  # probe.py's RUNTIME argument ("node": the Node client)
    formats: tuple[str, ...]
    pip: tuple[str, ...] = ()  # () = this environment
    note: str = ""


RUNTIMES = (
    Runtime("litert-interpreter", "litert", ("tflite",), note="ai-edge-litert (this environment): reference for .tflite"),
    Runtime("litert-compiled", "litert-compiled", ("tflite",), note="ai-edge-litert CompiledModel API (Android's)"),
    Runtime("tflite-runtime-2.14", "tflite_runtime", ("tflite",), ("tflite-runtime==2.14.0", "numpy<2"),
            note="what Raspberry Pi OS users often have"),
    Runtime("onnxruntime", "onnxruntime", ("onnx",), note="this environment's: reference for .onnx"),
    Runtime("onnxruntime-1.16", "onnxruntime", ("onnx",), ("onnxruntime==1.16.3", "numpy<2"),
            note="the oldest our IR-9 files open in"),
    Runtime("openvino", "openvino", ("onnx", "tflite"), ("openvino==2026.4.1",), note="Intel CPUs, f32 precision hint"),
    Runtime("onnxruntime-node", "node", ("onnx",), note="examples/node/classify.js with onnxruntime-node 1.30"),
)


def _env_python(rt: Runtime, envs: Path, log) -> tuple[str | None, str]:
    """(python of a venv holding ``rt``'s packages, or None; why not)."""
    if not rt.pip:
        return sys.executable, ""
    env = envs / rt.key
    py = env / "bin" / "python"
    marker = env / ".installed"
    if marker.is_file() and marker.read_text() == " ".join(rt.pip) and py.exists():
        return str(py), ""
    shutil.rmtree(env, ignore_errors=True)
    log(f"making {env} ({' '.join(rt.pip)}) ...")
    r = subprocess.run([sys.executable, "-m", "venv", str(env)], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *rt.pip],
                           capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return None, f"could not install {' '.join(rt.pip)}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    marker.write_text(" ".join(rt.pip))
    return str(py), ""


def _node_modules(envs: Path, log) -> tuple[str | None, str]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node/npm not installed"
    if not NODE_CLIENT.is_file():
        return None, f"the Node client {NODE_CLIENT} is not in this installation (it ships in the repository)"
    d = envs / "node"
    if not (d / "node_modules" / "onnxruntime-node").is_dir():
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy2(NODE_CLIENT.with_name("package.json"), d / "package.json")
        log(f"npm install onnxruntime-node in {d} ...")
        r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=d, capture_output=True, text=True,
                           timeout=900, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
        if r.returncode != 0:
            return None, f"npm install onnxruntime-node failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return str(d / "node_modules"), ""


def _files(manifest: dict) -> list[tuple[str, dict]]:
    """Every shipped defence or victim file, one fixed-batch TFLite per graph (batch 1 first)."""
    out = []
    for rel, e in sorted(manifest.get("exports", {}).items()):
        if e.get("format") == "tflite" and e.get("batch") not in (1, None):
            continue
        out.append((rel, e))
    return out


def _kind(e: dict, manifest: dict) -> str:
    """What the file is: precision (and int8 layout), format, graph, detector, input contract, the
    graph's output mode (hybrid or detect: the file's own, not the training's) and, in brackets,
    how its weights were trained."""
    training = (manifest.get("training") or {}).get("mode") or manifest.get("mode") or "joint"
    prec = e.get("precision", "float32")
    if prec == "int8" and e.get("layout"):
        prec = f"int8 {e['layout']}"
    parts = [prec, e["format"], e["graph"]]
    if e.get("graph") == "dafar":
        parts += [e.get("detector") or "-", e.get("mode") or "hybrid"]
    parts.append(e["contract"])
    return " ".join(parts) + f" ({training} training)"


def _probe(py: str, rt: Runtime, model: Path, x_path: Path, work: Path, node_modules: str | None,
           manifest_run: Path, rel: str) -> tuple[dict, dict | None]:
    """Run one file on one runtime in a child process: (status, outputs or None)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if rt.probe == "node":
        cmd = ["node", str(NODE_CLIENT), str(manifest_run), str(x_path), "--model", rel, "--json"]
        env = {**os.environ, "NODE_PATH": node_modules or ""}
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            return {"loaded": False, "ran": False, "error": "timed out (900 s)"}, None
        if r.returncode != 0:
            return {"loaded": False, "ran": False, "error": (r.stderr.strip() or f"exit {r.returncode}")[-300:]}, None
        rows = json.loads(r.stdout)["predictions"]
        res = {"label": np.array([p["label"] for p in rows])}
        if rows and "logits" in rows[0]:  # a victim graph: logits instead of a score
            res["logits"] = np.array([p["logits"] for p in rows], np.float32)
        else:  # a NaN score comes back as JSON null
            res["score"] = np.array([np.nan if p["score"] is None else p["score"] for p in rows], np.float32)
            res["rejected"] = np.array([p["rejected"] for p in rows])
        return {"loaded": True, "ran": True, "version": _node_version(node_modules)}, res
    jobs = work / "jobs.json"
    names = _tflite_output_names(model) if model.suffix == ".tflite" else None
    jobs.write_text(json.dumps([{"key": "m", "model": str(model), "input": str(x_path), "names": names}]))
    try:
        r = subprocess.run([py, str(PROBE), rt.probe, str(jobs), str(out)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"loaded": False, "ran": False, "error": "timed out (900 s): a hang"}, None
    st_path = out / "status.json"
    if r.returncode < 0 or not st_path.is_file():
        return {"loaded": False, "ran": False, "error": f"the runtime crashed (exit {r.returncode}): "
                f"{r.stderr.strip()[-300:]}"}, None
    st = json.loads(st_path.read_text())
    rec = st["jobs"].get("m", {"loaded": False, "ran": False, "error": "no result"})
    rec["version"] = st.get("version")
    if r.returncode != 0 and rec.get("ran"):
        rec["note"] = f"exit {r.returncode} after the run"
    res = dict(np.load(out / "m.npz")) if rec.get("ran") else None
    return rec, res


def _tflite_output_names(model: Path) -> dict[str, str]:
    """{tensor name: signature output name} of a .tflite file (OpenVINO sees the tensor names)."""
    from dafar.runtime.backends import LiteRTRunner

    r = LiteRTRunner(model)
    interp = r.interpreter
    by_index = {d["index"]: d["name"] for d in interp.get_output_details()}
    sig = interp.get_signature_runner(LiteRTRunner.SIGNATURE).get_output_details()
    return {by_index[d["index"]]: k for k, d in sig.items() if d["index"] in by_index}


def _node_version(node_modules: str | None) -> str:
    try:
        return json.loads((Path(node_modules) / "onnxruntime-node" / "package.json").read_text())["version"]
    except Exception:  # noqa: BLE001
        return "?"


def _compare(ref: dict, got: dict) -> dict:
    out = {"label_agreement": float(np.mean(np.asarray(got["label"]).astype(np.int64) == ref["label"].astype(np.int64)))}
    if "score" in ref and "score" in got:
        a, b = ref["score"].astype(np.float64), np.asarray(got["score"]).astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(b)
        rel = np.where(both_nan, 0.0, np.abs(a - b) / np.maximum(np.abs(a), 1e-12))
        out.update({"decision_agreement": float(np.mean(np.asarray(got["rejected"]).astype(bool) == ref["rejected"].astype(bool))),
                    "score_rel_max": float(np.nanmax(rel)) if rel.size else 0.0,
                    "score_within_1e-3": float(np.mean(rel <= SCORE_RTOL)),
                    "worst_image": int(np.nanargmax(rel)) if rel.size else -1})
    elif "logits" in ref and "logits" in got:
        out["logits_abs_max"] = float(np.max(np.abs(ref["logits"] - np.asarray(got["logits"]))))
    return out


def compat_matrix(run_dir, *, images: int = 1000, envs=None, runtimes=RUNTIMES, data_dir=None, log=print) -> dict:
    """Run every exported file of ``run_dir`` on every runtime; the results as a dict (also
    written by :func:`write_matrix_report`)."""
    from dafar.run import RunFolder
    from dafar.schema import InputContract

    run = RunFolder.open(run_dir)
    m = run.manifest
    envs = Path(envs or Path.home() / ".cache" / "dafar" / "compat")
    envs.mkdir(parents=True, exist_ok=True)
    test = run.test_set(data_dir, limit=images)
    files = _files(m)
    res: dict = {"run": str(run.path), "images": int(len(test.images)), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "machine": _machine(), "runtimes": {}, "files": {}}
    with tempfile.TemporaryDirectory(prefix="dafar-compat-") as tmp:
        tmp = Path(tmp)
        inputs = {}
        for c in InputContract:
            p = tmp / f"x-{c.value}.npy"
            np.save(p, c.from_pixels(test.images))
            inputs[c.value] = p
        envs_ok = {}
        node_modules = None
        for rt in runtimes:
            if rt.probe == "node":
                node_modules, why = _node_modules(envs, log)
                py = "node" if node_modules else None
            else:
                py, why = _env_python(rt, envs, log)
            envs_ok[rt.key] = py
            res["runtimes"][rt.key] = {"note": rt.note, "pip": list(rt.pip), "skipped": why or None}
        refs: dict[str, dict] = {}
        for rel, e in files:
            row = {"kind": _kind(e, m), "cells": {}}
            res["files"][rel] = row
            for rt in runtimes:
                if e["format"] not in rt.formats:
                    continue
                if envs_ok[rt.key] is None:
                    row["cells"][rt.key] = {"skipped": res["runtimes"][rt.key]["skipped"]}
                    continue
                work = tmp / "w"
                work.mkdir(exist_ok=True)
                st, out = _probe(envs_ok[rt.key], rt, run.path / rel, inputs[e["contract"]], work, node_modules, run.path, rel)
                res["runtimes"][rt.key].setdefault("version", st.get("version"))
                cell = {k: st.get(k) for k in ("loaded", "ran", "error", "note") if st.get(k) is not None}
                if out is not None:
                    if rt.key in ("litert-interpreter", "onnxruntime"):
                        refs[rel] = out
                    ref = refs.get(rel)
                    if ref is not None:
                        cell.update(_compare(ref, out))
                    cell["label_dtype"] = str(np.asarray(out["label"]).dtype)
                row["cells"][rt.key] = cell
                log(f"{rel} on {rt.key}: " + ("ok" if cell.get("ran") else f"FAILED {cell.get('error', '')[:120]}"))
    return res


def _machine() -> str:
    import platform

    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def write_matrix_report(res: dict, out_dir, cmd: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "matrix.json", res)
    rts = [k for k in res["runtimes"]]
    L = ["# Compatibility matrix", "",
         f"Reproduce: `{cmd}` (started {res['started']}, {res['machine']}). {res['images']} test images per file, batch "
         "of the file (TFLite: 1), one thread.", "",
         "Each runtime ran in its own virtual environment holding only numpy and that runtime. Reference: ONNX Runtime "
         "(the version dafar pins) for `.onnx`, LiteRT's Interpreter for `.tflite`. A cell: `labels / decisions agreeing "
         f"with the reference, share of scores within {SCORE_RTOL:g} relative, largest relative score difference`; "
         "victim graphs show label agreement and the largest logit difference.", "",
         "| runtime | version | note |", "|---|---|---|"]
    for k in rts:
        r = res["runtimes"][k]
        L.append(f"| {k} | {r.get('version') or '-'} | {r['note']}{'; SKIPPED: ' + r['skipped'] if r.get('skipped') else ''} |")
    L += ["", "| file | kind | " + " | ".join(rts) + " |", "|---|---|" + "---|" * len(rts)]
    for rel, row in res["files"].items():
        cells = []
        for k in rts:
            c = row["cells"].get(k)
            if c is None:
                cells.append("n/a")
            elif c.get("skipped"):
                cells.append("skipped")
            elif not c.get("ran"):
                cells.append(f"**FAILS**{' to load' if not c.get('loaded') else ''}: {str(c.get('error', ''))[:90]}")
            elif "decision_agreement" in c:
                cells.append(f"{100 * c['label_agreement']:.1f}% / {100 * c['decision_agreement']:.1f}%, "
                             f"{100 * c['score_within_1e-3']:.1f}%, {c['score_rel_max']:.1e}")
            elif "logits_abs_max" in c:
                cells.append(f"{100 * c['label_agreement']:.1f}%, logits {c['logits_abs_max']:.1e}")
            else:
                cells.append("ran")
        L.append(f"| `{Path(rel).name}` | {row['kind']} | " + " | ".join(cells) + " |")
    L[2:2] = _summary_lines(res, rts)
    # matrix.md, not README.md: a results folder's README holds the findings someone wrote about
    # the table, and regenerating the table must not erase them
    path = out / "matrix.md"
    atomic_write_text(path, "\n".join(L) + "\n")
    return path


def _summary_lines(res: dict, rts: list[str]) -> list[str]:
    """Per runtime, over every defence file it read: how many ran, the lowest label and decision
    agreement, the lowest share of scores within SCORE_RTOL and the largest difference, so the
    issue's bar (decisions identical, >= 99.9% of scores within 1e-3) is read off one table."""
    L = ["Per runtime, over every file it reads (the decision and score columns: defence files; victims add their labels):", "",
         "| runtime | files run | lowest label agreement | lowest decision agreement | "
         f"lowest share of scores within {SCORE_RTOL:g} | largest score difference | meets the bar |",
         "|---|---|---|---|---|---|---|"]
    for k in rts:
        cells = [(rel, row["cells"][k]) for rel, row in res["files"].items() if k in row["cells"]]
        if not cells:
            continue
        ran = [c for _, c in cells if c.get("ran")]
        skipped = [c for _, c in cells if c.get("skipped")]
        if len(skipped) == len(cells):
            L.append(f"| {k} | skipped | - | - | - | - | - |")
            continue
        lab = min((c["label_agreement"] for c in ran if "label_agreement" in c), default=None)
        dec = [c for c in ran if "decision_agreement" in c]
        dmin = min((c["decision_agreement"] for c in dec), default=None)
        wmin = min((c["score_within_1e-3"] for c in dec), default=None)
        smax = max((c["score_rel_max"] for c in dec), default=None)
        ok = len(ran) == len(cells) and (dmin is None or dmin == 1.0) and (wmin is None or wmin >= 0.999)
        pct = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
        L.append(f"| {k} | {len(ran)} of {len(cells)} | {pct(lab)} | {pct(dmin)} | {pct(wmin)} | "
                 f"{'-' if smax is None else f'{smax:.1e}'} | {'yes' if ok else '**no**'} |")
    return L + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dafar.bench.compat.matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--out", default=None, help="folder for matrix.json and matrix.md (default: RUN/compat)")
    p.add_argument("--envs", default=None, help="where the runtimes' virtual environments live")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", default=None, help="comma list of runtimes (default: all)")
    a = p.parse_args(argv)
    rts = RUNTIMES if not a.only else tuple(r for r in RUNTIMES if r.key in a.only.split(","))
    res = compat_matrix(a.run, images=a.images, envs=a.envs, runtimes=rts, data_dir=a.data_dir)
    cmd = "python -m dafar.bench.compat.matrix RUN_DIR" + (f" --images {a.images}" if a.images != 1000 else "") + (
        f" --only {a.only}" if a.only else "")
    path = write_matrix_report(res, a.out or Path(a.run) / "compat", cmd)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
