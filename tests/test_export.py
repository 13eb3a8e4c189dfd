"""Export: the fused graph, ONNX and TFLite parity with torch, builtin ops, named signatures,
input contracts, the offline 3-channel path, and clean failures."""
import os
import shutil

import numpy as np
import pytest
import torch

from dafar.errors import (
    ConfigError,
    DecisionMismatchError,
    HashMismatchError,
    ManifestError,
    OutputShapeError,
    ToleranceError,
    UnsupportedOpError,
)
from dafar.export.fused import OUTPUT_NAMES, FusedDafar
from dafar.export.validate import Tolerance, validate_model_outputs
from dafar.manifest import load_manifest, read_manifest, sha256_file, write_manifest
from dafar.train.models import build_dafar, l2_per_sample

pytest.importorskip("onnxruntime")


def _net(dataset="mnist", unpool="mask"):
    torch.manual_seed(0)
    return build_dafar(dataset, unpool).eval()


def test_fused_graph_matches_its_parts():
    net = _net()
    x01 = torch.rand(4, 1, 28, 28)
    label, score, rejected, logits, purified = FusedDafar(net, 5.0, "l2")(x01)
    xm = x01 * 2 - 1
    with torch.no_grad():
        lo, rec = net(xm)
        torch.testing.assert_close(logits, lo)
        torch.testing.assert_close(score, l2_per_sample(xm - rec), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(purified, net.purified_logits(rec))
    assert torch.equal(label, purified.argmax(1)) and torch.equal(rejected, score > 5.0)
    ae = FusedDafar(net, 5.0, "autoencoder")(x01)[1]
    with torch.no_grad():
        torch.testing.assert_close(ae, net.ae_score(xm, rec), rtol=1e-5, atol=1e-5)


def test_uint8_contract_equals_float_contract():
    net = _net()
    u8 = torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8)
    a = FusedDafar(net, 1.0, contract="uint8-nhwc")(u8)
    b = FusedDafar(net, 1.0, contract="float-nchw")(u8.permute(0, 3, 1, 2).float() / 255)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_fails_closed_on_nan():
    net = _net()
    x = torch.rand(2, 1, 28, 28)
    x[1, 0, 3, 3] = float("nan")
    _, score, rejected, _, _ = FusedDafar(net, 1e9, "l2")(x)
    assert torch.isnan(score[1]) and rejected.tolist() == [False, True]


def test_autoencoder_detector_needs_c():
    with pytest.raises(ValueError, match="anomaly autoencoder"):
        FusedDafar(build_dafar("mnist", with_detector=False), 1.0, "autoencoder")
    with pytest.raises(ValueError, match="finite"):
        FusedDafar(_net(), float("inf"))


def test_validate_model_outputs_typed_errors():
    ref = {"label": np.arange(10), "score": np.linspace(1, 2, 10).astype(np.float32), "rejected": np.zeros(10, bool),
           "logits": np.zeros((10, 3), np.float32)}
    ok = validate_model_outputs(ref, dict(ref), Tolerance(), "same")
    assert ok["label_agreement"] == 1.0 and ok["score_rel_err_max"] == 0.0
    with pytest.raises(OutputShapeError, match="missing"):
        validate_model_outputs(ref, {k: v for k, v in ref.items() if k != "score"}, Tolerance(), "m")
    with pytest.raises(OutputShapeError, match="shape"):
        validate_model_outputs(ref, {**ref, "logits": np.zeros((10, 4))}, Tolerance(), "m")
    bad = ref["label"].copy()
    bad[0] = 9
    with pytest.raises(DecisionMismatchError, match="90.000%"):
        validate_model_outputs(ref, {**ref, "label": bad}, Tolerance(), "m")
    with pytest.raises(ToleranceError, match="median"):
        validate_model_outputs(ref, {**ref, "score": ref["score"] * 1.01}, Tolerance(), "m")
    one_off = ref["score"].copy()
    one_off[3] *= 1.01  # one near-tie outlier of 10 images: allowed only with a 10% allowance
    with pytest.raises(ToleranceError, match="1 of 10 images"):
        validate_model_outputs(ref, {**ref, "score": one_off}, Tolerance(), "m")
    rep = validate_model_outputs(ref, {**ref, "score": one_off}, Tolerance(max_outlier_fraction=0.1), "m")
    assert rep["outlier_images"] == 1 and rep["score_rel_err_max"] == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ToleranceError, match="logits"):
        validate_model_outputs(ref, {**ref, "logits": ref["logits"] + 0.1}, Tolerance(), "m")


