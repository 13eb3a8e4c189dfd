"""The training part of a run folder's ``report.md``, plus its PNG plots in ``plots/``
(:mod:`dafar.report` assembles the whole report from each stage's part).

Reads only the run folder (manifest, training log, clean scores), so it can be regenerated at
any time with ``dafar report RUN_DIR``.  Every number comes from the run itself; the paper's
values are shown beside ours for comparison, never in place of them.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from dafar.manifest import attach_command, dataset_label
from dafar.options import to_argv
from dafar.schema import Detector

from .config import TrainConfig

__all__ = ["training_sections", "reproduce_command", "PAPER"]

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

    phases = [p for p in ("joint", "decoder", "detector", "victim", "classifier") if any(r["phase"] == p for r in log)]
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

    dets = [(d.value, d.score_key) for d in Detector if f"val_{d.score_key}" in scores]
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


def reproduce_command(cfg: dict) -> str:
    """``dafar train`` with the flags that rebuild a recorded training configuration from its
    profile (derived from :class:`~dafar.train.config.TrainConfig`, never listed by hand)."""
    c = TrainConfig.from_dict(cfg)
    base = TrainConfig.for_profile(c.dataset, c.profile)
    if c.attach_to and c.arch_name.value == "custom":  # a classifier of one's own: data and normalization named
        own = ("victim_weights", "victim_mean", "victim_std")  # right after --victim: what it is
        first = to_argv(c, base, skip=[f.name for f in fields(c) if f.name not in own])
        flags = to_argv(c, base, always=("dataset", "profile", "epochs", "seed", "feedback_at"),
                        skip=("threads", "device", "arch", "width", "unpool", "train_victim", *own))
        return " ".join(["dafar attach --victim", c.attach_to, *first, *flags, "--out RUN_DIR"])
    if c.attach_to:  # plug-in mode: the data set and network come from the victim (the unpool is D's own)
        flags = to_argv(c, base, always=("profile", "epochs", "seed"),
                        skip=("threads", "device", "dataset", "arch", "width", "train_victim",
                              "image_size", "channels"))
        return " ".join(["dafar attach --victim", c.attach_to, *flags, "--out RUN_DIR"])
    flags = to_argv(c, base, always=("dataset", "profile", "epochs", "seed"), skip=("threads", "device"))
    return " ".join(["dafar train", *flags, "--out RUN_DIR"])


def training_sections(run_dir: str | Path, m: dict) -> list[str]:
    """The training part of ``report.md`` (and its plots, written into ``plots/``)."""
    run_dir = Path(run_dir)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    _plot_training(log, plots / "training.png")
    classifier_only = m["training"].get("mode") == "classifier"
    if not classifier_only:
        with np.load(run_dir / "scores.npz", allow_pickle=False) as z:
            scores = {k: z[k] for k in z.files}
        _plot_scores(scores, m["thresholds"], plots / "clean_scores.png")

    ds = m["dataset"]["name"]
    met = m["metrics"]
    paper = PAPER.get(ds, {})
    cfg = m["training"]["config"]
    timing = m["training"]
    label = dataset_label(m)
    cmd = reproduce_command(cfg)
    L = [f"# DAFAR training report: {label}", ""]
    L += [f"Run folder `{run_dir.name}`, written {m['created_utc']} by dafar {m['versions']['dafar']} "
          f"(torch {m['versions']['torch']}, {m['versions']['machine']}, {timing['device']}, {timing['threads']} threads).", ""]
    published = (m.get("provenance") or {}).get("command")
    if published:  # a published model: the whole recorded training, chained runs included
        L += ["Trained with (as published):", "", "```", published, "```", ""]
    else:
        L += ["Reproduce:", "", "```", cmd, "```", ""]
    if classifier_only:
        return L + _classifier_sections(run_dir, m)
    attached = timing.get("attached_to")
    if attached and attached.get("run") is None:  # a classifier of one's own
        w = attached.get("weights_sha256", {})
        L += [f"Plug-in mode: the decoder (and C) were trained on your classifier `{attached.get('source')}` "
              f"(weights sha256 {str(w.get('victim'))[:12]}), traced into a graph of torch.nn layers "
              f"({attached.get('graph_layers')} named layers; stored in the manifest, so loading runs none of your "
              f"code) and split at `{m['architecture'].get('feedback_at')}`: E and F are its weights, unchanged.", ""]
    elif attached:
        w = attached.get("weights_sha256", {})
        L += [f"Plug-in mode: the decoder (and C) were trained on the frozen classifier of `{attached.get('source')}` "
              f"(manifest {str(attached.get('manifest_sha256'))[:12]}, E {str(w.get('E'))[:12]}, F {str(w.get('F'))[:12]}; "
              f"its recorded test accuracy {_pct(attached.get('victim_test_acc'))}): E and F are its weights, "
              "unchanged."
              + (f" The classifier was trained by dafar alone (`--classifier-only`, {attached.get('epochs')} epochs, "
                 f"{attached['total_seconds']:.0f} s); with this run, victim + D + C took "
                 f"{attached['total_seconds'] + timing['total_seconds']:.0f} s in all."
                 if attached.get("mode") == "classifier" and attached.get("total_seconds") is not None else ""), ""]
    L += ["## Accuracy (test set)", "", "| | ours | paper |", "|---|---|---|"]
    how = "the attached classifier, frozen" if attached else "trained jointly with D"
    L.append(f"| victim F(E(x)), {how} | {_pct(met['victim_test_acc'])} | {_pct(paper.get('victim_test_acc'))} |")
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
    ar = m["architecture"]
    L += ["## Model", "", f"Architecture `{ar['name']}`, unpool `{ar['unpool']}` ({ar['unpool_tie_rule']}); "
          f"feedback at `{ar.get('feedback_at', 'the default position')}`, decoder width "
          f"{ar.get('decoder_width', 1.0):g}.", "", "| subnetwork | parameters |", "|---|---|"]
    for k, v in m["architecture"]["params"].items():
        L.append(f"| {k} | {v:,} |")
    vp = m["architecture"]["victim_params"]
    extra_d = m["architecture"]["params"]["D"]
    extra_c = m["architecture"]["params"]["C"]
    L += ["", f"Victim (E + F): {vp:,} parameters. Overhead of D: {extra_d / vp:.2f} n; of D + C: "
          f"{(extra_d + extra_c) / vp:.2f} n (paper's Table 6: n/2 without C, n with C).", ""]
    L += _phase_table(timing)
    parent = timing.get("init_from")
    if parent:
        alone = parent.get("mode") == "classifier"  # E and F trained alone; D started here
        kind = "classifier epochs (trained alone)" if alone else "joint epochs"
        seen = (f"{parent['epochs_total']} classifier and {cfg['epochs']} joint epochs" if alone
                else f"{parent['epochs_total'] + cfg['epochs']} joint epochs")
        L += [f"Started from the weights of `{parent['run']}` (manifest {parent['manifest_sha256'][:12]}, "
              f"{parent['epochs_total']} {kind}, {parent['total_seconds']:.0f} s, victim test accuracy "
              f"{_pct(parent.get('victim_test_acc'))}" + ("" if parent.get("same_data") else "; trained on other data")
              + f"{'; D from its initialisation' if alone or parent.get('decoder') else ''}"
              + (f"; its width-{parent['decoder']['width']:g} D at {parent['decoder']['feedback_at']} not kept"
                 if parent.get("decoder") else "") + f"): this model has seen {seen} in all, "
              f"{parent['total_seconds'] + timing['total_seconds']:.0f} s of training.", ""]
    L += _kept_lines(timing)
    adv = m["training"].get("adversarial")
    if adv:
        rob = met.get("robust") or {}
        how = (f"{adv['steps']}-step PGD (Madry et al.)" if adv["mode"] == "pgd"
               else "FGSM from a uniform random start (Wong, Rice and Kolter 2020)")
        L += ["## Adversarial training", "",
              f"The victim's cross-entropy was taken on L-inf adversarial images: {how}, eps {adv['eps']:.4g} and step "
              f"{adv['step_size']:.4g} on pixels in [0, 1]" + (", D's reconstruction on the clean images" if not attached
                                                               else "") + f"; overfitting guard {adv['guard']:g}.", ""]
        if rob:
            L += [f"Under {rob['attack']} at eps {rob['eps']:.4g} on the first {rob['images']} test images the victim "
                  f"classifies {_pct(rob['victim_pgd_acc'])} correctly"
                  + (f" (victim-only model: {_pct(rob['victim_only_pgd_acc'])})" if "victim_only_pgd_acc" in rob else "")
                  + ". That is a first look, not the evaluation: `dafar eval` attacks the whole defence adaptively.", ""]
    L += ["![training curves](plots/training.png)", ""]
    return L


def _phase_table(timing: dict) -> list[str]:
    L = ["## Training", "", "| phase | epochs | seconds per epoch (each) |", "|---|---|---|"]
    for phase, secs in timing["seconds_per_epoch"].items():
        L.append(f"| {phase} | {len(secs)} | {', '.join(f'{s:.0f}' for s in secs) if secs else 'resumed from checkpoint'} |")
    return L + ["", f"Total wall time {timing['total_seconds']:.0f} s (evaluation {timing['eval_seconds']:.0f} s)"
                + (", resumed from a checkpoint" if timing.get("resumed") else "") + ".", ""]


def _kept_lines(timing: dict) -> list[str]:
    L: list[str] = []
    for phase, k in (timing.get("kept_weights") or {}).items():
        if k.get("weights") != "last epoch":
            L += [f"{phase} phase: the saved weights are the {k['weights']}"
                  + (f" (epoch {k['best_epoch']} of {k['epochs_done']}, monitor validation accuracy "
                     f"{_pct(k['best_monitor_val_acc'])})" if k.get("best_epoch") and "best_monitor_val_acc" in k else "")
                  + (f" (epoch {k['best_epoch']} of {k['epochs_done']}: the best PGD-10 accuracy on 500 validation "
                     f"images, {_pct(k['best_monitor_val_robust_acc'])})" if "best_monitor_val_robust_acc" in k else "")
                  + (f"; the overfitting guard stopped the phase after epoch {k['stopped_by_guard_after_epoch']}"
                     if k.get("stopped_by_guard_after_epoch") else "")
                  + (f"; weights averaged with per-step decay {k['ema_decay']}" if k.get("ema_decay") else "") + ".", ""]
    return L


def _classifier_sections(run_dir: Path, m: dict) -> list[str]:
    """The report of a ``--classifier-only`` run: the classifier, and how to attach DAFAR to it."""
    met, ar, timing = m["metrics"], m["architecture"], m["training"]
    L = ["## Accuracy", "", "A classifier alone (`--classifier-only`): E and F trained with cross-entropy, no decoder, "
         "detector or threshold yet.", "", "| | accuracy |", "|---|---|",
         f"| test ({met['test_images']} images) | {_pct(met['victim_test_acc'])} |",
         f"| validation ({m['dataset']['sizes']['val']} images, carved from the training set) | "
         f"{_pct(met['victim_val_acc'])} |", ""]
    costs = ar.get("costs", {})
    L += ["## Model", "", f"Architecture `{ar['name']}`, split at `{ar.get('feedback_at')}` (where a decoder attaches; "
          "`dafar attach --feedback-at` may move it).", "", "| subnetwork | parameters | MACs per image |", "|---|---|---|"]
    L += [f"| {k} | {ar['params'][k]:,} | {costs.get(k, {}).get('macs', 0):,} |" for k in ("E", "F")]
    L += [""] + _phase_table(timing) + _kept_lines(timing)
    L += ["## Next", "", "Attach DAFAR's decoder (and C) to this classifier, which stays unchanged:", "", "```",
          attach_command(m, run_dir), "```", "", "![training curves](plots/training.png)", ""]
    return L
