"""``RUN/eval_report.md`` and its figures, from ``RUN/eval/summary.json`` and ``plot_data.npz``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dafar.manifest import atomic_write_text, dataset_label, read_manifest
from dafar.train.attacks import attack_label, eps_label

from . import metrics as M
from .evaluate import reproduce_command

__all__ = ["write_eval_report"]


def _cell(recs: list[dict], model: str, attack: str, fmt) -> str:
    """One table cell: ``fmt(record)`` for the (model, attack) record, or '-' when there is none."""
    r = next((r for r in recs if r["model"] == model and r["attack"] == attack), None)
    return "-" if r is None else fmt(r)


def _p(v, d=1):
    return "-" if v is None else f"{100 * v:.{d}f}%"


def _families(recs):
    return list(dict.fromkeys(r["model"] for r in recs))


def _figs(run_dir: Path, s: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    recs = s["records"]
    models = _families(recs)
    data = {}
    path = run_dir / "eval" / "plot_data.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    f0 = s["config"]["fprs"][0]

    # Fig. 7: detection rate against eps (FGSM, PGD): DAFAR at alpha, everyone at the same FPR
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, atk in zip(axes, ("fgsm", "pgd")):
        for mname in models:
            rows = sorted((r for r in recs if r["model"] == mname and r["attack"].startswith(atk + "-")), key=lambda r: r["eps"])
            if not rows:
                continue
            ax.plot([r["eps"] for r in rows], [100 * r[f"detection_at_fpr_{f0:g}"] for r in rows], marker="o",
                    label=f"{mname} @ {100 * f0:g}% FPR")
            if mname.startswith("DAFAR"):
                ax.plot([r["eps"] for r in rows], [100 * r["detection_rate"] for r in rows], ls="--", marker="x",
                        label=f"{mname} @ alpha")
        ax.set_title(f"Detection rate vs eps: {atk.upper()} (gray-box)")
        ax.set_xlabel("eps (L-inf, pixels / 255 scale)")
        ax.set_ylabel("detected (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "eval_fig7_detection_vs_eps.png", dpi=100)
    plt.close(fig)
    made.append("plots/eval_fig7_detection_vs_eps.png")

    # Fig. 8: detection per attack method (strongest setting of each family)
    keys = []
    for atk in ("fgsm", "pgd", "cw-l2", "jsma", "noise"):
        ks = [r["attack"] for r in recs if r["attack"].startswith(atk)]
        if ks:
            keys.append(sorted(set(ks))[-1] if atk in ("cw-l2", "jsma") else max(set(ks), key=lambda k: next(
                r["eps"] for r in recs if r["attack"] == k)))
    fig, ax = plt.subplots(figsize=(12, 4))
    w = 0.8 / max(1, len(models))
    for i, mname in enumerate(models):
        vals = [next((100 * r[f"detection_at_fpr_{f0:g}"] for r in recs if r["model"] == mname and r["attack"] == k), 0) for k in keys]
        ax.bar(np.arange(len(keys)) + i * w, vals, w, label=mname)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, [attack_label(k) for k in keys], rotation=20, fontsize=8)
    ax.set_ylabel(f"detected at {100 * f0:g}% FPR (%)")
    ax.set_title("Detection rate per attack method (Fig. 8)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "eval_fig8_detection_per_attack.png", dpi=100)
    plt.close(fig)
    made.append("plots/eval_fig8_detection_per_attack.png")

    # Fig. 9: accuracy after purification alone
    pur = s.get("purification", [])
    if pur:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, atk in zip(axes, ("fgsm", "pgd")):
            rows = sorted((r for r in pur if r["attack"].startswith(atk + "-")), key=lambda r: r["eps"])
            for k, lab in (("undefended", "no defence"), ("dafar_purification", "DAFAR purification"),
                           ("denoising_ae", "denoising AE"), ("binary_filter", "binary filter"),
                           ("magnet_reformer", "MagNet reformer")):
                if rows and k in rows[0]:
                    ax.plot([r["eps"] for r in rows], [100 * r[k] for r in rows], marker="o", label=lab)
            ax.set_title(f"Accuracy after purification alone: {atk.upper()}")
            ax.set_xlabel("eps")
            ax.set_ylabel("accuracy (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "eval_fig9_purification.png", dpi=100)
        plt.close(fig)
        made.append("plots/eval_fig9_purification.png")

    # Fig. 10: hybrid accuracy on 1:1 clean/adversarial mixes
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, atk in zip(axes, ("fgsm", "pgd")):
        for mname in models:
            rows = sorted((r for r in recs if r["model"] == mname and r["attack"].startswith(atk + "-")), key=lambda r: r["eps"])
            if rows:
                ax.plot([r["eps"] for r in rows], [100 * r["hybrid_accuracy"] for r in rows], marker="o", label=mname)
        ax.set_title(f"Hybrid-defence accuracy, 1:1 clean/{atk.upper()} (Fig. 10)")
        ax.set_xlabel("eps")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "eval_fig10_hybrid.png", dpi=100)
    plt.close(fig)
    made.append("plots/eval_fig10_hybrid.png")

    if data:
        # Fig. 5/6: score distributions per attack with alpha
        dafar = [m for m in models if m.startswith("DAFAR")]
        fig, axes = plt.subplots(1, len(dafar), figsize=(6 * len(dafar), 4.2), squeeze=False)
        for ax, mname in zip(axes[0], dafar):
            clean = data.get(f"{mname}|clean")
            for k in keys:
                v = data.get(f"{mname}|{k}")
                if v is not None:
                    ax.hist(v[np.isfinite(v)], bins=60, histtype="step", density=True, label=k)
            if clean is not None:
                ax.hist(clean, bins=60, histtype="stepfilled", alpha=0.3, density=True, label="clean", color="k")
            alpha = s["alphas"]["l2" if "l2" in mname else "autoencoder"]
            ax.axvline(alpha, color="r", ls="--", label=f"alpha = {alpha:.3f}")
            ax.set_title(f"{mname}: score distributions (Fig. 5/6)")
            ax.set_xlabel("score")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plots / "eval_fig5_scores.png", dpi=100)
        plt.close(fig)
        made.append("plots/eval_fig5_scores.png")
        # ROC curves at two budgets
        pgd_keys = sorted({r["attack"] for r in recs if r["attack"].startswith("pgd-")}, key=lambda k: next(
            r["eps"] for r in recs if r["attack"] == k))
        pick = [pgd_keys[0], pgd_keys[len(pgd_keys) // 2]] if len(pgd_keys) > 1 else pgd_keys
        fig, axes = plt.subplots(1, len(pick), figsize=(6 * len(pick), 4.5), squeeze=False)
        for ax, k in zip(axes[0], pick):
            for mname in models:
                c, a = data.get(f"{mname}|clean"), data.get(f"{mname}|{k}")
                if c is None or a is None:
                    continue
                fpr, tpr, _ = M.roc_curve(c, a)
                ax.plot(fpr, tpr, label=f"{mname} (AUC {M.roc_auc(c, a):.3f})")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_title(f"ROC, gray-box {k}")
            ax.set_xlabel("false-positive rate")
            ax.set_ylabel("detection rate")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "eval_roc.png", dpi=100)
        plt.close(fig)
        made.append("plots/eval_roc.png")
        # Fig. 4: images, reconstructions, residuals
        rows = sorted({k.split("|")[1] for k in data if k.startswith("fig4|")}, key=lambda r: (r != "clean", r))
        if rows:
            n = data[f"fig4|{rows[0]}|x"].shape[0]
            fig, axes = plt.subplots(3 * len(rows), n, figsize=(1.3 * n, 1.3 * 3 * len(rows)))
            for ri, r in enumerate(rows):
                x, rec = data[f"fig4|{r}|x"], data[f"fig4|{r}|recon"]
                for j in range(n):
                    for k, (img, lab) in enumerate(((x[j], r), (rec[j], "recon"), (np.abs(x[j] - rec[j]), "|residual|"))):
                        ax = axes[3 * ri + k, j]
                        im = img.transpose(1, 2, 0)
                        ax.imshow(im[..., 0] if im.shape[2] == 1 else np.clip(im, 0, 1), cmap="gray", vmin=0, vmax=1)
                        ax.set_xticks([])
                        ax.set_yticks([])
                        if j == 0:
                            ax.set_ylabel(lab, fontsize=6)
            fig.suptitle("Clean and adversarial images, reconstructions D(E(x)) and residuals (Fig. 4)", fontsize=8)
            fig.tight_layout()
            fig.savefig(plots / "eval_fig4_images.png", dpi=90)
            plt.close(fig)
            made.append("plots/eval_fig4_images.png")
    ad = s.get("adaptive", {})
    if ad.get("methods"):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for mname, rows in ad["methods"].items():
            ax.plot([r["eps"] for r in rows], [100 * r["robust_accuracy"] for r in rows], marker="o", label=f"{mname}: robust acc")
            ax.plot([r["eps"] for r in rows], [100 * r["defence_success"] for r in rows], ls="--", marker="x",
                    label=f"{mname}: defence success")
        ax.set_xscale("log")
        ax.set_xlabel("eps (log)")
        ax.set_ylabel("%")
        ax.set_title("White-box adaptive PGD on the whole pipeline")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plots / "eval_adaptive.png", dpi=100)
        plt.close(fig)
        made.append("plots/eval_adaptive.png")
    return made


def write_eval_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "eval" / "summary.json").read_text())
    recs = s["records"]
    models = _families(recs)
    cfg = s["config"]
    f0, f1 = cfg["fprs"][0], cfg["fprs"][-1]
    ds = s["dataset"]
    man = read_manifest(run_dir)
    label = dataset_label(man)
    adv = man.get("training", {}).get("adversarial")
    L = [f"# Adversarial evaluation: {label}", "",
         f"Reproduce: `{reproduce_command(cfg)}` ({s['timing']['total_s'] / 60:.0f} minutes on this machine).", ""]
    if adv:
        L += [f"The victim of this run was adversarially trained ({adv['mode']}, eps {adv['eps']:.4g} on pixels in "
              "[0, 1]): `Victim alone` in the adaptive section is the robust victim without the defence.", ""]
    L += [
         "Gray-box (the paper's setting): adversarial images are made with ART against the float victim F(E(x)); "
         "the attacker does not know the defence. Images: test images the victim classifies correctly "
         f"({cfg['images']} per FGSM/PGD/noise set, {cfg['slow_images']} per CW-L2/JSMA set). DAFAR is judged at its "
         f"calibrated alpha and, like every peer, at {100 * f0:g}% and {100 * f1:g}% false-positive rate (thresholds "
         "set on clean validation images). One JSON record per (model, format, attack, intensity) is in `eval/records/`.", "",
         "## Clean images", "", "| method | threshold | FPR on clean test images | clean accuracy (label path) |", "|---|---|---|---|"]
    for mname, c in s["clean"].items():
        thr = next((r["threshold"] for r in recs if r["model"] == mname), None)
        L.append(f"| {mname} | {thr:.4g} | {_p(c['fpr_at_threshold'], 2)} | {_p(c['accuracy_when_accepted'], 2)} |")
    for d, v in s.get("test_fpr_manifest", {}).items():
        L.append("")
        L.append(f"DAFAR ({d}) false-positive rate on the full test set at alpha = {s['alphas'][d]:.4f}: {_p(v, 2)} "
                 "(paper: 0.16% on MNIST, 3.49% on CIFAR-10).")
    # detection table
    attacks = list(dict.fromkeys(r["attack"] for r in recs))
    L += ["", "## Detection (gray-box)", "",
          f"Detection rate at the method's own threshold (DAFAR: alpha; peers: {100 * f0:g}% FPR), then at {100 * f0:g}% / "
          f"{100 * f1:g}% FPR, and ROC AUC; victim accuracy on the adversarial images without any defence in the first column.", "",
          "| attack | victim acc | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for a in attacks:
        cells = []
        for mname in models:
            r = next((r for r in recs if r["model"] == mname and r["attack"] == a), None)
            cells.append("-" if r is None else f"{_p(r['detection_rate'])} ({_p(r[f'detection_at_fpr_{f0:g}'], 0)} / "
                                               f"{_p(r[f'detection_at_fpr_{f1:g}'], 0)}, AUC {r['auc']:.3f})")
        va = next((r["victim_accuracy"] for r in recs if r["attack"] == a), None)
        L.append(f"| {attack_label(a)} | {_p(va)} | " + " | ".join(cells) + " |")
    L += ["", "## Defence success, robust accuracy and hybrid accuracy (gray-box)", "",
          "Defence success: rejected or correctly classified. Robust accuracy: accepted and correct. Hybrid: a 1:1 mix of "
          "clean and adversarial images, a rejected adversarial counts as defended and a rejected clean image as an "
          "error (the paper's Fig. 10).", "",
          "| attack | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for a in attacks:
        cells = [_cell(recs, m, a, lambda r: f"{_p(r['defence_success'])} / {_p(r['robust_accuracy'])} / "
                                             f"{_p(r['hybrid_accuracy'])}") for m in models]
        L.append(f"| {attack_label(a)} | " + " | ".join(cells) + " |")
    pur = s.get("purification", [])
    if pur:
        cols = [k for k in ("undefended", "dafar_purification", "denoising_ae", "binary_filter", "magnet_reformer") if k in pur[0]]
        L += ["", "## Accuracy after purification alone (Fig. 9)", "", "| attack | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]
        for r in pur:
            L.append(f"| {attack_label(r['attack'])} | " + " | ".join(_p(r[c]) for c in cols) + " |")
    t4 = s.get("table4")
    if t4:
        L += ["", "## Feature distances (Table 4)", "",
              f"Mean L2 distance between E(x) of clean images and of perturbed ones, {t4['images']} test images, "
              f"budget {t4['eps_or_sigma']:.3g} (feature dimension {t4['feature_dim']}; mean clean feature norm "
              f"{t4['clean_feature_norm_mean']:.2f}). The paper's numbers are on its own, unstated feature scale.", "",
              "| perturbation | ours | paper |", "|---|---|---|"]
        for k in ("noise", "fgsm", "pgd"):
            L.append(f"| {k} | {t4[k]:.2f} | {t4['paper'][k] if t4.get('paper') else '-'} |")
    dep = s.get("deployed", [])
    if dep:
        files = list(dict.fromkeys(r["model"] for r in dep))
        # a middle and a large budget of each L-inf attack (MNIST 0.1 / 0.3, CIFAR-10 4/255 / 16/255)
        pick = ("0.1", "0.3") if ds == "mnist" else ("4/255", "16/255")
        cols = [a for a in attacks if a.split("-")[0] in ("fgsm", "pgd")
                and attack_label(a).split("-")[1] in tuple(f"eps{e}" for e in pick)]
        cols += [a for a in attacks if a.startswith(("cw-l2", "jsma"))][:2]
        L += ["", "## The deployed files (through the runtime)", "",
              "Detection rate / purified accuracy of each exported file on the same gray-box images (uint8 models get "
              "the images rounded to pixels); every attack and file is in `eval/records/`. For a `detect` graph "
              "(`--mode detect`) the second number is the victim's own accuracy: its label never passes through D.", "",
              "| file | " + " | ".join(attack_label(a) for a in cols) + " |", "|---|" + "---|" * len(cols)]
        for f in files:
            cells = [_cell(dep, f, a, lambda r: f"{_p(r['detection_rate'])} / {_p(r['purified_accuracy'])}") for a in cols]
            L.append(f"| `{Path(f).name}` | " + " | ".join(cells) + " |")
    ad = s.get("adaptive", {})
    if ad.get("methods"):
        L += ["", "## White-box adaptive attacks (the attacker knows the defence)", "",
              f"PGD on `margin(label) - c * relu(score - 0.98 * threshold)` with {ad['steps']} steps from the clean image, "
              f"the gray-box PGD example of the same budget where one was made, and {ad['restarts'] - 1} random "
              f"point{'s' if ad['restarts'] != 2 else ''}, on {ad['images']} images; "
              + ("for DAFAR a BPDA pass (straight-through unpool mask) runs on the images the exact gradient did not break"
                 if ad.get("bpda", True) else "no BPDA pass: this decoder upsamples without an unpool mask, so the exact "
                 "gradient reaches every pixel")
              + ("; then APGD-CE and APGD-DLR (Auto-PGD, Croce and Hein 2020) on the same objective, each "
                 f"{ad['steps']} steps from a random start, on the images still standing (DAFAR and the victim alone)"
                 if ad.get("apgd") else "")
              + ". An image is defended when it is rejected or classified correctly. `DAFAR detect` labels from the "
              "victim's own logits (a `--mode detect` graph); `Victim alone` never rejects. "
              "Cells: attack success / defence success / robust accuracy.", "",
              "| eps | " + " | ".join(ad["methods"]) + " |", "|---|" + "---|" * len(ad["methods"])]
        for i, eps in enumerate(ad["eps"]):
            cells = []
            for mname, rows in ad["methods"].items():
                r = rows[i]
                cells.append(f"{_p(r['attack_success'])} / {_p(r['defence_success'])} / {_p(r['robust_accuracy'])}")
            L.append(f"| {eps_label(eps)} | " + " | ".join(cells) + " |")
        L += ["", "Sanity checks:", ""]
        for mname, rows in ad["methods"].items():
            succ = [r["attack_success"] for r in rows]
            mono = all(b >= a - 0.03 for a, b in zip(succ, succ[1:]))
            grey_only = sum(r.get("graybox_only_images", 0) for r in rows)
            from_grey = sum(r.get("broken_only_from_graybox_start", 0) for r in rows)
            by_apgd = sum(r.get("broken_only_by_apgd_ce", 0) + r.get("broken_only_by_apgd_dlr", 0) for r in rows)
            L.append(f"- {mname}: success {'rises' if mono else 'does NOT rise'} with eps "
                     f"({', '.join(_p(v, 0) for v in succ)}), reaching {_p(succ[-1], 0)} at eps {eps_label(ad['eps'][-1])}; "
                     f"images broken by gray-box PGD but not by the adaptive attack: {grey_only}; images the "
                     f"adaptive gradient broke only when started from the gray-box example: {from_grey}"
                     + (" (the adaptive loss is a poor guide for this defence: read its numbers as a lower bound)"
                        if from_grey > 0.02 * ad["images"] * len(rows) else "")
                     + (f"; images only APGD broke (after PGD and BPDA): {by_apgd}"
                        if any("broken_only_by_apgd_ce" in r for r in rows) else "") + ".")
        for mname, r in ad.get("sanity", {}).items():
            vals = {k: v for k, v in r.items() if k.startswith("steps")}
            L.append(f"- {mname}, eps {eps_label(r['eps'])}, {r['images']} images: " + ", ".join(f"{k}: {_p(v)}" for k, v in vals.items())
                     + " (more steps and restarts should not help much if the attack has converged).")
        cw = ad.get("cw_l2")
        if cw:
            L.append(f"- CW-style L2 variant against {cw['method']}: {_p(cw['attack_success'])} of {cw['images']} images, "
                     f"median L2 distortion of the successes {cw['median_l2_of_successes'] if cw['median_l2_of_successes'] is None else round(cw['median_l2_of_successes'], 3)}.")
    L += ["", "## Notes", "", f"- {s['peers_note']}",
          "- Gray-box numbers say what an attacker who ignores the defence achieves; the adaptive section says what "
          "an attacker who knows it achieves. Detector-plus-purifier defences of this kind have fallen to 0-26% under "
          "adaptive attacks in the literature (MagNet, PixelDefend, Defense-GAN); read the gray-box tables with that in mind.", ""]
    for p in _figs(run_dir, s):
        L.append(f"![{Path(p).stem}]({p})")
    L.append("")
    path = run_dir / "eval_report.md"
    atomic_write_text(path, "\n".join(L))
    return path
