"""One table of a run's headline numbers, gathered from what each stage wrote.

``dafar summary RUN_DIR`` reads the manifest, ``metrics.json``, ``quantize_report.json``,
``bench/summary.json`` and ``eval/summary.json`` (whichever exist; a stage not run yet is left
out) and prints the numbers a user compares against the paper: accuracy, false-positive rates,
export parity, what int8 costs, latency, detection and the adaptive attack.  It computes
nothing new, so it never disagrees with the stage reports; it only picks from them, and every
line names the stage report that holds the details.  Standard library only (runs on a Pi).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dafar.errors import RunFolderError
from dafar.manifest import dataset_label, read_manifest
from dafar.schema import Detector, InputContract, Mode

__all__ = ["summarize", "render_markdown", "collect"]

# What ``collect`` gathers: the stage reports, the plots they show and the records behind them.
REPORTS = ("report.md", "quantize_report.md", "bench_report.md", "eval_report.md", "reliability_report.md")
RECORDS = ("manifest.json", "metrics.json", "quantize_report.json", "bench/summary.json", "eval/summary.json",
           "reliability/summary.json")

# The paper's numbers (SPEC.md), shown beside ours.
PAPER = {
    "mnist": {"victim": "99.24% (victim alone 99.14%)", "fpr": "0.16%", "purified": "99.04%"},
    "cifar10": {"victim": "86.17%", "fpr": "3.49%", "purified": "-"},
}


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RunFolderError(f"{path} is not valid JSON ({exc}); rerun the stage that writes it") from exc


def _pct(v, d=2) -> str:
    return "-" if v is None else f"{100 * v:.{d}f}%"


def _span(vals, fmt) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)} to {fmt(hi)}"


def _training(m: dict, met: dict) -> dict:
    out = {"victim_test_acc": met.get("victim_test_acc"), "victim_only_test_acc": met.get("victim_only_test_acc"),
           "purified_test_acc": met.get("purified_test_acc"), "test_images": met.get("test_images"),
           "total_seconds": met.get("timing", {}).get("total_seconds"), "thresholds": {}}
    cfg = m.get("training", {}).get("config", {})
    out["mode"] = m.get("training", {}).get("mode") or "joint"  # "plug-in": D (and C) on a frozen classifier
    out["attached_to"] = (m.get("training", {}).get("attached_to") or {}).get("source")
    out["feedback_at"] = m.get("architecture", {}).get("feedback_at")
    out["epochs"] = {"joint": cfg.get("epochs"), "detector": cfg.get("detector_epochs") if cfg.get("detector") else 0,
                     "victim_only": cfg.get("epochs") if cfg.get("train_victim") else 0}
    parent = m.get("training", {}).get("init_from") or met.get("timing", {}).get("init_from")
    if parent:  # continued from another run (--init-from): count the whole training
        out["continued_from"] = {"epochs": parent.get("epochs_total"), "seconds": parent.get("total_seconds"),
                                 "victim_test_acc": parent.get("victim_test_acc"), "mode": parent.get("mode")}
    attached = m.get("training", {}).get("attached_to") or {}
    if attached.get("mode") == "classifier":  # D attached to a classifier dafar trained alone: count both
        out["classifier"] = {"epochs": attached.get("epochs"), "seconds": attached.get("total_seconds")}
    for det, t in m.get("thresholds", {}).items():
        rules = t.get("rules", {})
        out["thresholds"][det] = {"default": t.get("default"),
                                  **{name: {"alpha": r.get("alpha"), "val_fpr": r.get("calib_fpr"), "test_fpr": r.get("test_fpr")}
                                     for name, r in rules.items()}}
    return out


def _export(m: dict) -> dict | None:
    # float exports only: an int8 file's validation compares it with its float source (see _quantize)
    vals = [e["validation"] for e in m.get("exports", {}).values()
            if isinstance(e.get("validation"), dict) and e.get("precision", "float32") != "int8"]
    if not vals:
        return None
    return {"files": len(vals), "images": min(v.get("images", 0) for v in vals),
            "label_agreement_min": min(v.get("label_agreement", 1.0) for v in vals),
            "decision_agreement_min": min((v["rejected_agreement"] for v in vals if "rejected_agreement" in v), default=None),
            "score_rel_err_median_max": max((v["score_rel_err_median"] for v in vals if "score_rel_err_median" in v), default=None),
            "score_rel_err_max": max((v["score_rel_err_max"] for v in vals if "score_rel_err_max" in v), default=None)}


def _quantize(q: dict | None) -> dict | None:
    if not q:
        return None
    dafar = [r["metrics"] for r in q.get("models", []) if r.get("graph") == "dafar"]
    victim = [r["metrics"] for r in q.get("models", []) if r.get("graph") == "victim"]
    if not dafar and not victim:
        return None
    allm = dafar + victim
    return {"models": len(allm), "layout": q.get("config", {}).get("layout"),
            "images": min(r.get("images", 0) for r in allm),
            "victim_acc_change_points": [100 * (r["victim_acc_int8"] - r["victim_acc_float"]) for r in allm
                                         if "victim_acc_int8" in r],
            "purified_acc_change_points": [100 * (r["purified_acc_int8"] - r["purified_acc_float"]) for r in dafar
                                           if "purified_acc_int8" in r],
            "top1_agreement": [r.get("victim_label_agreement", r.get("label_agreement")) for r in allm],
            "decision_agreement": [r["decision_agreement"] for r in dafar if "decision_agreement" in r],
            "fpr_float": [r["fpr_float"] for r in dafar if "fpr_float" in r],
            "fpr_int8": [r["fpr_int8"] for r in dafar if "fpr_int8" in r],
            "size_ratio": [r["size_ratio"] for r in allm if "size_ratio" in r]}


def _bench(b: dict | None) -> dict | None:
    if not b:
        return None
    rows = {}
    for r in b.get("records", []):
        if r.get("batch") != 1 or "p50_ms" not in r:
            continue
        # records made before output modes existed are hybrid defence graphs
        mode = (r.get("mode") or Mode.HYBRID.value) if r.get("graph") == "dafar" else None
        key = (r.get("backend"), r.get("precision"), r.get("graph"), r.get("detector"), mode, r.get("contract"),
               r.get("threads"))
        rows[key] = r["p50_ms"]
    out = []
    for backend in ("litert", "onnxruntime"):
        for threads in sorted({k[6] for k in rows}):
            for det in (d.value for d in Detector):
                for mode in (m.value for m in Mode):
                    for contract in (InputContract.UINT8_NHWC.value, InputContract.FLOAT_NCHW.value):
                        f = rows.get((backend, "float32", "dafar", det, mode, contract, threads))
                        q = rows.get((backend, "int8", "dafar", det, mode, contract, threads))
                        fv = rows.get((backend, "float32", "victim", None, None, contract, threads))
                        qv = rows.get((backend, "int8", "victim", None, None, contract, threads))
                        if f is None and q is None:
                            continue
                        out.append({"backend": backend, "threads": threads, "detector": det, "mode": mode,
                                    "contract": contract, "defence_float_ms": f, "defence_int8_ms": q,
                                    "victim_float_ms": fv, "victim_int8_ms": qv})
                        break  # one input contract per (backend, threads, detector, mode): the first that exists
    ratios = [r for r in b.get("ratios", []) if r.get("threads") == 1 and r.get("batch") == 1
              and "-int8" not in r.get("model", "") and r.get("model", "").endswith(".tflite")]
    return {"latency": out, "mac_ratio": [(r["model"], r["latency_ratio"], r["mac_ratio"]) for r in ratios],
            "machine": b.get("machine", {}).get("cpu")}


def _eval(s: dict | None) -> dict | None:
    if not s:
        return None
    recs = [r for r in s.get("records", []) if r.get("setting", "gray-box") == "gray-box" and r.get("format", "torch") == "torch"]
    dafar = sorted({r["model"] for r in recs if r.get("family") == "dafar"})
    per = {}
    for r in recs:
        per.setdefault(r["attack"], {})[r["model"]] = r
    table = []
    for atk, by in per.items():
        any_r = next(iter(by.values()))
        table.append({"attack": atk, "eps": any_r.get("eps"), "victim_accuracy": any_r.get("victim_accuracy"),
                      "detection": {m: by[m].get("detection_rate") for m in by},
                      "hybrid": {m: by[m].get("hybrid_accuracy") for m in by}})
    ad = s.get("adaptive", {})
    adaptive = None
    if ad.get("methods"):
        adaptive = {"eps": ad.get("eps"), "images": ad.get("images"), "steps": ad.get("steps"), "restarts": ad.get("restarts"),
                    "success": {m: [row["attack_success"] for row in rows] for m, rows in ad["methods"].items()}}
    return {"dafar_models": dafar, "clean": s.get("clean", {}), "table": table, "adaptive": adaptive,
            "minutes": (s.get("timing", {}).get("total_s") or 0) / 60}


def summarize(run_dir: str | os.PathLike) -> dict:
    """The headline numbers of run folder ``run_dir`` as a dict (stages not run are None)."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    met = _json(run_dir / "metrics.json") or m.get("metrics", {})
    return {"run": str(run_dir), "dataset": m.get("dataset", {}).get("name"), "label": dataset_label(m),
            "provenance": m.get("provenance"),
            "training": _training(m, met), "export": _export(m), "quantize": _quantize(_json(run_dir / "quantize_report.json")),
            "bench": _bench(_json(run_dir / "bench" / "summary.json")), "eval": _eval(_json(run_dir / "eval" / "summary.json"))}


