"""The training report of a run folder: ``report.md`` plus PNG plots in ``plots/``.

Reads only the run folder (manifest, training log, clean scores), so it can be regenerated at
any time with ``dafar report RUN_DIR``.  Every number comes from the run itself; the paper's
values are shown beside ours for comparison, never in place of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dafar.manifest import atomic_write_text, dataset_label, load_manifest

__all__ = ["write_report", "PAPER"]

# The paper's reported results (SPEC.md), shown beside ours.
PAPER = {
    "mnist": {"victim_test_acc": 0.9924, "victim_only_test_acc": 0.9914, "purified_test_acc": 0.9904, "fpr": 0.0016,
              "alpha": 23.333},
    "cifar10": {"victim_test_acc": 0.8617, "fpr": 0.0349, "alpha": 230.143},
}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _plot_training(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("joint", "detector", "victim") if any(r["phase"] == p for r in log)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for phase in phases:
        recs = [r for r in log if r["phase"] == phase]
        ep = [r["epoch"] + 1 for r in recs]
        axes[0].plot(ep, [r["loss"] for r in recs], marker="o", label=f"{phase} train loss")
        if "val_loss" in recs[0]:
            axes[0].plot(ep, [r["val_loss"] for r in recs], marker="x", ls="--", label=f"{phase} val loss")
        if "val_recon" in recs[0]:
            axes[0].plot(ep, [r["val_recon"] for r in recs], marker="x", ls="--", label=f"{phase} val recon L2")
        if "val_acc" in recs[0]:
            axes[1].plot(ep, [100 * r["val_acc"] for r in recs], marker="o", label=f"{phase} val acc")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation accuracy (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scores(scores: dict, thresholds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = [(name, key) for name, key in (("l2", "l2"), ("autoencoder", "ae")) if f"val_{key}" in scores]
    fig, axes = plt.subplots(1, len(dets), figsize=(5.5 * len(dets), 4), squeeze=False)
    for ax, (name, key) in zip(axes[0], dets):
        val, test = scores[f"val_{key}"], scores[f"test_{key}"]
        bins = np.linspace(min(val.min(), test.min()), max(val.max(), test.max()), 80)
        ax.hist(val, bins=bins, alpha=0.5, density=True, label="validation (clean)")
        ax.hist(test, bins=bins, alpha=0.5, density=True, label="test (clean)")
        th = thresholds[name]
        for i, (rule, d) in enumerate(th["rules"].items()):
            ax.axvline(d["alpha"], color=f"C{i + 2}", ls="-" if rule == th["default"] else ":",
                       label=f"alpha {rule} = {d['alpha']:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel(f"{name} score")
        ax.set_ylabel("density")
        ax.set_title(f"Clean {name} scores and thresholds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exports_section(run_dir: Path, m: dict) -> list[str]:
    L = ["## Exported graphs", "",
         "Each file was checked against the torch graph on real test images before it was written "
         "(`dafar export`); *outliers* are images whose score moved by more than 1e-3 relative, from "
         "unpooling near-ties (see `dafar/export/validate.py`).", "",
         "| file | graph | input | alpha (rule) | size | label agree | reject agree | score rel. err median / max | outliers | images |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for rel, e in sorted(m["exports"].items()):
        v = e["validation"]
        size = m["files"][rel]["bytes"] / 1024
        alpha = f"{e['alpha']:.4f} ({e['threshold_rule']})" if e.get("alpha") is not None else "-"
        inp = f"{e['input']['dtype']} {e['input']['layout']} {e['input']['shape']}"
        rej = _pct(v.get("rejected_agreement")) if "rejected_agreement" in v else "-"
        score = (f"{v['score_rel_err_median']:.1e} / {v['score_rel_err_max']:.1e}" if "score_rel_err_median" in v else "-")
        L.append(f"| `{rel}` | {e['graph']}{'/' + e['detector'] if e.get('detector') else ''} | {inp} | {alpha} | "
                 f"{size:.0f} KiB | {_pct(v.get('label_agreement'))} | {rej} | {score} | {v.get('outlier_images', 0)} | "
                 f"{v['images']} |")
    ops = {rel: e["ops"] for rel, e in m["exports"].items() if e["format"] == "tflite"}
    if ops:
        L += ["", "TFLite files hold builtin ops only (checked on export):", ""]
        for rel, o in sorted(ops.items()):
            L.append(f"- `{rel}`: " + ", ".join(f"{k} x{n}" for k, n in o.items()))
    L.append("")
    return L


def _downstream_section(run_dir: Path, m: dict) -> list[str]:
    """Headlines of the int8 and benchmark reports, when they exist, with links to them."""
    L = []
    int8 = {k: v for k, v in m.get("exports", {}).items() if v.get("precision") == "int8" and v["graph"] == "dafar"}
    if int8:
        L += ["## int8", "", "Full report: [quantize_report.md](quantize_report.md).", "",
              "| int8 model | purified acc float -> int8 | FPR float -> int8 | decisions agree | score corr | size |",
              "|---|---|---|---|---|---|"]
        for rel, e in sorted(int8.items()):
            v = e["validation"]
            L.append(f"| `{Path(rel).name}` | {_pct(v['purified_acc_float'])} -> {_pct(v['purified_acc_int8'])} | "
                     f"{_pct(v['fpr_float'])} -> {_pct(v['fpr_int8'])} | {_pct(v['decision_agreement'])} | "
                     f"{v['score_correlation']:.4f} | {100 * v['size_ratio']:.0f}% of float |")
        L.append("")
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


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` (and its plots) from the run folder; returns its path."""
    run_dir = Path(run_dir)
    m = load_manifest(run_dir)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    with np.load(run_dir / "scores.npz", allow_pickle=False) as z:
        scores = {k: z[k] for k in z.files}
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    _plot_training(log, plots / "training.png")
    _plot_scores(scores, m["thresholds"], plots / "clean_scores.png")

    ds = m["dataset"]["name"]
    met = m["metrics"]
    paper = PAPER.get(ds, {})
    cfg = m["training"]["config"]
    timing = m["training"]
    label = dataset_label(m)
    cmd = (f"dafar train --dataset {ds} --profile {cfg['profile']} --epochs {cfg['epochs']} --seed {cfg['seed']}"
           f" --unpool {cfg['unpool']} --augment {cfg.get('augment', 'none')} --recon-weight {cfg.get('recon_weight', 0.25):g}"
           + (f" --lr {cfg['lr']:g} --batch-size {cfg['batch_size']} --detector-epochs {cfg['detector_epochs']}") + ("" if cfg["detector"] else " --no-detector")
           + (" --victim" if cfg["train_victim"] else " --no-victim")
           + (f" --weight-decay {cfg['weight_decay']:g}" if cfg.get("weight_decay") else "")
           + (f" --dropout {cfg['dropout']:g}" if cfg.get("dropout") else "")
           + (f" --cutout {cfg['cutout']}" if cfg.get("cutout") else "")
           + (f" --ema {cfg['ema']:g}" if cfg.get("ema") else "") + (" --keep-best" if cfg.get("keep_best") else "")
           + (f" --init-from {cfg['init_from']}" if cfg.get("init_from") else "")
           + (f" --train-limit {cfg['train_limit']}" if cfg.get("train_limit") else "")
           + (f" --test-limit {cfg['test_limit']}" if cfg.get("test_limit") else "") + " --out RUN_DIR")
    L = [f"# DAFAR training report: {label}", ""]
    L += [f"Run folder `{run_dir.name}`, written {m['created_utc']} by dafar {m['versions']['dafar']} "
          f"(torch {m['versions']['torch']}, {m['versions']['machine']}, {timing['device']}, {timing['threads']} threads).", ""]
    published = (m.get("provenance") or {}).get("command")
    if published:  # a published model: the whole recorded training, chained runs included
        L += ["Trained with (as published):", "", "```", published, "```", ""]
    else:
        L += ["Reproduce:", "", "```", cmd, "```", ""]
    L += ["## Accuracy (test set)", "", "| | ours | paper |", "|---|---|---|"]
    L.append(f"| victim F(E(x)), trained jointly with D | {_pct(met['victim_test_acc'])} | {_pct(paper.get('victim_test_acc'))} |")
    L.append(f"| victim-only model, same schedule | {_pct(met.get('victim_only_test_acc'))} | {_pct(paper.get('victim_only_test_acc'))} |")
    L.append(f"| purified F(E(D(E(x)))) | {_pct(met['purified_test_acc'])} | {_pct(paper.get('purified_test_acc'))} |")
    if "victim_only_test_acc" in met:
        L += ["", f"Joint minus victim-only: {met['victim_minus_victim_only_points']:+.2f} points."]
    L += ["", f"Test images: {met['test_images']}; validation split: {m['dataset']['sizes']['val']} images carved from "
          f"the training set (seed {m['dataset']['val_split']['seed']}); training images: {m['dataset']['sizes']['train']}.", ""]
    L += ["## Thresholds", "",
          "alpha is calibrated on the clean validation split; the false-positive rate (FPR) is then measured on the "
          "clean test set. The default rule (bold) is the paper's mean + z*std.", "",
          "| detector | rule | alpha | val FPR | test FPR |", "|---|---|---|---|---|"]
    for det, th in m["thresholds"].items():
        for rule, d in th["rules"].items():
            r = f"**{rule}**" if rule == th["default"] else rule
            L.append(f"| {det} | {r} | {d['alpha']:.4f} | {_pct(d['calib_fpr'])} | {_pct(d['test_fpr'])} |")
    if paper:
        L += ["", f"Paper: FPR {_pct(paper['fpr'])} at alpha = {paper['alpha']} (on the paper's own, unstated pixel "
              "scale; our scores are L2 norms on the [-1, 1] model scale, so alpha values are not comparable)."]
    L += ["", "![clean scores](plots/clean_scores.png)", ""]
    L += ["## Model", "", f"Architecture `{m['architecture']['name']}`, unpool `{m['architecture']['unpool']}` "
          f"({m['architecture']['unpool_tie_rule']}).", "", "| subnetwork | parameters |", "|---|---|"]
    for k, v in m["architecture"]["params"].items():
        L.append(f"| {k} | {v:,} |")
    vp = m["architecture"]["victim_params"]
    extra_d = m["architecture"]["params"]["D"]
    extra_c = m["architecture"]["params"]["C"]
    L += ["", f"Victim (E + F): {vp:,} parameters. Overhead of D: {extra_d / vp:.2f} n; of D + C: "
          f"{(extra_d + extra_c) / vp:.2f} n (paper's Table 6: n/2 without C, n with C).", ""]
    L += ["## Training", "", "| phase | epochs | seconds per epoch (each) |", "|---|---|---|"]
    for phase, secs in timing["seconds_per_epoch"].items():
        L.append(f"| {phase} | {len(secs)} | {', '.join(f'{s:.0f}' for s in secs) if secs else 'resumed from checkpoint'} |")
    L += ["", f"Total wall time {timing['total_seconds']:.0f} s (evaluation {timing['eval_seconds']:.0f} s)"
          + (", resumed from a checkpoint" if timing.get("resumed") else "") + ".", ""]
    parent = timing.get("init_from")
    if parent:
        L += [f"Started from the weights of `{parent['run']}` (manifest {parent['manifest_sha256'][:12]}, "
              f"{parent['epochs_total']} joint epochs, {parent['total_seconds']:.0f} s, victim test accuracy "
              f"{_pct(parent.get('victim_test_acc'))}" + ("" if parent.get("same_data") else "; trained on other data")
              + f"): this model has seen {parent['epochs_total'] + cfg['epochs']} joint epochs in all, "
              f"{parent['total_seconds'] + timing['total_seconds']:.0f} s of training.", ""]
    for phase, k in (timing.get("kept_weights") or {}).items():
        if k.get("weights") != "last epoch":
            L += [f"{phase} phase: the saved weights are the {k['weights']}"
                  + (f" (epoch {k['best_epoch']} of {k['epochs_done']}, monitor validation accuracy "
                     f"{_pct(k['best_monitor_val_acc'])})" if k.get("best_epoch") else "")
                  + (f"; weights averaged with per-step decay {k['ema_decay']}" if k.get("ema_decay") else "") + ".", ""]
    L += ["![training curves](plots/training.png)", ""]
    if m.get("exports"):
        L += _exports_section(run_dir, {**m, "exports": {k: v for k, v in m["exports"].items()
                                                         if v.get("precision", "float32") == "float32"}})
    L += _downstream_section(run_dir, m)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(L))
    return path
