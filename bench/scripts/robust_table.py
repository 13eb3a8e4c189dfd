"""Robust victims with and without DAFAR, side by side: one table from evaluated runs.

    .venv/bin/python bench/scripts/robust_table.py RUN_DIR [RUN_DIR ...] --out bench/results/robust-mnist

Each RUN_DIR is a run that ``dafar eval`` has evaluated (``RUN/eval/summary.json``), e.g. the
paper-trained model and an adversarially trained one (``dafar train --adversarial fast``) under
the same eval flags.  Writes ``robust.md`` and ``robust.json``: per run, how it was trained and
what that cost, its clean accuracy and false-positive rate, gray-box PGD detection, and per
adaptive budget the defence success (rejected or classified correctly) of the victim alone and of
the victim with DAFAR in each mode, with the attack's sanity checks.

The adaptive images are test images the run's victim classifies correctly (``dafar eval`` attacks
only those); ``defended_all`` multiplies by the clean accuracy, counting every clean mistake as
undefended, which is how adversarial-training papers (Madry et al.'s 89%) count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _eps(e: float) -> str:
    """8/255 rather than 0.0314 where the budget is a whole number of 8-bit steps."""
    k = e * 255
    return f"{round(k)}/255" if 0 < e < 1 and abs(k - round(k)) < 1e-6 else f"{e:.3g}"


def _run_row(run: Path) -> dict:
    m = json.loads((run / "manifest.json").read_text())
    s = json.loads((run / "eval" / "summary.json").read_text())
    tr = m["training"]
    adv = tr.get("adversarial")
    met = m["metrics"]
    acc = met["victim_test_acc"]
    label = (f"{adv['mode']} adversarial training ({adv.get('steps', 1)} steps), eps {_eps(adv['eps'])}" if adv
             else "standard training (the paper's)")
    if tr.get("mode") == "plug-in":
        label += ", D attached to a frozen victim"
    ad = s["adaptive"]
    methods = {}
    for name, rows in ad["methods"].items():
        methods[name] = [{"eps": r["eps"], "attack_success": r["attack_success"], "defence_success": r["defence_success"],
                          "robust_accuracy": r["robust_accuracy"], "defended_all": r["defence_success"] * acc,
                          "broken_only_by_apgd": r.get("broken_only_by_apgd_ce", 0) + r.get("broken_only_by_apgd_dlr", 0),
                          "seconds": r.get("seconds")} for r in rows]
    grey = {}
    for r in s["records"]:
        if r["model"] == "DAFAR (l2)" and r["attack"].startswith("pgd"):
            grey[r["attack"]] = {"detection_rate": r["detection_rate"], "auc": r["auc"]}
    return {"run": run.name, "training": label, "adversarial": adv,
            "training_seconds": tr.get("total_seconds"), "epochs": tr["config"]["epochs"],
            "victim_test_acc": acc, "purified_test_acc": met.get("purified_test_acc"),
            "l2_test_fpr": met.get("l2_test_fpr"), "robust_first_look": met.get("robust"),
            "adaptive_images": ad["images"], "steps": ad["steps"], "restarts": ad["restarts"], "apgd": ad.get("apgd"),
            "bpda": ad.get("bpda", True),
            "methods": methods, "sanity": ad.get("sanity"), "graybox_pgd_dafar_l2": grey,
            "eval_seconds": s["timing"].get("adaptive_s")}


def _markdown(rows: list[dict]) -> str:
    L = ["# Robust victims with and without DAFAR", "",
         "Defence success under the white-box adaptive attack (`dafar eval`: PGD from the clean image, the gray-box "
         "example and random points, a BPDA pass through the unpool mask where the decoder has one, then APGD-CE and "
         "APGD-DLR on the same `misclassified and accepted` objective). An image is defended when the deployed decision rejects "
         "it or labels it correctly. In each cell: on the attacked images (test images the victim gets right) / on "
         "all test images (times clean accuracy).", ""]
    L += ["| run | training | train time | clean acc | FPR (l2) | eps | victim alone | + DAFAR hybrid (l2) | "
          "+ DAFAR detect (l2) | + DAFAR hybrid (autoencoder) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps_list = [x["eps"] for x in next(iter(r["methods"].values()))]
        for i, eps in enumerate(eps_list):
            cells = []
            for name in ("Victim alone", "DAFAR (l2)", "DAFAR detect (l2)", "DAFAR (autoencoder)"):
                x = r["methods"].get(name)
                cells.append(f"{_pct(x[i]['defence_success'])} / {_pct(x[i]['defended_all'])}" if x else "-")
            secs = r["training_seconds"]
            head = (f"| `{r['run']}` | {r['training']}, {r['epochs']} epochs | "
                    f"{secs / 60:.1f} min | {_pct(r['victim_test_acc'])} | {_pct(r['l2_test_fpr'])} |"
                    if i == 0 else "| | | | | |")
            L.append(f"{head} {_eps(eps)} | " + " | ".join(cells) + " |")
    L += ["", "Attack settings and sanity checks:", ""]
    for r in rows:
        L.append(f"- `{r['run']}`: {r['adaptive_images']} images, PGD {r['steps']} steps from the clean image, the "
                 f"gray-box example and {r['restarts'] - 1} random point(s)" + (" + BPDA" if r["bpda"] else " (no unpool "
                 "mask: no BPDA)") + (" + APGD-CE/DLR" if r["apgd"] else "") + f"; adaptive part {r['eval_seconds'] or 0:.0f} s.")
        for name, sa in (r["sanity"] or {}).items():
            vals = ", ".join(f"{k}: {_pct(v)}" for k, v in sa.items() if k.startswith("steps"))
            L.append(f"  - sanity, {name}, eps {_eps(sa['eps'])}, {sa['images']} images: {vals}")
        for name, rs in r["methods"].items():
            extra = sum(x["broken_only_by_apgd"] for x in rs)
            L.append(f"  - {name}: attack success " + ", ".join(f"{_pct(x['attack_success'])} at {_eps(x['eps'])}"
                                                            for x in rs) + f"; images only APGD broke: {extra}")
        for k, g in r["graybox_pgd_dafar_l2"].items():
            L.append(f"  - gray-box {k} against DAFAR (l2): detection {_pct(g['detection_rate'])}, AUC {g['auc']:.4f}")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    rows = []
    for run in a.runs:
        try:
            rows.append(_run_row(run))
        except (OSError, ValueError, KeyError) as exc:
            print(f"robust_table: {run} is not an evaluated run ({type(exc).__name__}: {exc}); run `dafar eval` on it",
                  file=sys.stderr)
            return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "robust.json").write_text(json.dumps(rows, indent=1) + "\n")
    (a.out / "robust.md").write_text(_markdown(rows))
    print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
