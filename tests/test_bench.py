"""The benchmark harness: MAC and parameter counts against torch, the statistics, and a full bench
of a small run producing well-formed records and a report."""
import json
import re

import numpy as np
import pytest

from dafar.bench.perf.harness import BenchConfig, latency_stats
from dafar.bench.perf.macs import fused_costs, subnet_costs
from dafar.errors import ConfigError


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_costs_match_torch(dataset):
    pytest.importorskip("torch")
    from dafar.train.cost import subnet_costs as counted
    from dafar.train.models import build_dafar

    counts = counted(build_dafar(dataset))  # forward hooks on the real modules (what the manifest records)
    costs = subnet_costs(dataset)  # the paper's tables (runs trained before the manifest recorded costs)
    assert costs == counts
    assert subnet_costs({"architecture": {"costs": counts}, "dataset": {"name": "other"}}) == counts
    f = fused_costs(dataset, "l2")
    assert f["fused_macs"] == 2 * (counts["E"]["macs"] + counts["F"]["macs"]) + counts["D"]["macs"]
    assert 2.9 < f["mac_ratio"] < 3.0


def test_latency_stats_and_config_errors():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["count"] == 5 and s["p50_ms"] == 3.0 and s["max_ms"] == 100.0 and s["min_ms"] == 1.0
    assert s["p99_ms"] > s["p90_ms"] > s["p50_ms"]
    with pytest.raises(ConfigError):
        BenchConfig(threads=(0,))
    with pytest.raises(ConfigError):
        BenchConfig(runs=2)
    assert BenchConfig(device_only=True).torch is False


@pytest.mark.slow
def test_bench_small_run_writes_records_and_report(run_clone):
    from dafar.bench.perf.harness import run_bench
    from dafar.bench.perf.report import write_bench_report

    models = ("export/dafar-l2-float-nchw.onnx", "export/dafar-l2-float-nchw-b1.tflite",
              "export/victim-float-nchw.onnx", "export/victim-float-nchw-b1.tflite")
    cfg = BenchConfig(threads=(1,), batches=(1, 4), runs=10, warmup=2, models=models, accuracy_images=50)
    s = run_bench(run_clone, cfg, log=lambda *a: None)
    recs = list((run_clone / "bench").glob("*__t1__b*.json"))
    # ONNX defence and victim at batches 1 and 4, TFLite at its own batch 1
    assert len(recs) == 6
    for p in recs:
        r = json.loads(p.read_text())
        for k in ("init_ms", "first_inference_ms", "mean_ms", "std_ms", "p50_ms", "p90_ms", "p99_ms"):
            assert np.isfinite(r[k]) and r[k] >= 0
        assert r["count"] >= 10 and len(r["samples_ms"]) == r["count"]
    ratios = {(r["model"], r["batch"]) for r in s["ratios"]}
    assert ("export/dafar-l2-float-nchw-b1.tflite", 1) in ratios and ("export/dafar-l2-float-nchw.onnx", 4) in ratios
    for r in s["ratios"]:
        assert r["latency_ratio"] > 1.0 and 2.9 < r["mac_ratio"] < 3.0
    assert all(s["memory"][m]["model_peak_kib"] > 0 for m in models)
    acc = s["accuracy"]["export/dafar-l2-float-nchw.onnx"]
    assert acc["images"] == 50 and 0 <= acc["fpr"] <= 1 and acc["victim_acc"] >= 0.3  # chance is 0.1; 128 training images
    assert s["cost"]["overhead_without_C"] < s["cost"]["overhead_with_C"]
    assert any(r.get("backend") == "torch-eager" for r in s["torch"])
    text = write_bench_report(run_clone).read_text()
    assert "Fused-to-victim latency ratio" in text and "Table 6" in text and "## Memory" in text
    assert (run_clone / "plots" / "bench_latency.png").is_file()


@pytest.mark.slow
def test_bench_device_only_has_no_torch(exported_run, tmp_path):
    """`dafar bench --device-only` in a process where torch cannot be imported."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorflow'] = None;"
        "from dafar.cli import main;"
        f"rc = main(['bench', {str(run)!r}, '--device-only', '--threads', '1', '--runs', '5', '--warmup', '1',"
        "'--models', 'export/dafar-l2-uint8-nhwc-b1.tflite,export/victim-uint8-nhwc-b1.tflite', '--accuracy-images', '20',"
        "'--no-memory']); print('rc', rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "rc 0" in out.stdout, out.stderr[-2000:]
    s = json.loads((run / "bench" / "summary.json").read_text())
    assert s["config"]["device_only"] and "torch" not in s and s["ratios"]
    assert (run / "bench_report.md").is_file()


def test_train_speed_measures_both_models(capsys):
    pytest.importorskip("torch")
    from dafar.bench.perf import train_speed

    r = train_speed.measure("mnist", batch_size=4, steps=2, threads=1)
    for name in ("joint", "victim_only"):
        s = r[name]
        assert 0 < s["q1_s"] <= s["median_s"] <= s["q3_s"] and s["min_per_epoch"] > 0
    assert train_speed.main(["--dataset", "mnist", "--batch-size", "4", "--steps", "1", "--threads", "1"]) == 0
    assert "min per epoch" in capsys.readouterr().out
    with pytest.raises(ValueError, match="dataset"):
        train_speed.measure("imagenet")


def test_collect_keeps_a_runs_reports_with_their_plots_and_records(run_clone, tmp_path, capsys):
    from dafar.cli import main
    from dafar.errors import RunFolderError
    from dafar.report import write_run_report as write_report

    write_report(run_clone)
    dest = tmp_path / "reports" / "mnist"
    assert main(["summary", str(run_clone), "--collect", str(dest)]) == 0
    capsys.readouterr()
    assert (dest / "report.md").read_text() == (run_clone / "report.md").read_text()
    linked = re.findall(r"\]\((plots/[^)]+)\)", (dest / "report.md").read_text())
    assert linked and all((dest / p).is_file() for p in linked)  # every plot the report shows came along
    assert json.loads((dest / "records/manifest.json").read_text())["manifest_sha256"]
    assert "headline numbers" in (dest / "summary.md").read_text()
    (run_clone / "report.md").unlink()
    assert main(["summary", str(run_clone), "--collect", str(dest)]) == 0  # a second collect replaces the first
    assert not (dest / "report.md").exists()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="did not write"):
        from dafar.bench.summary import collect

        collect(run_clone, dest)
    assert (dest / "notes.txt").read_text() == "mine"


def test_summary_gathers_what_the_stages_wrote(run_clone, capsys):
    from dafar.bench.summary import render_markdown, summarize
    from dafar.cli import main
    from dafar.errors import RunFolderError
    from dafar.manifest import read_manifest

    m = read_manifest(run_clone)
    d = summarize(run_clone)
    assert d["label"] == "MNIST" and d["quantize"] is None and d["bench"] is None and d["eval"] is None
    assert d["training"]["victim_test_acc"] == m["metrics"]["victim_test_acc"]
    floats = [e for e in m["exports"].values() if e.get("precision", "float32") != "int8"]
    assert d["export"]["files"] == len(floats) > 0  # int8 files are counted under quantize, not here
    assert d["export"]["label_agreement_min"] == min(e["validation"]["label_agreement"] for e in floats)
    md = render_markdown(d)
    assert f"{100 * m['metrics']['victim_test_acc']:.2f}%" in md and "0.16%" in md  # ours beside the paper's
    assert main(["summary", str(run_clone), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["victim_test_acc"] == m["metrics"]["victim_test_acc"]
    (run_clone / "quantize_report.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="quantize_report.json"):
        summarize(run_clone)
