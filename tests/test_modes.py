"""Defence graph modes (``--mode hybrid|detect``): the detect graph's label is the victim's own,
its score and decision are the hybrid graph's, it exports to ONNX and TFLite with builtin ops and
passes the parity checks, quantizes with the same gates, and every stage says which mode it ran."""
import json

import numpy as np
import pytest
import torch

from dafar.errors import ConfigError, ManifestError
from dafar.schema import DETECT_OUTPUT_NAMES, OUTPUT_NAMES, ExportEntry, Mode, output_names


def _net():
    from dafar.train.models import build_dafar

    torch.manual_seed(0)
    return build_dafar("mnist", "mask").eval()


def test_detect_graph_is_the_hybrid_graph_without_the_second_pass():
    from dafar.export.fused import FusedDafar

    net = _net()
    x = torch.rand(6, 1, 28, 28)
    x[5, 0, 2, 2] = float("nan")
    with torch.no_grad():
        h = FusedDafar(net, 5.0, "l2")(x)
        d = FusedDafar(net, 5.0, "l2", mode="detect")(x)
    assert len(h) == len(OUTPUT_NAMES) and len(d) == len(DETECT_OUTPUT_NAMES)
    label, score, rejected, logits = d
    torch.testing.assert_close(logits, h[3], equal_nan=True)
    torch.testing.assert_close(score, h[1], equal_nan=True)
    assert torch.equal(rejected, h[2]) and bool(rejected[5])  # same decision; NaN still fails closed
    assert torch.equal(label, logits.argmax(1))  # the victim's label, not the purified one
    assert output_names("dafar", "detect") == DETECT_OUTPUT_NAMES and "purified_logits" not in DETECT_OUTPUT_NAMES
    assert output_names("victim", "detect") == ("label", "logits")


def test_mode_config_and_manifest_parsing():
    from dafar.export import ExportConfig

    assert ExportConfig().modes == (Mode.HYBRID,)
    assert ExportConfig(modes=("detect", "hybrid", "detect")).modes == (Mode.DETECT, Mode.HYBRID)
    with pytest.raises(ConfigError, match="unknown mode 'fast'; choose from: hybrid, detect"):
        ExportConfig(modes=("fast",))
    base = {"graph": "dafar", "format": "onnx", "contract": "float-nchw", "detector": "l2", "alpha": 1.0,
            "input": {"name": "x", "shape": ["N", 1, 28, 28], "dtype": "float32"}}
    # an entry written before modes existed is a hybrid graph
    assert ExportEntry.parse("export/a.onnx", base).mode is Mode.HYBRID
    e = ExportEntry.parse("export/a.onnx", {**base, "mode": "detect"})
    assert e.mode is Mode.DETECT and e.output_names == DETECT_OUTPUT_NAMES
    assert ExportEntry.parse("export/v.onnx", {**base, "graph": "victim", "detector": None}).mode is None
    with pytest.raises(ManifestError, match="export/a.onnx has a missing or unknown field"):
        ExportEntry.parse("export/a.onnx", {**base, "mode": "purify"})


def test_mac_counts_per_mode():
    from dafar.bench.perf.macs import fused_costs

    for ds in ("mnist", "cifar10"):
        h, d = fused_costs(ds, "l2"), fused_costs(ds, "l2", "detect")
        assert d["victim_macs"] == h["victim_macs"]
        assert h["fused_macs"] - d["fused_macs"] == h["victim_macs"]  # exactly one E+F pass less
        assert 1.9 < d["mac_ratio"] < 2.1 and 2.9 < h["mac_ratio"] < 3.1


