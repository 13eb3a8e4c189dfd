"""The export part of a run folder's ``report.md`` (:mod:`dafar.report` assembles the whole report)."""
from __future__ import annotations

__all__ = ["exports_section"]


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def exports_section(m: dict) -> list[str]:
    """The float exports' table of ``report.md``: one row per file with its parity figures."""
    float_exports = {k: v for k, v in m.get("exports", {}).items() if v.get("precision", "float32") == "float32"}
    if not float_exports:
        return []
    m = {**m, "exports": float_exports}
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
