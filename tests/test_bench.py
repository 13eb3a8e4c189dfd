"""The benchmark harness: MAC and parameter counts against torch, the statistics, and a full bench
of a small run producing well-formed records and a report."""
import json
import re
from pathlib import Path

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
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match="official_rounds"):
            BenchConfig(official_rounds=bad)
    assert BenchConfig(device_only=True).torch is False
    assert BenchConfig(device_only=True).gpu_readiness is False  # the analyzer and fp16 need TensorFlow and torch


def test_gpu_analyzer_verdict_is_parsed_strictly():
    from dafar.bench.perf.gpu_ready import parse_analyzer

    ok = ("=== model.tflite ===\nSubgraph#0 main(T#0) -> [T#5]\n  Op#0 CONV_2D(T#0, T#1, T#2) -> [T#3]\n\n"
          "Your model looks compatible with GPU delegate on TFLite runtime version 2.21.0.\n")
    assert parse_analyzer(ok) == {"compatible": True, "problems": []}
    # the analyzer's report for an op the delegate cannot run (as in TensorFlow's own guide)
    bad = ("Subgraph#0 main(T#0) -> [T#4]\n  Op#0 CUSTOM(T#0) -> [T#1]\n"
           "GPU COMPATIBILITY WARNING: Not supported custom op FlexCosh\n"
           "GPU COMPATIBILITY WARNING: Subgraph#0 has GPU delegate compatibility issues at nodes 0 on TFLite runtime "
           "version 2.21.0\n")
    v = parse_analyzer(bad)
    assert v["compatible"] is False and any("FlexCosh" in p for p in v["problems"]) and len(v["problems"]) == 2
    # neither a warning nor the closing sentence (a truncated or unexpected report): not confirmed
    v = parse_analyzer("Subgraph#0 main(T#0) -> [T#4]\n")
    assert v["compatible"] is False and v["problems"]


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
    g = s["gpu_readiness"]
    assert set(g["analyzer"]) == {m for m in models if m.endswith(".tflite")}
    assert all(v["compatible"] for v in g["analyzer"].values()), g["analyzer"]
    fp = {(r["graph"], r["detector"], r["mode"]): r for r in g["fp16"]["rows"]}
    assert ("victim", None, None) in fp and ("dafar", "l2", "hybrid") in fp
    d = fp[("dafar", "l2", "hybrid")]
    # fp16 moves the score (that is why it is measured) but keeps labels and nearly every decision
    assert d["images"] == 1000 and d["label_agreement"] >= 0.99 and d["decision_agreement"] >= 0.98
    assert 0 < d["score_rel_diff_median"] < 0.05 and d["score_rel_diff_max"] >= d["score_rel_diff_p99"]
    text = write_bench_report(run_clone).read_text()
    assert "Fused-to-victim latency ratio" in text and "Table 6" in text and "## Memory" in text
    assert "## GPU readiness" in text and "**not measured**" in text and "compatible" in text
    st = s["stages"]
    ort = {r["model"]: r for r in st["onnxruntime"]}
    assert set(ort) == {"export/dafar-l2-float-nchw.onnx"}
    r = ort["export/dafar-l2-float-nchw.onnx"]
    # every stage of a hybrid graph appears, nearly all kernel time is attributed, kernels fit in the call
    for k in ("E", "F", "D", "score and decision", "purification (E, F again)"):
        assert r["stage_us"][k] > 0, r
    assert r["stage_us"].get("unattributed", 0) < 0.05 * r["kernels_us"] and r["kernels_us"] <= r["run_us"]
    (lit,) = st["litert"]  # float-nchw TFLite: victim and hybrid, no detect graph in this run
    assert lit["stage_ms"]["E + F (the victim)"] > 0 and "D + score + purification" in lit["stage_ms"]
    (off,) = st["official"]
    assert off["model"] == "export/dafar-l2-float-nchw-b1.tflite" and off["official_ratio"] > 1 and "agreement" in off
    # one official ratio and one of ours per round, ours measured beside the tool's; medians compared
    rounds = BenchConfig().official_rounds
    assert len(off["official_ratios"]) == len(off["our_ratios"]) == rounds
    assert off["our_ratio"] == pytest.approx(float(np.median(off["our_ratios"])))
    assert off["agreement"] == pytest.approx(off["official_ratio"] / off["our_ratio"] - 1)
    assert "## Where the time goes" in text and (run_clone / "plots" / "bench_stages.png").is_file()
    assert (run_clone / "plots" / "bench_latency.png").is_file()