@pytest.mark.slow
def test_detect_mode_exports_quantizes_runs_and_benches(run_clone):
    from dafar.bench.perf.harness import BenchConfig, run_bench
    from dafar.bench.perf.report import write_bench_report
    from dafar.export import ExportConfig, export
    from dafar.export.tflite_export import check_builtin_only
    from dafar.manifest import load_manifest
    from dafar.quantize.api import Checks, QuantizeConfig, quantize_run
    from dafar.runtime import Defence
    from dafar.runtime.backends import LiteRTRunner

    entries = export(run_clone, ExportConfig(detectors=("l2", "autoencoder"), contracts=("float-nchw", "uint8-nhwc"),
                                             modes=("detect",), victim=False, validate_images=400),
                     log=lambda *a: None).entries
    expect = {f"export/dafar-{det}-detect-{c}{s}" for det in ("l2", "autoencoder") for c in ("float-nchw", "uint8-nhwc")
              for s in (".onnx", "-b1.tflite")}
    assert set(entries) == expect
    m = load_manifest(run_clone)  # hashes of the new files checked
    for rel, e in entries.items():
        assert e["mode"] == "detect" and "purified_logits" in e["omitted_outputs"]
        assert [o["name"] for o in e["outputs"]] == list(DETECT_OUTPUT_NAMES)
        v = e["validation"]
        assert v["label_agreement"] >= 0.9995 and v["rejected_agreement"] >= 0.9995
        assert "purified_logits_abs_err_max" not in v and v["logits_abs_err_max"] <= 1e-3 * 50
        if e["format"] == "tflite":
            assert all(op.isupper() and not op.startswith("CUSTOM") for op in check_builtin_only(run_clone / rel))
            assert set(LiteRTRunner(run_clone / rel).signature()["outputs"]) == set(DETECT_OUTPUT_NAMES)
        if e["contract"] == "float-nchw":
            assert v["nan_input_rejected"] is True
    # the hybrid files of the same run stay what they were, and stay the default model
    assert m["exports"]["export/dafar-l2-float-nchw.onnx"].get("mode", "hybrid") == "hybrid"
    assert Defence(run_clone).mode == "hybrid"

    # the detect graph decides like the hybrid one and labels like the victim
    from dafar.run import RunFolder

    u8 = RunFolder(run_clone, m).test_set(limit=64).images
    det = Defence(run_clone, "export/dafar-l2-detect-uint8-nhwc-b1.tflite")
    hyb = Defence(run_clone, "export/dafar-l2-uint8-nhwc-b1.tflite")
    vic = Defence(run_clone, "export/victim-uint8-nhwc-b1.tflite")
    pd, ph, pv = det.predict(u8), hyb.predict(u8), vic.predict(u8)
    assert det.mode == "detect" and det.describe()["mode"] == "detect" and pd.purified_logits is None
    assert np.array_equal(pd.labels, pv.labels) and np.array_equal(pd.rejected, ph.rejected)
    np.testing.assert_allclose(pd.scores, ph.scores, rtol=1e-5)

    # int8: the same precise layout and gates as the hybrid graphs
    cfg = QuantizeConfig(contracts=("uint8-nhwc",), detectors=("l2",), validate_images=400, calib_images=64,
                         checks=Checks(min_label_agreement=0.97, max_accuracy_drop=0.015), attack_images=0)
    q = quantize_run(run_clone, cfg, log=lambda *a: None)
    qd = {rel: e for rel, e in q.items() if "-detect-" in rel}
    assert set(qd) == {"export/dafar-l2-detect-uint8-nhwc-int8.onnx", "export/dafar-l2-detect-uint8-nhwc-int8-b1.tflite"}
    for rel, e in qd.items():
        v = e["validation"]
        assert e["mode"] == "detect" and e["precision"] == "int8"
        assert [o["name"] for o in e["outputs"]] == list(DETECT_OUTPUT_NAMES)
        assert v["decision_agreement"] >= 0.99 and v["decision_follows_alpha"]
        # the defence's label is the victim's: int8 agreement of the two is the same number
        assert v["label_agreement"] == pytest.approx(v["victim_label_agreement"])
    p = Defence(run_clone, "export/dafar-l2-detect-uint8-nhwc-int8-b1.tflite").predict(u8)
    assert p.purified_logits is None and np.array_equal(p.labels, p.logits.argmax(1))

    # bench: the detect graph is timed against its victim, with its own MAC ratio (one E+F pass less)
    models = ("export/dafar-l2-detect-float-nchw-b1.tflite", "export/dafar-l2-float-nchw-b1.tflite",
              "export/victim-float-nchw-b1.tflite")
    s = run_bench(run_clone, BenchConfig(threads=(1,), batches=(1,), runs=10, warmup=2, models=models,
                                         accuracy_images=0, memory=False, torch=False), log=lambda *a: None)
    by = {r["model"]: r for r in s["ratios"]}
    assert 1.9 < by[models[0]]["mac_ratio"] < 2.1 and 2.9 < by[models[1]]["mac_ratio"] < 3.1
    rec = json.loads((run_clone / "bench" / "dafar-l2-detect-float-nchw-b1.tflite__litert__t1__b1.json").read_text())
    assert rec["mode"] == "detect"
    text = write_bench_report(run_clone).read_text()
    assert "Detect mode" in text and "dafar-l2-detect-float-nchw-b1.tflite" in text

    # the cross-stage summary keeps detect and hybrid rows apart (same detector, input and threads)
    from dafar.bench.summary import render_markdown, summarize
    lat = summarize(run_clone)["bench"]["latency"]
    got = {(r["detector"], r["mode"], r["contract"]) for r in lat if r["backend"] == "litert"}
    assert {("l2", "hybrid", "float-nchw"), ("l2", "detect", "float-nchw")} <= got
    assert "| l2 | detect |" in render_markdown(summarize(run_clone))


@pytest.mark.slow
def test_mixed_layout_quantizes_d_in_a_detect_graph(run_clone):
    """--layout mixed on a detect graph: E and D go int8 (D's unpooling slices included), only the
    residual onwards stays float, and the file passes dafar quantize's checks like the default
    layout.  (Before, the layout asked for D's slices in float, the converter quantized them, and
    quantize failed with "the mixed layout was not honoured".)"""
    from dafar.export import ExportConfig, export
    from dafar.quantize.api import Checks, QuantizeConfig, quantize_run

    export(run_clone, ExportConfig(formats=("tflite",), modes=("detect",), victim=False, validate_images=400),
           log=lambda *a: None)
    cfg = QuantizeConfig(formats=("tflite",), contracts=("float-nchw",), detectors=("l2",), layout="mixed",
                         validate_images=400, calib_images=64, compare_naive=False, attack_images=0,
                         checks=Checks(min_label_agreement=0.97, max_accuracy_drop=0.015))
    q = quantize_run(run_clone, cfg, log=lambda *a: None)
    e = q["export/dafar-l2-detect-float-nchw-int8-b1.tflite"]
    assert e["layout"] == "mixed" and e["mode"] == "detect"
    kept = e["quantization"]["float_node_types"]
    assert "TRANSPOSE_CONV" not in kept and "CONV_2D" not in kept and "STRIDED_SLICE" not in kept  # E and D int8
    assert {"SUB", "SQRT"} <= set(kept)  # the residual and the norm float
    v = e["validation"]
    assert v["decision_agreement"] >= 0.99 and v["decision_follows_alpha"] and v["nan_input_rejected"]