@pytest.mark.slow
@pytest.mark.parametrize("unpool", ["mask", "maxunpool"])
def test_onnx_dynamic_batch_parity(tmp_path, unpool):
    from dafar.export.onnx_export import export_onnx, onnx_op_counts
    from dafar.runtime.backends import OnnxRuntimeRunner

    net = _net(unpool=unpool)
    fused = FusedDafar(net, 3.0, "autoencoder").eval()
    path = export_onnx(fused, torch.rand(2, 1, 28, 28), tmp_path / "m.onnx", OUTPUT_NAMES)
    sess = OnnxRuntimeRunner(path)
    assert sess.output_names == list(OUTPUT_NAMES) and sess.batch is None
    for n in (1, 5):
        x = np.random.default_rng(n).random((n, 1, 28, 28), dtype=np.float32)
        got = sess.run(x)
        with torch.no_grad():
            ref = [t.numpy() for t in fused(torch.from_numpy(x))]
        for name, r in zip(OUTPUT_NAMES, ref):
            np.testing.assert_allclose(got[name], r, rtol=1e-4, atol=1e-5)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    assert sess.run(x)["rejected"][0]  # fails closed in the exported graph too
    ops = onnx_op_counts(path)
    assert ("MaxUnpool" in ops or "ScatterND" in ops) == (unpool == "maxunpool")
    import onnx

    model = onnx.load(str(path))
    assert model.ir_version == 9  # readable by ONNX Runtime 1.16 and 1.17
    # no trace of the exporting machine: its source paths are not shipped inside the model
    import dafar.export

    src = os.path.dirname(os.path.dirname(os.path.abspath(dafar.export.__file__)))
    assert src.encode() not in path.read_bytes() and b"fused.py" not in path.read_bytes()
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in model.graph.node for p in n.metadata_props)
    assert any(n.metadata_props for n in model.graph.node)  # the module names stay, for debugging


def test_portable_ir_lowers_only_what_ir9_can_read():
    import onnx
    from onnx import TensorProto, helper

    from dafar.export.onnx_export import portable_ir

    def model(opsets, domain=""):
        node = helper.make_node("Relu", ["x"], ["y"], domain=domain)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)

    m = model([("", 18), ("ai.onnx.ml", 5), ("com.microsoft", 1)])  # what ORT's quantizer declares
    assert portable_ir(m) and m.ir_version == 9 and [(o.domain, o.version) for o in m.opset_import] == [("", 18)]
    onnx.checker.check_model(m)
    assert not portable_ir(m)  # already IR 9
    m21 = model([("", 21)])
    assert not portable_ir(m21) and m21.ir_version == 10  # opset 21 needs IR 10
    m9 = model([("", 18), ("ai.onnx.ml", 5)])
    m9.ir_version = 9  # already IR 9, but declaring ai.onnx.ml 5, which ONNX Runtime 1.16 refuses to load
    assert portable_ir(m9) and [(o.domain, o.version) for o in m9.opset_import] == [("", 18)]


# ---------------------------------------------------------------- run-folder exports (slow)

def _tiny_run(root, dataset="mnist", data_dir=None):
    from dafar.train.config import TrainConfig
    from dafar.train.trainer import train

    cfg = TrainConfig.for_profile(dataset, "quick", train_limit=128, test_limit=100, val_size=100, batch_size=32,
                                  epochs=1, detector_epochs=1, threads=2)
    return train(cfg, root, data_dir=data_dir, quiet=True).run_dir


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    pytest.importorskip("onnx2tf")
    pytest.importorskip("ai_edge_litert")
    return _tiny_run(tmp_path_factory.mktemp("exp") / "run")