@pytest.mark.slow
def test_fp16_weight_tflite_files_are_converted_and_compared(run_clone):
    """--fp16-tflite: every float batch-1 float-nchw TFLite graph gets an fp16-weights twin (half
    the size, DEQUANTIZE ops for its weights, builtin ops only) that LiteRT runs and the report
    compares with the float32 file."""
    from dafar.bench.perf.harness import run_bench
    from dafar.bench.perf.report import write_bench_report

    models = ("export/dafar-l2-float-nchw-b1.tflite", "export/victim-float-nchw-b1.tflite")
    cfg = BenchConfig(threads=(1,), runs=5, warmup=1, models=models, accuracy_images=0, memory=False, torch=False,
                      gpu=False, stage_profile=False, fp16_images=200, fp16_tflite=True)
    s = run_bench(run_clone, cfg, log=lambda *a: None)
    rows = {r["model"]: r for r in s["gpu_readiness"]["fp16_tflite"]["rows"]}
    # every float-nchw batch-1 TFLite graph of the run, not only the timed ones
    assert {"export/dafar-l2-float-nchw-b1.tflite", "export/dafar-autoencoder-float-nchw-b1.tflite",
            "export/victim-float-nchw-b1.tflite"} <= set(rows)
    for rel, r in rows.items():
        f = run_clone / r["fp16_file"]
        assert f.is_file() and f.parent == run_clone / "bench" / "fp16"
        assert r["dequantize_ops"] > 0 and r["bytes_fp16"] < 0.6 * r["bytes_fp32"], r
        assert r["images"] == 200 and r["label_agreement"] >= 0.99, r
    d = rows["export/dafar-l2-float-nchw-b1.tflite"]
    # fp16 weights move the score a little, not to zero and not far
    assert 0 < d["score_rel_diff_median"] < 0.01 and d["decision_agreement"] >= 0.98, d
    text = write_bench_report(run_clone).read_text()
    assert "fp16-weights TFLite files" in text and "dafar-l2-float-nchw-b1.tflite" in text


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
    assert s["config"]["device_only"] and "torch" not in s and "gpu_readiness" not in s and s["ratios"]
    assert (run / "bench_report.md").is_file()


