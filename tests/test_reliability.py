"""Reliability at CI scale: fuzzing, tampered files, a long-ish run, concurrency, CLI errors and a
stage killed mid-way.  `dafar reliability` runs the same code at full scale (10,000 fuzz cases,
100,000 inferences)."""
import numpy as np
import pytest

pytest.importorskip("hypothesis")
pytestmark = pytest.mark.slow

MODELS = ("export/dafar-l2-float-nchw-b1.tflite", "export/dafar-autoencoder-float-nchw.onnx")


@pytest.mark.parametrize("model", MODELS)
def test_fuzzing_finds_no_failure(exported_run, model):
    from dafar.bench.reliability.checks import fuzz

    s = fuzz(exported_run, model, cases=150, log=lambda *a: None)
    assert s["cases"] == 300 and s["failures"] == 0, s["failure_examples"]
    assert s["outcomes"].get("raise:InputValidationError", 0) > 0 and s["outcomes"].get("reject:result", 0) > 0
    assert s["max_seconds"] < 30


@pytest.mark.parametrize("model", MODELS)
def test_tampered_files_are_refused(exported_run, model):
    from dafar.bench.reliability.checks import file_checks

    rows = file_checks(exported_run, model)
    assert len(rows) == 10
    for r in rows:
        assert r["refused"], r
        assert r["names_file"], r
    assert next(r for r in rows if r["case"].startswith("pickle"))["pickle_executed"] is False


def test_long_run_and_concurrency(exported_run):
    from dafar.bench.reliability.checks import concurrency, long_run

    lr = long_run(exported_run, MODELS[0], n=3000, sample_every=500)
    assert lr["inferences"] == 3000 and lr["rss_growth_after_warmup_mib"] < 20 and np.isfinite(lr["latency_drift_pct"])
    c = concurrency(exported_run, MODELS[1], threads=8, total=800)
    assert c["identical"] and c["inferences"] == 800


def test_cli_errors_and_killed_stage(exported_run, tmp_path):
    from dafar.bench.reliability.checks import cli_checks, interrupted_stage

    rows = cli_checks(exported_run, tmp_path)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    it = interrupted_stage(exported_run, tmp_path, after_s=4.0)
    assert it["manifest_unchanged"] and it["folder_verifies"]
    assert it["next_export_exit"] == 0 and not it["staging_after_next_export"]


def test_fault_classes(exported_run, tmp_path):
    """Every class of fault a new user hit (resource bounds, file system, concurrency, manifest
    parsing, array-likes, device install) ends as documented: the exit code, the words, no
    traceback, nothing lost."""
    from dafar.bench.reliability.faults import FAULT_CLASSES, fault_checks

    rows = fault_checks(exported_run, MODELS[0], tmp_path, log=lambda *a: None)
    assert {r["class"] for r in rows} == set(FAULT_CLASSES)
    for cls in FAULT_CLASSES:
        assert sum(r["class"] == cls for r in rows) >= 3, cls
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad


def test_fault_report_counts_each_class(tmp_path):
    from dafar.bench.reliability.checks import _fault_section

    rows = [{"class": "array-likes", "case": "a", "expected": "x", "ok": True, "detail": "d|e"},
            {"class": "array-likes", "case": "b", "expected": "x", "ok": False, "detail": "line\nbreak"},
            {"class": "concurrency", "case": "c", "expected": "x", "ok": True, "detail": ""},
            {"class": "concurrency", "case": "d", "expected": "x", "ok": True, "detail": "", "skipped": True}]
    text = "\n".join(_fault_section(rows))
    assert "| array-likes | 2 | 1 (FAILURES) |" in text and "| concurrency | 2 | 1 (1 skipped: could not" in text
    assert "| all | 4 | 2 (1 skipped" in text and "d/e" in text and "line break" in text
    assert "| concurrency | d | x | skipped |" in text  # not "ok": a case that did not run passed nothing