@pytest.fixture
def run_copy(mnist_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(mnist_run, dst)
    return dst


@pytest.mark.slow
def test_export_both_formats_detectors_and_contracts(run_copy):
    from dafar.export import ExportConfig, export
    from dafar.runtime.backends import LiteRTRunner, OnnxRuntimeRunner

    cfg = ExportConfig(detectors=("l2", "autoencoder"), contracts=("float-nchw", "uint8-nhwc"), validate_images=100)
    entries = export(run_copy, cfg, log=lambda *a: None).entries
    m = load_manifest(run_copy)  # all hashes, exports included
    expect = {f"export/{g}-{c}{suf}" for c in ("float-nchw", "uint8-nhwc") for suf in (".onnx", "-b1.tflite")
              for g in ("dafar-l2", "dafar-autoencoder", "victim")}
    assert set(entries) == expect and expect <= set(m["exports"]) and expect <= set(m["files"])
    for rel, e in m["exports"].items():
        v = e["validation"]
        assert v["images"] == 100
        assert v["label_agreement"] >= 0.9995
        if e["graph"] == "dafar":
            assert v["rejected_agreement"] >= 0.9995 and v["score_rel_err_median"] <= 1e-4
            assert v["outlier_images"] <= 0.005 * v["images"]
            assert v.get("nan_input_rejected") is (True if e["contract"] == "float-nchw" else None)
            assert e["alpha"] == m["thresholds"]["l2" if e["detector"] == "l2" else "autoencoder"]["rules"][e["threshold_rule"]]["alpha"]
        if e["format"] == "tflite":
            assert all(op.isupper() and not op.startswith("CUSTOM") for op in e["ops"]), e["ops"]
            io = LiteRTRunner(run_copy / rel).signature()
            assert list(io["inputs"]) == ["x"]
            want_out = set(OUTPUT_NAMES) if e["graph"] == "dafar" else {"label", "logits"}
            assert set(io["outputs"]) == want_out
            if e["contract"] == "uint8-nhwc":
                assert io["inputs"]["x"] == {"shape": [1, 28, 28, 1], "dtype": "uint8"}
            else:
                assert io["inputs"]["x"] == {"shape": [1, 1, 28, 28], "dtype": "float32"}
        else:
            assert e["batch"] == "dynamic" and "MaxUnpool" not in e["ops"]
    # the uint8 TFLite defence fed raw pixels decides like the float ONNX one fed x/255
    from dafar.run import RunFolder

    u8 = RunFolder(run_copy, m).test_set(limit=20).images
    a = LiteRTRunner(run_copy / "export/dafar-l2-uint8-nhwc-b1.tflite").run(u8.transpose(0, 2, 3, 1).copy())
    b = OnnxRuntimeRunner(run_copy / "export/dafar-l2-float-nchw.onnx").run(u8.astype(np.float32) / 255)
    assert np.array_equal(a["label"], b["label"]) and np.array_equal(a["rejected"], b["rejected"])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-4)


@pytest.mark.slow
def test_tflite_batch_n_and_threshold_rule(run_copy):
    from dafar.export import ExportConfig, export

    entries = export(run_copy, ExportConfig(formats=("tflite",), tflite_batches=(4,), victim=False, validate_images=102,
                                                threshold_rule="quantile@fpr=0.05"), log=lambda *a: None).entries
    (rel, e), = entries.items()
    assert rel == "export/dafar-l2-float-nchw-b4.tflite" and e["input"]["shape"] == [4, 1, 28, 28]
    assert e["threshold_rule"] == "quantile@fpr=0.05"
    assert e["validation"]["images"] == 102  # 25 full batches of 4 and a padded one


