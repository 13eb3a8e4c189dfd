"""Cost against detection across defence configurations: ``dafar pareto RUN [RUN ...] --out DIR``.

Each run folder is one configuration of the defence (architecture, feedback position, decoder
width; trained jointly or attached to a frozen victim).  For every fixed-batch TFLite defence
graph of the chosen detector and input contract (each mode, float and int8) this measures LiteRT
latency at each thread count *interleaved with the victim file of the same run and precision*
(the harness's blocks of ten runs, so that machine drift hits both alike) and reads, from the
run folder: MACs and parameters (the manifest's counts on the trained modules), file size, the
clean test FPR at the run's alpha (float: the manifest's threshold table; int8: the quantize
validation), and the gray-box detection ROC AUC per attack from ``dafar eval`` (``RUN/eval``;
the score is the same in both modes, so both share it; a run without an evaluation shows
"not evaluated").

Written to ``DIR``: ``pareto.json`` (every point, every latency sample statistic), ``pareto.md``
(the table, the reference comparison, the command) and ``pareto.png`` (latency ratio against
detection and FPR, the non-dominated points marked).  A point "meets the target" when its
1-thread p50 ratio is within ``--max-ratio`` of the victim in float and in int8, its AUC is
within ``--auc-tolerance`` of the reference run's on every attack both evaluated, and its test
FPR is at most the reference's plus ``--fpr-tolerance``.  The reference is the first run unless
``--reference`` names another: put the paper-sized defence there.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError
from dafar.limits import check_threads
from dafar.manifest import atomic_write_json, atomic_write_text, classifier_alone_message
from dafar.options import option, to_argv
from dafar.run import RunFolder
from dafar.schema import Detector, Format, Graph, InputContract, Mode, Precision

from .harness import _machine, _measure, _Timed, latency_stats
from .macs import fused_costs, subnet_costs

__all__ = ["ParetoConfig", "ParetoResult", "pareto"]

_ATTACKS = ("fgsm", "pgd", "cw")  # the gray-box attacks the table reports (JSMA and noise stay in eval)


@dataclass(frozen=True)
class ParetoConfig:
    detector: Detector = option(Detector.L2, help="the detector whose graphs are compared")
    contract: InputContract = option(InputContract.FLOAT_NCHW, flag="--input", help="the input contract of the files")
    threads: tuple[int, ...] = option((1, 2), help="comma list of LiteRT thread counts")
    runs: int = option(300, help="timed runs per file and thread count (interleaved with the victim)")
    warmup: int = option(30, help="untimed warm-up runs")
    reference: str | None = option(None, none="first", metavar="RUN_DIR",
                                   help="the run the others are judged against (default: the first)")
    max_ratio: float = option(1.5, help="the latency target: p50 at 1 thread over the victim's, float and int8")
    auc_tolerance: float = option(0.005, help="how far under the reference's ROC AUC a point may fall")
    fpr_tolerance: float = option(0.001, help="how far over the reference's test FPR a point may go (0.001 = 0.1 points)")
    min_decision_agreement: float = option(0.995, help="int8 clean reject decisions in agreement with float, at least")
    max_detection_drop: float = option(0.01, help="how far int8 detection may fall under float on an attack (0.01 = 1 "
                                                  "point; from dafar quantize's adversarial comparison)")

    def __post_init__(self):
        object.__setattr__(self, "detector", Detector(self.detector))
        object.__setattr__(self, "contract", InputContract(self.contract))
        v = tuple(self.threads)
        if not v or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in v):
            raise ConfigError(f"threads must be positive integers, got {v!r}")
        for t in v:
            check_threads(t)
        object.__setattr__(self, "threads", tuple(dict.fromkeys(v)))
        if not isinstance(self.runs, int) or self.runs < 10:
            raise ConfigError(f"runs must be an integer >= 10, got {self.runs!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not self.max_ratio > 0:
            raise ConfigError(f"max_ratio must be > 0, got {self.max_ratio!r}")
        for name in ("auc_tolerance", "fpr_tolerance", "min_decision_agreement", "max_detection_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ParetoResult:
    summary: dict
    report: Path
    plot: Path | None


def _label(run: RunFolder) -> str:
    a = run.manifest.get("architecture", {})
    # runs trained before the manifest named them: the paper network of the data set, D at its end
    fam = a.get("family") or f"paper-{(run.manifest.get('dataset') or {}).get('name', '?')}"
    fb = a.get("feedback_at") or "last"
    how = "plug-in" if (run.manifest.get("training") or {}).get("attached_to") else "joint"
    return f"{fam} D@{fb} x{float(a.get('decoder_width', 1.0)):g} ({how})"


def _aucs(run: RunFolder, det: Detector) -> dict[str, float] | None:
    """ROC AUC per gray-box attack from ``RUN/eval/summary.json``; None when the run was not evaluated."""
    p = run.path / "eval" / "summary.json"
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: unreadable evaluation summary ({exc}); rerun `dafar eval {run.path}`") from None
    name = f"DAFAR ({det.value})"
    out = {r["attack"]: float(r["auc"]) for r in s.get("records", [])
           if r.get("model") == name and str(r.get("attack", "")).split("-")[0] in _ATTACKS and r.get("auc") is not None}
    return dict(sorted(out.items())) or None


def _fpr(run: RunFolder, rel: str, det: Detector) -> float | None:
    m = run.manifest
    e = m["exports"][rel]
    if e.get("precision", "float32") == Precision.INT8.value:
        return (e.get("validation") or {}).get("fpr_int8")
    t = (m.get("thresholds") or {}).get(det.value) or {}
    rule = (t.get("rules") or {}).get(e.get("threshold_rule") or t.get("default")) or {}
    return rule.get("test_fpr")


def _int8_check(run: RunFolder, rel: str) -> dict | None:
    """What ``dafar quantize`` measured for an int8 file against its float source: clean reject
    decisions in agreement, and the detection rate on each adversarial set, float and int8."""
    e = run.manifest["exports"][rel]
    if e.get("precision", "float32") != Precision.INT8.value:
        return None
    v = e.get("validation") or {}
    adv = v.get("adversarial") or {}
    deltas = {k: float(r["detection_int8"] - r["detection_float"]) for k, r in adv.items()
              if r.get("detection_int8") is not None and r.get("detection_float") is not None}
    return {"layout": e.get("layout"), "decision_agreement": v.get("decision_agreement"),
            "detection_change": deltas or None,
            "worst_detection_change": min(deltas.values()) if deltas else None}


def _files(run: RunFolder, cfg: ParetoConfig) -> list[tuple[str, str]]:
    """(defence file, victim file) pairs: fixed-batch TFLite, the chosen detector and contract."""
    specs = run.exports()
    victims = {e.pair_key: rel for rel, e in specs.items() if e.graph is Graph.VICTIM}
    pairs = []
    for rel, e in sorted(specs.items()):
        if (e.graph is Graph.DAFAR and e.format is Format.TFLITE and e.batch is not None
                and e.detector is cfg.detector and e.contract is cfg.contract):
            v = victims.get(e.pair_key)
            if v is None:
                raise ConfigError(f"{run.path}: {rel} has no victim file of the same precision and contract to be "
                                  f"timed against; export without --no-victim (and quantize the victim)")
            pairs.append((rel, v))
    if not pairs:
        raise ConfigError(classifier_alone_message(run.manifest, run.path) or f"{run.path}: no fixed-batch TFLite {cfg.detector.value} defence graph with input "
                          f"{cfg.contract.value}; run `dafar export {run.path} --detector {cfg.detector.value} "
                          f"--input {cfg.contract.value} --mode hybrid,detect` (and `dafar quantize`) first")
    return pairs


def _point(run: RunFolder, rel: str, vrel: str, cfg: ParetoConfig, log) -> dict:
    m = run.manifest
    e = run.export(rel)
    mode = (e.mode or Mode.HYBRID).value
    sub = subnet_costs(m)
    with_c = cfg.detector is Detector.AUTOENCODER
    params = sum(sub[k]["params"] for k in ("E", "F", "D")) + (sub["C"]["params"] if with_c else 0)
    chw = run.chw
    lat = {}
    for t in cfg.threads:
        timed = [_Timed(run.path, rel, t, 1, chw), _Timed(run.path, vrel, t, 1, chw)]
        ms = _measure(timed, _Cfg(cfg.runs, cfg.warmup))
        d, v = latency_stats(ms[0]), latency_stats(ms[1])
        lat[str(t)] = {"p50_ms": d["p50_ms"], "p99_ms": d["p99_ms"], "victim_p50_ms": v["p50_ms"],
                       "victim_p99_ms": v["p99_ms"], "ratio_p50": d["p50_ms"] / v["p50_ms"],
                       "ratio_p99": d["p99_ms"] / v["p99_ms"], "runs": d["count"]}
        log(f"{run.path.name}/{Path(rel).name} t{t}: p50 {d['p50_ms']:.3f} ms, victim {v['p50_ms']:.3f} ms, "
            f"ratio {lat[str(t)]['ratio_p50']:.2f}")
    return {"run": str(run.path), "run_name": run.path.name, "config": _label(run), "model": rel, "victim_model": vrel,
            "mode": mode, "precision": e.precision.value, "detector": cfg.detector.value,
            "feedback_at": m.get("architecture", {}).get("feedback_at"),
            "decoder_width": float(m.get("architecture", {}).get("decoder_width", 1.0)),
            "macs": fused_costs(m, cfg.detector.value, mode)["fused_macs"],
            "mac_ratio": fused_costs(m, cfg.detector.value, mode)["mac_ratio"], "params": params,
            "d_params": sub["D"]["params"], "file_bytes": m["files"][rel]["bytes"],
            "victim_file_bytes": m["files"][vrel]["bytes"], "test_fpr": _fpr(run, rel, cfg.detector),
            "auc": _aucs(run, cfg.detector), "int8_check": _int8_check(run, rel), "latency": lat}


@dataclass(frozen=True)
class _Cfg:  # what _measure reads
    runs: int
    warmup: int
    min_seconds: float = 0.0


def _judge(points: list[dict], ref_run: str, cfg: ParetoConfig) -> dict:
    """Per configuration (run, mode): does it meet the target against the reference run?"""
    ref = [p for p in points if p["run"] == ref_run]
    ref_auc = next((p["auc"] for p in ref if p["auc"]), None)
    ref_fpr = next((p["test_fpr"] for p in ref if p["precision"] == "float32" and p["test_fpr"] is not None), None)
    verdicts = {}
    for key in dict.fromkeys((p["run"], p["mode"]) for p in points):
        pts = [p for p in points if (p["run"], p["mode"]) == key]
        ratios = {p["precision"]: p["latency"].get("1", {}).get("ratio_p50") for p in pts}
        fl = next((p for p in pts if p["precision"] == "float32"), None)
        why = []
        if "float32" not in ratios or "int8" not in ratios or "1" not in pts[0]["latency"]:
            why.append("needs float and int8 files timed at 1 thread")
        else:
            why += [f"{prec} ratio {r:.2f} > {cfg.max_ratio:g}" for prec, r in ratios.items() if r > cfg.max_ratio]
        auc = pts[0]["auc"]
        if auc is None or ref_auc is None:
            why.append("not evaluated (dafar eval)" if auc is None else "reference not evaluated")
        else:
            common = sorted(set(auc) & set(ref_auc))
            if not common:
                why.append("no attack evaluated on both")
            why += [f"AUC {a} {auc[a]:.4f} < {ref_auc[a]:.4f} - {cfg.auc_tolerance:g}" for a in common
                    if auc[a] < ref_auc[a] - cfg.auc_tolerance]
        q = next((p["int8_check"] for p in pts if p["precision"] == "int8" and p.get("int8_check")), None)
        if q is not None:  # the int8 file must keep the float decisions (the quantize stage measured it)
            if q["decision_agreement"] is not None and q["decision_agreement"] < cfg.min_decision_agreement:
                why.append(f"int8 reject decisions agree with float on {100 * q['decision_agreement']:.2f}% < "
                           f"{100 * cfg.min_decision_agreement:g}%")
            # rounded: detection rates are counts over n images, and 0.93 - 0.92 is 0.0100000000000000089
            if q["worst_detection_change"] is not None and round(q["worst_detection_change"], 9) < -cfg.max_detection_drop:
                why.append(f"int8 detection {100 * q['worst_detection_change']:+.1f} points against float "
                           f"(more than {100 * cfg.max_detection_drop:g})")
        if fl is None or fl["test_fpr"] is None or ref_fpr is None:
            why.append("test FPR unknown")
        elif fl["test_fpr"] > ref_fpr + cfg.fpr_tolerance:
            why.append(f"test FPR {100 * fl['test_fpr']:.2f}% > {100 * ref_fpr:.2f}% + {100 * cfg.fpr_tolerance:g} points")
        verdicts[f"{key[0]}|{key[1]}"] = {"meets": not why, "why_not": why}
    return verdicts


def _front(points: list[dict], precision: str) -> set[int]:
    """Indices of the non-dominated points (lower 1-thread ratio, higher worst AUC, lower FPR)."""
    cand = [(i, p["latency"]["1"]["ratio_p50"], min(p["auc"].values()), p["test_fpr"] or 0.0)
            for i, p in enumerate(points) if p["precision"] == precision and p["auc"] and "1" in p["latency"]]
    out = set()
    for i, r, a, f in cand:
        if not any((r2 <= r and a2 >= a and f2 <= f) and (r2 < r or a2 > a or f2 < f) for j, r2, a2, f2 in cand if j != i):
            out.add(i)
    return out


def _plot(out: Path, points: list[dict], max_ratio: float) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # tables only
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    marker = {"float32": "o", "int8": "s"}
    color = {"hybrid": "tab:red", "detect": "tab:blue"}
    for prec in ("float32", "int8"):
        front = _front(points, prec)
        for i, p in enumerate(points):
            if p["precision"] != prec or "1" not in p["latency"]:
                continue
            x = p["latency"]["1"]["ratio_p50"]
            ys = (min(p["auc"].values()) if p["auc"] else np.nan, 100 * (p["test_fpr"] or np.nan))
            for ax, y in zip(axes, ys):
                ax.scatter([x], [y], marker=marker[prec], c=color.get(p["mode"], "gray"), s=60 if i in front else 30,
                           edgecolors="black" if i in front else "none")
                ax.annotate(f"{p['run_name']} {p['mode'][:3]}", (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    axes[0].set_ylabel("worst gray-box ROC AUC (FGSM, PGD, CW-L2)")
    axes[1].set_ylabel("clean test FPR at alpha (%)")
    for ax in axes:
        ax.set_xlabel("LiteRT p50 latency / victim's (1 thread, same precision)")
        ax.axvline(max_ratio, color="gray", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_title("circles float, squares int8; red hybrid, blue detect; outlined: Pareto front", fontsize=8)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md(summary: dict, cfg: ParetoConfig, plot: Path | None) -> str:
    pts = summary["points"]
    threads = [str(t) for t in cfg.threads]
    attacks = sorted({a for p in pts if p["auc"] for a in p["auc"]})
    L = ["# Defence cost against detection", "",
         f"Reproduce: `{summary['command']}` ({summary['date']}, {summary['machine'].get('cpu', '?')}, "
         f"{summary['seconds']:.0f} s). LiteRT, batch 1, input {cfg.contract.value}, detector {cfg.detector.value}; "
         f"each file timed interleaved with its own run's victim file of the same precision ({cfg.runs} runs after "
         f"{cfg.warmup} warm-up, in blocks of 10). Ratios are p50 (and p99) over the victim's. AUC: gray-box ROC AUC "
         f"from each run's `dafar eval` of the float defence (the score is the same in both modes; for int8 rows the last "
         f"column gives what `dafar quantize` measured on the int8 file itself: clean decisions in agreement with float "
         f"and the largest fall in detection rate on its adversarial sets). FPR: clean test images at the run's "
         f"alpha (int8: recalibrated alpha, quantize validation). Reference: `{summary['reference']}`.", ""]
    if plot is not None:
        L += [f"![cost against detection]({plot.name})", ""]
    head = ["configuration", "run", "mode", "prec", "MACs (x victim)", "params", "file KiB"]
    head += [f"t{t} p50 ms (ratio)" for t in threads] + [f"t{t} p99 ratio" for t in threads]
    head += ["test FPR"] + [f"AUC {a}" for a in attacks] + ["int8: decisions agree, worst detection change"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pts:
        chk = p.get("int8_check")
        prec = f"int8 ({chk['layout']})" if chk and chk.get("layout") else ("int8" if p["precision"] == "int8" else "float")
        row = [p["config"], p["run_name"], p["mode"], prec,
               f"{p['macs'] / 1e6:.1f} M ({p['mac_ratio']:.2f})", f"{p['params']:,}", f"{p['file_bytes'] / 1024:.0f}"]
        for t in threads:
            q = p["latency"].get(t)
            row.append(f"{q['p50_ms']:.3f} ({q['ratio_p50']:.2f})" if q else "-")
        for t in threads:
            q = p["latency"].get(t)
            row.append(f"{q['ratio_p99']:.2f}" if q else "-")
        row.append(f"{100 * p['test_fpr']:.2f}%" if p["test_fpr"] is not None else "-")
        row += [f"{p['auc'][a]:.4f}" if p["auc"] and a in p["auc"] else "not evaluated" for a in attacks]
        if not chk:
            row.append("")
        else:
            agree = f"{100 * chk['decision_agreement']:.2f}%" if chk["decision_agreement"] is not None else "-"
            wdc = chk["worst_detection_change"]
            row.append(f"{agree}, " + (f"{100 * wdc:+.1f} points" if wdc is not None
                                       else "not compared (quantize --attack-images 0)"))
        L.append("| " + " | ".join(row) + " |")
    L += ["", f"## Against the target (<= {cfg.max_ratio:g}x the victim at 1 thread in float and int8, AUC within "
          f"{cfg.auc_tolerance:g} of the reference on every attack, test FPR at most {100 * cfg.fpr_tolerance:g} "
          f"points over it; int8 clean decisions >= {100 * cfg.min_decision_agreement:g}% in agreement with float and "
          f"int8 detection at most {100 * cfg.max_detection_drop:g} point(s) under it where quantize compared them)", ""]
    for key, v in summary["verdicts"].items():
        run, mode = key.split("|")
        L.append(f"* `{Path(run).name}` {mode}: " + ("**meets it**" if v["meets"] else "misses: " + "; ".join(v["why_not"])))
    return "\n".join(L) + "\n"


def pareto(run_dirs, out_dir, cfg: ParetoConfig = ParetoConfig(), *, log=print) -> ParetoResult:
    """Time and tabulate every configuration; write ``pareto.json``, ``pareto.md`` and ``pareto.png``."""
    if not run_dirs:
        raise ConfigError("name at least one run folder")
    runs = [RunFolder.open(r, verify=False) for r in run_dirs]
    names = [str(r.path.resolve()) for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("a run folder is named twice")
    ref = str(Path(cfg.reference).resolve()) if cfg.reference else names[0]
    if ref not in names:
        raise ConfigError(f"the reference {cfg.reference} is not one of the run folders compared")
    out = Path(out_dir)
    if out.resolve() in {Path(n) for n in names} or any(Path(n) in out.resolve().parents for n in names):
        raise ConfigError(f"--out {out} lies inside a run folder; write the comparison elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(run, _files(run, cfg)) for run in runs]  # every run checked before anything is timed
    for run, ps in pairs:
        run.verify([f for pair in ps for f in pair])
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    points = []
    todo = [(run, rel, v) for run, ps in pairs for rel, v in ps]
    for run, rel, v in tqdm(todo, desc="pareto", unit="file", leave=False):
        p = _point(run, rel, v, cfg, log)
        p["run"] = str(run.path.resolve())
        points.append(p)
    argv = " ".join(str(r) for r in run_dirs)
    summary = {"command": f"dafar pareto {argv} --out {out_dir} {' '.join(to_argv(cfg))}".strip(),
               "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
               "config": {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(cfg).items()},
               "reference": Path(ref).name, "points": points, "seconds": time.perf_counter() - t0}
    summary["verdicts"] = _judge(points, ref, cfg)
    atomic_write_json(out / "pareto.json", summary)
    plot = _plot(out, points, cfg.max_ratio)
    report = out / "pareto.md"
    atomic_write_text(report, _md(summary, cfg, plot))
    return ParetoResult(summary, report, plot)