def render_markdown(d: dict) -> str:
    from dafar.train.attacks import attack_label, eps_label

    paper = PAPER.get(d["dataset"], {})
    t = d["training"]
    plugin, alone = t.get("mode") == "plug-in", t.get("mode") == "classifier"
    how = (f"`{t.get('attached_to')}`, frozen; D attached at {t.get('feedback_at')}" if plugin
           else "a classifier alone, no defence yet: `dafar attach --victim RUN`" if alone else "trained with D")
    L = [f"# {d['label']}: headline numbers of `{d['run']}`", "",
         "| | ours | paper |", "|---|---|---|",
         f"| victim test accuracy ({how}), {t.get('test_images')} test images | {_pct(t['victim_test_acc'])} | {paper.get('victim', '-')} |"]
    if t.get("victim_only_test_acc") is not None:
        L.append(f"| victim-only model, same schedule | {_pct(t['victim_only_test_acc'])} | |")
    if not alone:
        L.append(f"| purified accuracy F(E(D(E(x)))) | {_pct(t['purified_test_acc'])} | {paper.get('purified', '-')} |")
    for det, th in t["thresholds"].items():
        default = th.get("default")
        for name, r in th.items():
            if name == "default" or not isinstance(r, dict):
                continue
            star = " (default)" if name == default else ""
            L.append(f"| {det} score, rule {name}{star}: alpha / FPR validation / FPR test | "
                     f"{r['alpha']:.4g} / {_pct(r['val_fpr'])} / {_pct(r['test_fpr'])} | "
                     f"{paper.get('fpr', '-') if name == default else ''} |")
    if t.get("total_seconds") and alone:
        L.append(f"| training: classifier epochs, time | {t['epochs']['joint']}, {t['total_seconds'] / 3600:.2f} h | |")
    elif t.get("total_seconds"):
        ep, cont = t["epochs"], t.get("continued_from") or t.get("classifier")
        joint = (f"{ep['joint']} (+{cont['epochs']} of the "
                 f"{'classifier, trained alone' if t.get('classifier') or cont.get('mode') == 'classifier' else 'run it continued'})"
                 if cont else ep["joint"])
        hours = t["total_seconds"] / 3600 + (cont["seconds"] / 3600 if cont else 0)
        L.append(f"| training: {'D (plug-in)' if plugin else 'joint'} / C / victim-only epochs, time | {joint} / "
                 f"{ep['detector']} / {ep['victim_only']}, "
                 f"{hours:.2f} h{' in all' if cont else ''} | |")
    e = d.get("export")
    if e:
        L.append(f"| export parity vs torch ({e['files']} files, {e['images']} images; `report.md`) | labels >= {_pct(e['label_agreement_min'])}, "
                 f"decisions >= {_pct(e['decision_agreement_min'])}, score rel. error median <= {e['score_rel_err_median_max']:.1e}, "
                 f"max {e['score_rel_err_max']:.1e} | |")
    q = d.get("quantize")
    if q:
        L += [f"| int8 ({q['models']} files, `{q['layout']}` layout, {q['images']} test images; `quantize_report.md`): victim accuracy change | "
              f"{_span(q['victim_acc_change_points'], lambda v: f'{v:+.2f} pts')} | |",
              f"| int8: purified accuracy change / top-1 agreement | {_span(q['purified_acc_change_points'], lambda v: f'{v:+.2f} pts')} / "
              f"{_span(q['top1_agreement'], lambda v: _pct(v))} | |",
              f"| int8: reject decisions agree / FPR float -> int8 | {_span(q['decision_agreement'], lambda v: _pct(v))} / "
              f"{_span(q['fpr_float'], lambda v: _pct(v))} -> {_span(q['fpr_int8'], lambda v: _pct(v))} | |",
              f"| int8 file size (of float) | {_span(q['size_ratio'], lambda v: f'{100 * v:.0f}%')} | |"]
    b = d.get("bench")
    if b:
        def ms(v):
            return "-" if v is None else f"{v:.3f}"

        L += ["", f"Latency, batch 1, p50 ms on {b.get('machine') or 'this machine'} (`bench_report.md`):", "",
              "| backend | threads | detector | mode | input | defence float | defence int8 | victim float | victim int8 | int8 speed-up (defence) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["latency"]:
            f, q = r["defence_float_ms"], r["defence_int8_ms"]
            L.append(f"| {r['backend']} | {r['threads']} | {r['detector']} | {r.get('mode', 'hybrid')} | {r['contract']} | {ms(f)} | {ms(q)} | "
                     f"{ms(r['victim_float_ms'])} | {ms(r['victim_int8_ms'])} | {'-' if not f or not q else f'{f / q:.2f}x'} |")
        if b["mac_ratio"]:
            L += ["", "Defence / victim latency against the MAC ratio (LiteRT float, 1 thread): "
                  + "; ".join(f"`{Path(mo).name}` {lr:.2f} vs {mr:.2f}" for mo, lr, mr in b["mac_ratio"]) + "."]
    ev = d.get("eval")
    if ev:
        models = ev["dafar_models"]
        L += ["", f"Gray-box detection at alpha and hybrid accuracy on a 1:1 clean/adversarial mix "
                  f"(`eval_report.md`; {ev['minutes']:.0f} min):", "",
              "| attack | victim acc | " + " | ".join(f"{m}: detected / hybrid" for m in models) + " |",
              "|---|---|" + "---|" * len(models)]
        for r in ev["table"]:
            L.append(f"| {attack_label(r['attack'])} | {_pct(r['victim_accuracy'], 1)} | "
                     + " | ".join(f"{_pct(r['detection'].get(m), 1)} / {_pct(r['hybrid'].get(m), 1)}" for m in models) + " |")
        ad = ev.get("adaptive")
        if ad:
            L += ["", f"White-box adaptive PGD, attack success ({ad['images']} images, {ad['steps']} steps, "
                      f"{ad['restarts']} starts):", "",
                  "| method | " + " | ".join(eps_label(e) for e in ad["eps"]) + " |", "|---|" + "---|" * len(ad["eps"])]
            for mname, succ in ad["success"].items():
                L.append(f"| {mname} | " + " | ".join(_pct(v, 0) for v in succ) + " |")
    return "\n".join(L) + "\n"


def collect(run_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy run ``run_dir``'s reports, the plots they link and the JSON records behind them into
    ``dest`` (replacing what an earlier collect put there) and write ``summary.md``: the reports of
    a run that took hours to make, kept where a reader finds them (e.g. ``bench/results/cifar10``).
    Returns the copied paths, relative to ``dest``."""
    import re
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    d = summarize(run_dir)  # refuses a folder that is not a run before touching dest
    d["run"] = run_dir.resolve().name  # the committed copy names the run folder, not this machine's path
    text = render_markdown(d)
    if dest.exists():
        if not dest.is_dir() or any(p.name not in {*REPORTS, "summary.md", "plots", "records"} for p in dest.iterdir()):
            raise RunFolderError(f"{dest} holds files collect did not write; name an empty or earlier collect folder")
        shutil.rmtree(dest)
    (dest / "records").mkdir(parents=True)
    copied = []
    for name in REPORTS:
        src = run_dir / name
        if not src.is_file():
            continue
        body = src.read_text(encoding="utf-8")
        for rel in sorted(set(re.findall(r"\]\((plots/[^)\s]+\.png)\)", body))):
            if (run_dir / rel).is_file() and not (dest / rel).exists():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / rel, dest / rel)
                copied.append(rel)
        shutil.copyfile(src, dest / name)
        copied.append(name)
    for rel in RECORDS:
        if (run_dir / rel).is_file():
            target = dest / "records" / rel.replace("/", "-")
            shutil.copyfile(run_dir / rel, target)
            copied.append(str(target.relative_to(dest)))
    (dest / "summary.md").write_text(text, encoding="utf-8")
    return sorted(copied) + ["summary.md"]