@pytest.mark.slow
def test_three_channel_model_converts_offline(tmp_path):
    """onnx2tf fetches a sample file from the web for 3-channel inputs; the exporter must not need it."""
    pytest.importorskip("onnx2tf")
    from conftest import make_image_folder

    from dafar.data import CIFAR10_CLASSES
    from dafar.export import ExportConfig, export

    root = make_image_folder(tmp_path / "c10", CIFAR10_CLASSES, per_class=4)
    from dafar.train.config import TrainConfig
    from dafar.train.trainer import train

    cfg = TrainConfig.for_profile("cifar10", "quick", train_limit=32, val_size=8, batch_size=16, epochs=1,
                                  detector_epochs=1, threads=2)
    run = train(cfg, tmp_path / "run", data_dir=root, quiet=True).run_dir
    # a dead proxy makes any HTTP(S) request fail at once
    env = {k: os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    for k in env:
        os.environ[k] = "http://127.0.0.1:9"
    try:
        entries = export(run, ExportConfig(formats=("tflite",), victim=False, validate_images=40), data_dir=root,
                         log=lambda *a: None).entries
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    e = entries["export/dafar-l2-float-nchw-b1.tflite"]
    assert e["input"]["shape"] == [1, 3, 32, 32] and e["validation"]["rejected_agreement"] == 1.0


@pytest.mark.slow
def test_bad_run_folders_and_options(run_copy, tmp_path, capsys):
    from dafar.cli import main
    from dafar.export import ExportConfig, export

    with pytest.raises(ConfigError, match="unknown format"):
        ExportConfig(formats=("coreml",))
    with pytest.raises(ConfigError, match="input contract"):
        ExportConfig(contracts=("float-nhwc",))
    assert main(["export", str(run_copy), "--format", "coreml"]) == 2
    assert main(["export", str(run_copy), "--tflite-batch", "x"]) == 2
    assert main(["export", str(tmp_path / "nope")]) == 4
    before = sha256_file(run_copy / "manifest.json")
    # an unknown threshold rule
    with pytest.raises(ManifestError, match="no threshold rule"):
        export(run_copy, ExportConfig(formats=("onnx",), threshold_rule="median"), log=lambda *a: None)
    # an impossible tolerance: the export fails validation and leaves nothing behind
    with pytest.raises(ToleranceError):
        export(run_copy, ExportConfig(formats=("onnx",), victim=False,
                                          tolerance=Tolerance(score_rtol_median=0.0, score_rtol_max=0.0)),
                   log=lambda *a: None)
    assert sha256_file(run_copy / "manifest.json") == before
    assert not (run_copy / "export").exists() and not list(run_copy.glob(".staging-*"))
    # a weights file that does not match its hash
    p = run_copy / "weights" / "F.safetensors"
    p.write_bytes(p.read_bytes()[:-1] + b"\0")
    with pytest.raises(HashMismatchError, match="F.safetensors"):
        export(run_copy, ExportConfig(formats=("onnx",)), log=lambda *a: None)
    # a run folder without its weights
    p.unlink()
    from dafar.errors import RunFolderError

    with pytest.raises(RunFolderError, match="F.safetensors"):
        export(run_copy, ExportConfig(formats=("onnx",)), log=lambda *a: None)


@pytest.mark.slow
def test_missing_alpha_is_a_clear_error(run_copy):
    from dafar.export import ExportConfig, export

    m = read_manifest(run_copy)
    del m["thresholds"]["l2"]["rules"][m["thresholds"]["l2"]["default"]]["alpha"]
    write_manifest(run_copy, m)
    with pytest.raises(ManifestError, match="no finite alpha"):
        export(run_copy, ExportConfig(formats=("onnx",)), log=lambda *a: None)
    m = read_manifest(run_copy)
    del m["thresholds"]["l2"]
    write_manifest(run_copy, m)
    with pytest.raises(ManifestError, match="thresholds.l2"):
        export(run_copy, ExportConfig(formats=("onnx",)), log=lambda *a: None)


@pytest.mark.slow
def test_maxunpool_runs_refuse_tflite(tmp_path):
    from dafar.export import ExportConfig, export
    from dafar.train.config import TrainConfig
    from dafar.train.trainer import train

    cfg = TrainConfig.for_profile("mnist", "quick", train_limit=64, test_limit=50, val_size=50, batch_size=32,
                                  epochs=1, detector=False, unpool="maxunpool", threads=2)
    run = train(cfg, tmp_path / "mu", quiet=True).run_dir
    with pytest.raises(UnsupportedOpError, match="FlexMaxPoolWithArgmax"):
        export(run, ExportConfig(formats=("tflite",)), log=lambda *a: None)
    entries = export(run, ExportConfig(formats=("onnx",), validate_images=200), log=lambda *a: None).entries
    assert entries["export/dafar-l2-float-nchw.onnx"]["validation"]["rejected_agreement"] == 1.0


def test_builtin_check_rejects_flex_ops(monkeypatch, tmp_path):
    pytest.importorskip("ai_edge_litert")
    from dafar.export import tflite_export

    monkeypatch.setattr(tflite_export, "tflite_op_counts", lambda p: {"CONV_2D": 4, "CUSTOM:FlexMaxPoolWithArgmax": 2})
    with pytest.raises(UnsupportedOpError, match="FlexMaxPoolWithArgmax"):
        tflite_export.check_builtin_only(tmp_path / "m.tflite")


def test_background_conversions_raise_where_asked_and_cancel_on_exit():
    """The export and quantize stages start every TFLite conversion up front (child processes, two
    at a time) and wait for each where its file is checked: a failure surfaces there with its own
    type, a key is used once, and leaving the block cancels what has not started."""
    import threading

    from dafar.errors import ExportError
    from dafar.export.tflite_export import BackgroundConversions

    gate, ran = threading.Event(), []

    def slow(tag):
        gate.wait(5)
        ran.append(tag)
        return tag

    def bad():
        raise ExportError("conversion of x.onnx failed")

    with BackgroundConversions(workers=1) as conv:
        conv.submit("bad", bad)
        with pytest.raises(ExportError, match="x.onnx"):
            conv.result("bad")
        conv.submit("a", slow, "a")
        with pytest.raises(ValueError, match="twice"):
            conv.submit("a", slow, "again")
        conv.submit("b", slow, "b")  # queued behind "a" (one worker)
        gate.set()
        assert conv.result("a") == "a"
    assert ran == ["a", "b"]  # leaving the block waited for the queued one
    gate.clear()
    with BackgroundConversions(workers=1) as conv:
        conv.submit("first", slow, "first")
        conv.submit("never", slow, "never")  # still pending when the block is left: cancelled
        threading.Timer(0.5, gate.set).start()  # "first" is released only after the exit began
    assert ran == ["a", "b", "first"]


def test_conversions_of_one_source_side_by_side_leave_it_untouched(tmp_path):
    """onnx2tf rewrites its input file in place (onnxsim, op renaming).  ``dafar quantize`` converts
    a victim's float-NCHW and uint8-NHWC int8 files from one cached source, two at a time: before each
    conversion got a private copy, one could read the file while the other rewrote it ("Wire format
    was corrupt", seen in CI).  Here two conversions of one source run side by side; the source must
    keep its bytes and both files must run on LiteRT with the victim's labels."""
    pytest.importorskip("onnx2tf")
    pytest.importorskip("ai_edge_litert")
    from dafar.export.api import source_onnx
    from dafar.export.tflite_export import BackgroundConversions, convert_to_tflite
    from dafar.runtime.backends import LiteRTRunner, OnnxRuntimeRunner

    norm = {"mean": [0.0], "std": [1.0]}
    src = source_onnx(_net(), "victim", None, None, norm, (1, 28, 28), 1, tmp_path / "src.onnx")
    before = sha256_file(src)
    kw = dict(batch=1, input_chw=(1, 28, 28), output_names=("label", "logits"))
    with BackgroundConversions(workers=2) as conv:
        for c in ("float-nchw", "uint8-nhwc"):
            conv.submit(c, convert_to_tflite, src, tmp_path / f"{c}.tflite", contract=c, **kw)
        paths = {c: conv.result(c) for c in ("float-nchw", "uint8-nhwc")}
    assert sha256_file(src) == before
    u8 = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    ref, a, b = OnnxRuntimeRunner(src), LiteRTRunner(paths["float-nchw"]), LiteRTRunner(paths["uint8-nhwc"])
    for x in np.split(u8, len(u8)):
        want = ref.run(x.astype(np.float32) / 255)
        got_f, got_u = a.run(x.astype(np.float32) / 255), b.run(x.transpose(0, 2, 3, 1).copy())
        assert got_f["label"] == want["label"] == got_u["label"]
        np.testing.assert_allclose(got_f["logits"], want["logits"], rtol=1e-4, atol=1e-4)
