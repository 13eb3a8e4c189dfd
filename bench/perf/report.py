"""``RUN/bench_report.md`` and its plots, from ``RUN/bench/summary.json`` and the per-record JSONs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dafar.manifest import atomic_write_text, dataset_label, read_manifest
from dafar.options import to_argv

__all__ = ["write_bench_report", "summary_section"]


def _f(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def _short(rel: str) -> str:
    return Path(rel).name


def _plots(run_dir: Path, s: dict) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # a device install may lack matplotlib: tables only
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    recs = []
    for p in sorted((run_dir / "bench").glob("*__t*__b*.json")):
        recs.append(json.loads(p.read_text()))
    t1 = [r for r in recs if r["threads"] == min(x["threads"] for x in recs)] if recs else []
    if t1:
        t1.sort(key=lambda r: (r["graph"], r["format"], r["precision"], r["model"]))
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(t1)), 5))
        ax.boxplot([r["samples_ms"] for r in t1], showfliers=False)
        ax.set_xticks(range(1, len(t1) + 1), [_short(r["model"]).replace("dafar-", "") for r in t1], rotation=70,
                      ha="right", fontsize=7)
        ax.set_ylabel("latency per call (ms)")
        ax.set_title(f"Latency distributions, {t1[0]['threads']} thread(s) (box: p25-p75, whiskers 1.5 IQR)")
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / "bench_latency.png", dpi=100)
        plt.close(fig)
        made.append("plots/bench_latency.png")
    st = s.get("stages") or {}
    # one colour per stage across backends; ONNX Runtime's small rows (preprocessing, label, layout
    # reorders, unattributed) drawn together as "other"
    colours = {"E": "#1f77b4", "F": "#9ecae1", "E + F": "#4a90c8", "D": "#ff7f0e", "score and decision": "#ffd92f",
               "D + score": "#f4a442", "purification (E, F again)": "#7f7f7f", "D + score + purification": "#bc8f5f",
               "C": "#2ca02c", "other": "#e377c2"}
    bars = []
    for r in st.get("onnxruntime", []):
        if "stage_us" not in r:
            continue
        b = {k: 0.0 for k in ("E", "F", "D", "score and decision", "purification (E, F again)", "C", "other")}
        for k, v in r["stage_us"].items():
            b[k if k in b else "other"] += v / 1e3
        bars.append((_short(r["model"]).replace("dafar-", "") + " (ONNX Runtime)", b))
    for r in st.get("litert", []):
        g = r["stage_ms"]
        bars.append((f"LiteRT {r['precision']} {r['contract']}", {
            "E + F": g.get("E + F (the victim)", 0.0), "D + score": g.get("D + score and decision", 0.0),
            "purification (E, F again)": g.get("purification (E, F again)", 0.0), "C": g.get("C", 0.0),
            "D + score + purification": g.get("D + score + purification", 0.0)}))
    if bars:
        keys = [k for k in colours if any(b.get(k, 0.0) > 0 for _, b in bars)]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 2.4))
        left = np.zeros(len(bars))
        for k in keys:
            vals = np.array([max(b.get(k, 0.0), 0.0) for _, b in bars])
            ax.barh(range(len(bars)), vals, left=left, label=k, color=colours[k])
            left += vals
        ax.set_yticks(range(len(bars)), [n for n, _ in bars], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per inference (batch 1)")
        ax.set_title("Where the time goes: the defence by stage")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.6 / (len(bars) + 4)))
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / "bench_stages.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("plots/bench_stages.png")
    acc = s.get("accuracy", {})
    pairs = []
    for rel, a in acc.items():
        e_int8 = rel.replace("-int8", "")
        if "-int8" in rel and e_int8 in acc and "purified_acc" in a:
            pairs.append((e_int8, rel))
    if pairs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        x = np.arange(len(pairs))
        labels = [_short(f).replace("dafar-", "") for f, _ in pairs]
        for ax, key, title in ((axes[0], "purified_acc", "defence label accuracy (%)"), (axes[1], "fpr", "false-positive rate (%)")):
            ax.bar(x - 0.2, [100 * acc[f][key] for f, _ in pairs], 0.4, label="float32")
            ax.bar(x + 0.2, [100 * acc[q][key] for _, q in pairs], 0.4, label="int8")
            ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / "bench_float_vs_int8.png", dpi=100)
        plt.close(fig)
        made.append("plots/bench_float_vs_int8.png")
    return made


def reproduce_command(cfg: dict) -> str:
    """``dafar bench`` with the flags that rebuild a recorded configuration (``bench/summary.json``)."""
    from .harness import BenchConfig

    d = BenchConfig()
    models = cfg.get("models")
    c = BenchConfig(threads=tuple(cfg["threads"]), batches=tuple(cfg["batches"]), runs=cfg["runs"],
                    warmup=cfg.get("warmup", 20), min_seconds=cfg.get("min_seconds", 0.0),
                    device_only=bool(cfg.get("device_only")), stage_profile=cfg.get("stage_profile", True),
                    gpu_readiness=cfg.get("gpu_readiness", True),
                    # summaries written before these were recorded rebuild with the defaults
                    models=None if models is None else tuple(models),
                    accuracy_images=cfg.get("accuracy_images", d.accuracy_images), memory=cfg.get("memory", d.memory),
                    torch=cfg.get("torch", d.torch), gpu=cfg.get("gpu", d.gpu),
                    fp16_images=cfg.get("fp16_images", d.fp16_images), fp16_tflite=cfg.get("fp16_tflite", d.fp16_tflite),
                    official_rounds=cfg.get("official_rounds", 2))
    return " ".join(["dafar bench RUN_DIR", *to_argv(c, always=("threads", "batches", "runs"))])


def write_bench_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "bench" / "summary.json").read_text())
    (run_dir / "plots").mkdir(exist_ok=True)
    plots = _plots(run_dir, s)
    mc = s["machine"]
    cfg = s["config"]
    c = s["cost"]
    label = dataset_label(read_manifest(run_dir))
    L = [f"# Benchmark report: {label}", "",
         f"Machine: {mc.get('cpu', mc.get('machine'))}, {mc.get('cpus')} CPUs, {mc.get('platform')}; "
         f"onnxruntime {mc.get('onnxruntime', '-')}, ai-edge-litert {mc.get('ai-edge-litert', '-')}, "
         f"torch {mc.get('torch', '-')}.", "",
         f"Reproduce: `{reproduce_command(cfg)}`", "",
         *([f"Not timed: the {', '.join(cfg['skipped_formats'])} files (`--device-only` on an install without "
            "their runtime).", ""] if cfg.get("skipped_formats") else []),
         f"Timing: {cfg['warmup']} warm-up runs, then at least {cfg['runs']} timed runs per model, the defence graph and its "
         "undefended victim interleaved in blocks of 10 so machine noise hits both; the clock wraps the backend call only. "
         "This is a shared, noisy 2-core VM: compare ratios measured side by side, not absolute numbers across runs.", "",
         "## Cost", "",
         "| subnetwork | parameters | MACs |", "|---|---|---|"]
    for k in "EFDC":
        L.append(f"| {k} | {c['subnetworks'][k]['params']:,} | {c['subnetworks'][k]['macs']:,} |")
    L += ["", f"Victim (E + F): n = {c['victim_params']:,} parameters. Extra parameters: D = {c['overhead_without_C']:.2f} n "
          f"(paper's Table 6: n/2), D + C = {c['overhead_with_C']:.2f} n (paper: n).", "",
          f"MACs per image: victim {c['fused_l2']['victim_macs']:,}; fused defence (E, F, D, then E and F on the "
          f"reconstruction) {c['fused_l2']['fused_macs']:,} with the L2 detector "
          f"({c['fused_l2']['mac_ratio']:.2f}x the victim), {c['fused_autoencoder']['fused_macs']:,} with C "
          f"({c['fused_autoencoder']['mac_ratio']:.2f}x)."
          + (f" Detect mode (`--mode detect`: E, F and D once, the victim's label): "
             f"{c['fused_l2_detect']['fused_macs']:,} ({c['fused_l2_detect']['mac_ratio']:.2f}x) with L2, "
             f"{c['fused_autoencoder_detect']['fused_macs']:,} ({c['fused_autoencoder_detect']['mac_ratio']:.2f}x) with C."
             if "fused_l2_detect" in c else ""), ""]
    L += ["## Latency", "", "| model | backend | precision | threads | batch | init ms | first ms | mean ms | std | p50 | p90 | p99 | "
          "fused / victim (p50) | MAC ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(s["records"], key=lambda r: (r["format"], r["graph"], r["precision"], r["model"], r["threads"], r["batch"])):
        L.append(f"| `{_short(r['model'])}` | {r['backend']} | {r['precision']} | {r['threads']} | {r['batch']} | "
                 f"{_f(r['init_ms'], 1)} | {_f(r['first_inference_ms'], 2)} | {_f(r['mean_ms'])} | {_f(r['std_ms'])} | "
                 f"{_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} | {_f(r.get('fused_to_victim_ratio'), 2)} | "
                 f"{_f(r.get('mac_ratio'), 2)} |")
    for r in s.get("torch", []):
        if "skipped" in r:
            L.append(f"| torch eager | - | - | - | - | - | - | - | - | - | - | - | {r['skipped']} | - |")
            continue
        L.append(f"| `{r['model']}` | torch-eager | float32 | {r['threads']} | {r['batch']} | - | - | {_f(r['mean_ms'])} | "
                 f"{_f(r['std_ms'])} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} | "
                 f"{_f(r.get('fused_to_victim_ratio'), 2)} | - |")
    if s.get("ratios"):
        L += ["", "Fused-to-victim latency ratio against the MAC ratio (the arithmetic floor: a hybrid defence does "
              "about 3x the victim's multiply-accumulates, a `-detect-` graph about 2x):", "", "| defence | threads | batch | latency ratio | MAC ratio | latency / MAC |",
              "|---|---|---|---|---|---|"]
        for r in s["ratios"]:
            L.append(f"| `{_short(r['model'])}` | {r['threads']} | {r['batch']} | {r['latency_ratio']:.2f} | "
                     f"{r['mac_ratio']:.2f} | {r['ratio_over_mac']:.2f} |")
    gpu = s.get("gpu", [])
    if gpu:
        L += ["", "## GPU", ""]
        for r in gpu:
            if "skipped" in r:
                L.append(f"- {r['skipped']}")
            else:
                L.append(f"- `{r['model']}` {r['backend']} batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms")
    L += _stages_section(s)
    L += _gpu_readiness_section(s)
    icount = run_dir / "bench" / "arm64_icount.json"
    if icount.is_file():  # bench/scripts/arm64_icount.sh (root, emulated aarch64)
        from .icount import report_section

        L += report_section(json.loads(icount.read_text()))
    mem = s.get("memory", {})
    if mem:
        L += ["", "## Memory", "", "Peak resident memory (VmHWM) of a fresh process that loads the model and runs it 20 "
              "times, minus its resident size just before loading (numpy, dafar and the backend already imported); the "
              "backend's import and the whole process peak beside it.", "",
              "| model | file KiB | model peak RSS MiB | backend import MiB | process peak RSS MiB |", "|---|---|---|---|---|"]
        for rel, r in mem.items():
            if "error" in r:
                L.append(f"| `{_short(rel)}` | - | error: {r['error']} | - | - |")
            else:
                L.append(f"| `{_short(rel)}` | {c['file_bytes'][rel] / 1024:.0f} | {r['model_peak_kib'] / 1024:.1f} | "
                         f"{r['backend_import_kib'] / 1024:.1f} | {r['peak_kib'] / 1024:.1f} |")
    acc = s.get("accuracy", {})
    if acc:
        n = next(iter(acc.values()))["images"]
        L += ["", f"## Accuracy (test set, {n} images)", "",
              "Defence label: the purified label for hybrid graphs, the victim's own for `-detect-` graphs.", "",
              "| model | precision | victim acc | defence label acc | FPR at alpha | clean images accepted and correct | alpha |",
              "|---|---|---|---|---|---|---|"]
        for rel, a in acc.items():
            prec = "int8" if "-int8" in rel else "float32"
            L.append(f"| `{_short(rel)}` | {prec} | {100 * a['victim_acc']:.2f}% | "
                     + (f"{100 * a['purified_acc']:.2f}% | {100 * a['fpr']:.2f}% | {100 * a['defended_clean_acc']:.2f}% | "
                        f"{a['alpha']:.4f} |" if "purified_acc" in a else "- | - | - | - |"))
    L.append("")
    for p in plots:
        L.append(f"![{Path(p).stem}]({p})")
    L.append("")
    path = run_dir / "bench_report.md"
    atomic_write_text(path, "\n".join(L))
    return path


def _stages_section(s: dict) -> list[str]:
    st = s.get("stages")
    if not st:
        return []
    L = ["", f"## Where the time goes ({st['threads']} thread{'s' if st['threads'] > 1 else ''}, batch 1)", ""]
    ort = [r for r in st.get("onnxruntime", []) if "stage_us" in r]
    for r in st.get("onnxruntime", []):
        if "skipped" in r:
            L.append(f"ONNX Runtime per-node profile: skipped ({r['skipped']}).")
    if ort:
        names = [k for k in STAGE_ORDER if any(k in r["stage_us"] for r in ort)]
        L += ["ONNX Runtime's profiler, each node's kernel time attributed to the module that produced it "
              "(microseconds per inference; share of the kernel time in brackets; `run` is the whole call, the rest "
              "being the executor's own overhead):", "",
              "| graph | " + " | ".join(names) + " | kernels | run |", "|---" * (len(names) + 3) + "|"]
        for r in ort:
            k = r["kernels_us"]
            cells = [f"{r['stage_us'][n]:.0f} ({100 * r['stage_us'][n] / k:.0f}%)" if n in r["stage_us"] else "-"
                     for n in names]
            L.append(f"| `{_short(r['model'])}` | " + " | ".join(cells) + f" | {k:.0f} | {r['run_us']:.0f} |")
        L.append("")
    lit = st.get("litert", [])
    if lit:
        L += ["LiteRT (Interpreter API), stages as differences of the medians of graphs that each add one, timed "
              "interleaved: victim (E + F), detect (+ D, score and decision), hybrid (+ purification), autoencoder "
              "(+ C). Milliseconds per inference (the l2 graphs' total in the last column); a stage that costs next "
              "to nothing can come out slightly negative.", ""]
        cols = [k for k in ("E + F (the victim)", "D + score and decision", "purification (E, F again)",
                            "D + score + purification", "C") if any(k in r["stage_ms"] for r in lit)]
        L += ["| precision | input | " + " | ".join(cols) + " | defence total |", "|---" * (len(cols) + 3) + "|"]
        for r in lit:
            g = r["stage_ms"]
            tot = r["p50_ms"].get("l2 hybrid", r["p50_ms"].get("l2 detect"))
            L.append(f"| {r['precision']} | {r['contract']} | " + " | ".join(_f(g.get(k)) for k in cols) + f" | {_f(tot)} |")
        L.append("")
    off = st.get("official", [])
    if off:
        rounds = next((r.get("rounds") for r in off if "rounds" in r), None)
        paired = any(r.get("our_ratios") for r in off)
        L += ["LiteRT's official `benchmark_litert_model.py` (from the ai-edge-litert wheel; CompiledModel API, CPU) on "
              "the same files, defence and victim alternating, beside our interleaved Interpreter measurement"
              + (f", {rounds} rounds, ours measured right after the tool in each round; the medians over rounds are "
                 "compared and the range over rounds shown" if paired else " of the latency section") +
              ": the defence/victim ratios should agree within 10%.", ""]
        if "skipped" in off[0]:
            L.append(f"- skipped: {off[0]['skipped']}")
        else:
            L += ["| defence graph | official median ms (defence / victim) | official ratio (range) | our ratio (range) | "
                  "difference |", "|---|---|---|---|---|"]
            for r in off:
                if "error" in r:
                    L.append(f"| `{_short(r['model'])}` | error: {r['error']} | - | - | - |")
                    continue
                if "agreement" not in r:  # a zero victim median (the tool's 0.01 ms resolution) or no ratio of ours
                    L.append(f"| `{_short(r['model'])}` | {r['official_median_ms']:.2f} / "
                             f"{r['official_victim_median_ms']:.2f} | - | - | - |")
                    continue
                flag = "" if abs(r["agreement"]) <= 0.10 else " **(over 10%)**"
                L.append(f"| `{_short(r['model'])}` | {r['official_median_ms']:.2f} / {r['official_victim_median_ms']:.2f} | "
                         f"{r['official_ratio']:.2f}{_range(r.get('official_ratios'))} | "
                         f"{r['our_ratio']:.2f}{_range(r.get('our_ratios'))} | {100 * r['agreement']:+.1f}%{flag} |")
            ok = [r for r in off if "agreement" in r]
            if ok:
                within = sum(abs(r["agreement"]) <= 0.10 for r in ok)
                L += ["", f"{within} of {len(ok)} ratios agree within 10%. The official tool reports medians rounded "
                      "to 0.01 ms, which alone moves a ratio by up to a few percent on sub-millisecond victims."]
        L.append("")
    return L


STAGE_ORDER = ("preprocess", "E", "F", "D", "C", "score and decision", "purification (E, F again)", "label",
               "layout (ORT-inserted)", "unattributed")


def _range(vals) -> str:
    """`` (lo-hi)`` of a list of ratios measured over rounds; nothing for one value or none."""
    return f" ({min(vals):.2f}-{max(vals):.2f})" if vals and len(vals) > 1 else ""


def _gpu_readiness_section(s: dict) -> list[str]:
    g = s.get("gpu_readiness")
    if not g:
        return []
    L = ["", "## GPU readiness (measured without a GPU)", "",
         "What a phone's GPU would do with these files, from a CPU: the GPU delegate's static analyzer, and the "
         "float graphs run in float16 (GPU delegates compute in fp16 by default) against float32. Neither is a "
         "GPU measurement: GPU latency is " + ("in the GPU section above." if any("p50_ms" in r for r in s.get("gpu", []))
                                              else "**not measured** (no GPU on this machine)."), ""]
    an = g.get("analyzer", {})
    if an:
        ok = sum(1 for v in an.values() if v.get("compatible"))
        tool = next((v["tool"] for v in an.values() if "tool" in v), "the analyzer")
        L += [f"GPU delegate analyzer ({tool}, static: op types and shapes): **{ok} of {len(an)} .tflite files "
              "compatible**.", "", "| file | GPU delegate analyzer |", "|---|---|"]
        for rel, v in an.items():
            verdict = (v["skipped"] if "skipped" in v else "compatible" if v["compatible"]
                       else "not compatible: " + "; ".join(v["problems"][:3]))
            L.append(f"| `{_short(rel)}` | {verdict} |")
        L.append("")
    fp = g.get("fp16", {})
    if "skipped" in fp:
        L.append(f"fp16 fidelity: skipped ({fp['skipped']}).")
    elif fp.get("rows"):
        n = fp["rows"][0]["images"]
        L += [f"fp16 fidelity (torch on CPU, weights and activations in float16, {n} test images; int8 files are "
              "dequantized to fp16 by a GPU delegate and not simulated here):", "",
              "| graph | labels agree | accuracy fp32 / fp16 | reject decisions agree | FPR fp32 / fp16 | "
              "score drift median / p99 / max | scores within 1e-3 | clean images within p99 drift of alpha |",
              "|---|---|---|---|---|---|---|---|"]
        for r in fp["rows"]:
            name = r["graph"] + (f" {r['detector']} {r['mode']}" if r["detector"] else "")
            head = (f"| {name} | {100 * r['label_agreement']:.2f}% | {100 * r['fp32_label_acc']:.2f}% / "
                    f"{100 * r['fp16_label_acc']:.2f}% |")
            if "decision_agreement" in r:
                L.append(head + f" {100 * r['decision_agreement']:.2f}% ({r['decisions_flipped']} flipped) | "
                         f"{100 * r['fpr_fp32']:.2f}% / {100 * r['fpr_fp16']:.2f}% | {r['score_rel_diff_median']:.1e} / "
                         f"{r['score_rel_diff_p99']:.1e} / {r['score_rel_diff_max']:.1e} | "
                         f"{100 * r['scores_within_1e-3']:.1f}% | {r['near_alpha']} |")
            else:
                L.append(head + f" - | - | logits max diff {r['max_logit_diff']:.1e} | - | - |")
        L.append("")
    ft = g.get("fp16_tflite", {})
    if "skipped" in ft:
        L.append(f"fp16-weights TFLite files: skipped ({ft['skipped']}).")
    elif ft.get("rows"):
        n = ft["rows"][0]["images"]
        L += [f"fp16-weights TFLite files (`--fp16-tflite`: each float graph converted with the TFLite converter's "
              f"float16 weight option, the file a GPU delegate is usually given; kept in `bench/fp16/`), against "
              f"the float32 file, both on LiteRT's CPU interpreter, {n} test images. The CPU dequantizes the "
              "weights to fp32, so this is the weights' rounding alone; the torch rows above add fp16 arithmetic:", "",
              "| file | size fp32 / fp16 weights | labels agree | accuracy fp32 / fp16 | reject decisions agree | "
              "FPR fp32 / fp16 | score drift median / max | scores within 1e-3 |", "|---|---|---|---|---|---|---|---|"]
        for r in ft["rows"]:
            head = (f"| `{_short(r['model'])}` | {r['bytes_fp32'] / 1e3:.0f} / {r['bytes_fp16'] / 1e3:.0f} kB | "
                    f"{100 * r['label_agreement']:.2f}% | {100 * r['fp32_label_acc']:.2f}% / {100 * r['fp16_label_acc']:.2f}% |")
            if "decision_agreement" in r:
                L.append(head + f" {100 * r['decision_agreement']:.2f}% ({r['decisions_flipped']} flipped) | "
                         f"{100 * r['fpr_fp32']:.2f}% / {100 * r['fpr_fp16']:.2f}% | {r['score_rel_diff_median']:.1e} / "
                         f"{r['score_rel_diff_max']:.1e} | {100 * r['scores_within_1e-3']:.1f}% |")
            else:
                L.append(head + f" - | - | logits max diff {r['max_logit_diff']:.1e} | - |")
        L.append("")
    return L


def summary_section(run_dir) -> list[str]:
    """The benchmark headline of ``report.md`` (1 thread, batch 1), linking the full report."""
    run_dir = Path(run_dir)
    L: list[str] = []
    summary = run_dir / "bench" / "summary.json"
    if summary.is_file() and (run_dir / "bench_report.md").is_file():
        s = json.loads(summary.read_text())
        L += ["## Benchmark", "", "Full report: [bench_report.md](bench_report.md).", ""]
        rows = [r for r in s.get("ratios", []) if r["threads"] == 1 and r["batch"] == 1]
        if rows:
            L += ["| defence graph (1 thread, batch 1) | p50 ms | victim p50 ms | latency ratio | MAC ratio |", "|---|---|---|---|---|"]
            p50 = {(r["model"], r["threads"], r["batch"]): r["p50_ms"] for r in s["records"]}
            for r in rows:
                L.append(f"| `{Path(r['model']).name}` | {p50.get((r['model'], 1, 1), float('nan')):.3f} | "
                         f"{p50.get((r['victim'], 1, 1), float('nan')):.3f} | {r['latency_ratio']:.2f} | {r['mac_ratio']:.2f} |")
            L.append("")
    return L
