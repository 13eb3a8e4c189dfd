"""dafar pareto: configurations timed against their own victims, judged against a reference."""
from __future__ import annotations

import json
import shutil

import pytest

from dafar.errors import ConfigError


def _fake_eval(run, aucs: dict[str, float]) -> None:
    """An eval summary as `dafar eval` writes it (only the fields pareto reads)."""
    (run / "eval").mkdir(exist_ok=True)
    recs = [{"model": "DAFAR (l2)", "attack": a, "auc": v} for a, v in aucs.items()]
    recs += [{"model": "MagNet", "attack": "pgd-eps0.3", "auc": 0.5},  # a peer: not DAFAR's number
             {"model": "DAFAR (l2)", "attack": "jsma-gamma0.05", "auc": 0.7}]  # not one of the table's attacks
    (run / "eval" / "summary.json").write_text(json.dumps({"records": recs}))


def test_config_is_validated():
    from dafar.bench import ParetoConfig

    assert ParetoConfig().threads == (1, 2) and ParetoConfig().max_ratio == 1.5
    for bad in ({"threads": (0,)}, {"runs": 3}, {"warmup": -1}, {"max_ratio": 0}, {"auc_tolerance": 1.5},
                {"fpr_tolerance": -0.1}, {"min_decision_agreement": 1.5}):
        with pytest.raises(ConfigError):
            ParetoConfig(**bad)
    with pytest.raises(ValueError):
        ParetoConfig(detector="mahalanobis")


def test_judge_and_front_on_made_up_points():
    from dafar.bench.perf.pareto import ParetoConfig, _front, _judge

    def pt(run, mode, prec, ratio, auc, fpr):
        return {"run": run, "mode": mode, "precision": prec, "latency": {"1": {"ratio_p50": ratio}},
                "auc": auc, "test_fpr": fpr}

    ref_auc = {"fgsm-eps0.3": 1.0, "pgd-eps0.3": 0.999}
    pts = [pt("ref", "hybrid", "float32", 3.1, ref_auc, 0.0057), pt("ref", "hybrid", "int8", 3.0, ref_auc, 0.0056),
           pt("cheap", "detect", "float32", 1.3, {"fgsm-eps0.3": 0.998, "pgd-eps0.3": 0.996}, 0.0040),
           pt("cheap", "detect", "int8", 1.4, {"fgsm-eps0.3": 0.998, "pgd-eps0.3": 0.996}, 0.0035),
           pt("blind", "detect", "float32", 1.2, {"fgsm-eps0.3": 0.97, "pgd-eps0.3": 0.999}, 0.0090),
           pt("blind", "detect", "int8", 1.6, {"fgsm-eps0.3": 0.97, "pgd-eps0.3": 0.999}, 0.0090)]
    v = _judge(pts, "ref", ParetoConfig())
    assert v["cheap|detect"] == {"meets": True, "why_not": []}
    why = " ".join(v["blind|detect"]["why_not"])
    assert not v["blind|detect"]["meets"]
    assert "int8 ratio 1.60 > 1.5" in why and "AUC fgsm-eps0.3" in why and "test FPR 0.90%" in why
    assert "float32 ratio" in " ".join(v["ref|hybrid"]["why_not"])
    # the front: nothing beats "cheap" on every axis; "ref" is slower but has the best AUC
    front = _front(pts, "float32")
    assert {pts[i]["run"] for i in front} == {"ref", "cheap", "blind"}
    dominated = pts + [pt("worse", "detect", "float32", 1.35, {"fgsm-eps0.3": 0.99}, 0.005)]
    assert "worse" not in {dominated[i]["run"] for i in _front(dominated, "float32")}
    # an int8 file that lost its decisions or its detection misses, whatever its speed
    for check, msg in (({"decision_agreement": 0.99, "worst_detection_change": 0.0}, "agree with float on 99.00%"),
                       ({"decision_agreement": 0.999, "worst_detection_change": -0.03}, "int8 detection -3.0 points")):
        pts[3]["int8_check"] = {"layout": "mixed", **check}
        v = _judge(pts, "ref", ParetoConfig())
        assert not v["cheap|detect"]["meets"] and msg in " ".join(v["cheap|detect"]["why_not"])
    pts[3]["int8_check"] = {"layout": "mixed", "decision_agreement": 0.997, "worst_detection_change": -0.005}
    assert _judge(pts, "ref", ParetoConfig())["cheap|detect"]["meets"]
    # exactly the allowed 1 point, as quantize measures it (184/200 -> 186/200: 0.92 - 0.93 in floating point)
    pts[3]["int8_check"] = {"layout": "mixed", "decision_agreement": 0.997, "worst_detection_change": 0.92 - 0.93}
    assert 0.92 - 0.93 < -0.01 and _judge(pts, "ref", ParetoConfig())["cheap|detect"]["meets"]