@pytest.mark.slow
def test_bench_device_only_times_what_a_one_backend_install_can_run(exported_run, tmp_path):
    """`dafar bench --device-only` as on a `.[onnx-runtime]` install (no LiteRT, no tqdm, no
    matplotlib, no torch): the .onnx files are timed, the .tflite ones named as not timed, rc 0."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    blocked = ("torch", "tensorflow", "ai_edge_litert", "tflite_runtime", "tqdm", "matplotlib")
    code = (
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
        + "from dafar.cli import main\n"
        f"rc = main(['bench', {str(run)!r}, '--device-only', '--threads', '1', '--runs', '5', '--warmup', '1',"
        "'--accuracy-images', '20', '--no-memory'])\nprint('rc', rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "rc 0" in out.stdout, out.stderr[-2000:]
    s = json.loads((run / "bench" / "summary.json").read_text())
    assert s["config"]["skipped_formats"] == [".tflite"] and s["ratios"]
    assert {Path(r["model"]).suffix for r in s["records"]} == {".onnx"}
    assert "Not timed: the .tflite files" in (run / "bench_report.md").read_text()


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


def test_onnx_nodes_are_attributed_to_the_stage_that_made_them():
    """The exporter's module scopes decide the stage; E and F after D are the purification pass;
    names ONNX Runtime gives fused or inserted nodes map back."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from dafar.bench.perf.stages import _stage_of, onnx_node_stages

    def node(op, name, inp, out, scopes):
        n = helper.make_node(op, inp, [out], name=name)
        if scopes is not None:
            p = n.metadata_props.add()
            p.key, p.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return n

    nodes = [node("Relu", "node_mul", ["x"], "mul", ["", "pre", "mul"]),
             node("Relu", "node_conv2d", ["mul"], "relu", ["", "E", "E.blocks.0", "conv2d"]),
             node("Relu", "node_linear", ["relu"], "linear", ["", "F", "F.fc.1", "linear"]),
             node("Relu", "node_convolution", ["relu"], "rec", ["", "D", "D.inner.0", "convolution"]),
             node("Relu", "node_sub", ["rec"], "sub", ["", "sub"]),
             node("Relu", "node_conv2d_4", ["rec"], "relu_9", ["", "E", "E.blocks.0", "conv2d_4"]),
             node("Relu", "node_linear_3", ["relu_9"], "linear_3", ["", "F", "F.fc.1", "linear_3"]),
             node("ArgMax", "node_argmax", ["linear_3"], "label", ["", "argmax"]),
             node("Relu", "node_q", ["label"], "q", None)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, None)])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnx.save(helper.make_model(g), str(path))
        st = onnx_node_stages(path)
    assert st["node_mul"] == "preprocess" and st["node_conv2d"] == "E" and st["node_linear"] == "F"
    assert st["node_convolution"] == "D" and st["node_sub"] == "score and decision"
    assert st["node_conv2d_4"] == "purification (E, F again)" and st["node_linear_3"] == "purification (E, F again)"
    assert st["node_argmax"] == "label" and st["node_q"] == "unattributed"
    # ONNX Runtime's names: a Conv fused with its Relu is named after the Relu's output with _nchwc,
    # a fused Gemm "fused <node>", layout reorders are its own
    assert _stage_of("relu_nchwc", st) == "E" and _stage_of("relu_9_nchwc", st) == "purification (E, F again)"
    assert _stage_of("fused node_linear", st) == "F" and _stage_of("ReorderOutput_token_3", st) == "layout (ORT-inserted)"
    assert _stage_of("something_new", st) == "unattributed"


@pytest.mark.slow
def test_arm64_icounts_are_summarised_into_ratios_and_the_report(run_clone, tmp_path):
    """arm64_icount.sh's raw counts (one line per marked inference) become per-file medians, the
    defence over its victim and int8 over float, and a bench-report section; a file whose run
    failed is reported with its error, not dropped."""
    from dafar.bench.perf.icount import report_section, summarize

    raw = tmp_path / "raw"
    raw.mkdir()
    counts = {"dafar-l2-float-nchw-b1.tflite": [3_000_000, 3_000_000, 3_000_300],
              "victim-float-nchw-b1.tflite": [1_000_000] * 3, "dafar-l2-float-nchw.onnx": []}
    for name, c in counts.items():
        (raw / f"cortex-a72--{name}.txt").write_text("".join(f"{v}\n" for v in c))
    (raw / "cortex-a72--dafar-l2-float-nchw.onnx.txt.log").write_text("Traceback ...\nSegmentation fault\n")
    (raw / "cortex-a72--not-in-this-run.tflite.txt").write_text("5\n")
    s = summarize(run_clone, raw, runs=3, qemu="qemu-aarch64 7.2")
    by = {r["model"]: r for r in s["rows"]}
    assert set(by) == {f"export/{n}" for n in counts}
    d = by["export/dafar-l2-float-nchw-b1.tflite"]
    assert d["median"] == 3_000_000 and d["over_victim"] == pytest.approx(3.0) and d["spread"] == pytest.approx(1e-4)
    assert by["export/dafar-l2-float-nchw.onnx"]["error"] == "Segmentation fault"
    assert (run_clone / "bench" / "arm64_icount.json").is_file()
    text = "\n".join(report_section(s))
    assert "not Pi milliseconds" in text and "| `dafar-l2-float-nchw-b1.tflite` | 3.00 | 3.00 |" in text