def test_pareto_times_each_file_against_its_victim(run_clone, tmp_path):
    from dafar.bench import ParetoConfig, pareto
    from dafar.cli import main

    _fake_eval(run_clone, {"fgsm-eps0.3": 0.999, "pgd-eps0.3": 0.9981, "cw-l2-confidence0": 0.8})
    other = tmp_path / "other"
    shutil.copytree(run_clone, other)
    _fake_eval(other, {"fgsm-eps0.3": 0.99, "pgd-eps0.3": 0.998, "cw-l2-confidence0": 0.81})
    out = tmp_path / "cmp"
    cfg = ParetoConfig(threads=(1,), runs=10, warmup=1, max_ratio=100.0)
    res = pareto([run_clone, other], out, cfg, log=lambda *a: None)
    pts = res.summary["points"]
    # the exported run has float fixed-batch TFLite l2 graphs for float-nchw: one per run
    assert [p["model"] for p in pts] == ["export/dafar-l2-float-nchw-b1.tflite"] * 2
    for p in pts:
        q = p["latency"]["1"]
        assert q["runs"] >= 10 and q["p50_ms"] > 0 and q["ratio_p50"] == pytest.approx(q["p50_ms"] / q["victim_p50_ms"])
        assert p["victim_model"] == "export/victim-float-nchw-b1.tflite" and p["mode"] == "hybrid"
        assert 2.5 < p["mac_ratio"] < 3.5 and p["file_bytes"] > p["params"]  # float32 weights: 4 bytes each
        assert set(p["auc"]) == {"fgsm-eps0.3", "pgd-eps0.3", "cw-l2-confidence0"} and 0 <= p["test_fpr"] < 0.1
    v = res.summary["verdicts"]
    assert not any(x["meets"] for x in v.values())  # no int8 files: cannot meet a target that needs both
    assert "needs float and int8" in " ".join(v[f"{pts[0]['run']}|hybrid"]["why_not"])
    assert "AUC fgsm-eps0.3 0.9900 < 0.9990" in " ".join(v[f"{pts[1]['run']}|hybrid"]["why_not"])
    text = res.report.read_text()
    assert "| AUC cw-l2-confidence0 |" in text and "jsma" not in text and "dafar pareto" in text
    assert json.loads((out / "pareto.json").read_text())["reference"] == run_clone.name
    if res.plot is not None:
        assert res.plot.stat().st_size > 1000
    # an int8 row shows its layout and what quantize measured on it
    from dafar.bench.perf.pareto import _md

    q = {**pts[1], "precision": "int8", "int8_check": {"layout": "mixed", "decision_agreement": 0.997,
                                                       "detection_change": {"fgsm": -0.02}, "worst_detection_change": -0.02}}
    text = _md({**res.summary, "points": [pts[0], q]}, cfg, None)
    assert "| int8 (mixed) |" in text and "99.70%, -2.0 points" in text

    # errors: named, before anything is timed
    with pytest.raises(ConfigError, match="inside a run folder"):
        pareto([run_clone], run_clone / "cmp", cfg, log=lambda *a: None)
    with pytest.raises(ConfigError, match="not one of the run folders"):
        pareto([run_clone], out, ParetoConfig(reference=str(tmp_path)), log=lambda *a: None)
    (other / "eval" / "summary.json").write_text("{not json")
    assert main(["pareto", str(other), "--out", str(tmp_path / "c2"), "--threads", "1", "--runs", "10"]) == 2

