"""The on-device runtime: parity with torch, input handling and validation, fail-closed, file
checks, thread safety, the no-torch import, and `dafar predict`."""
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from dafar.errors import HashMismatchError, InferenceError, InputValidationError, ManifestError, MissingExtraError
from dafar.manifest import read_manifest, write_manifest

pytestmark = pytest.mark.slow

MODELS = ["export/dafar-l2-float-nchw.onnx", "export/dafar-autoencoder-float-nchw-b1.tflite",
          "export/dafar-l2-uint8-nhwc-b1.tflite", "export/dafar-autoencoder-uint8-nhwc.onnx"]


def _test_u8(run, n=60):
    from dafar.run import RunFolder

    test = RunFolder.open(run, verify=False).test_set(limit=n)
    return test.images, test.labels


def test_import_and_use_without_torch_or_tensorflow(exported_run):
    code = (
        "import sys, numpy as np; import dafar.runtime as r;"
        "assert not [m for m in ('torch','tensorflow','onnxruntime','ai_edge_litert') if m in sys.modules], 'import';"
        f"run={str(exported_run)!r};"
        "x=np.zeros((2,28,28),np.uint8);"
        "a=r.Defence(run,'export/dafar-l2-float-nchw.onnx').predict(x);"
        "b=r.Defence(run,'export/dafar-l2-uint8-nhwc-b1.tflite').predict(x);"
        "assert (a.labels==b.labels).all();"
        "print([m for m in ('torch','tensorflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("model", MODELS)
def test_parity_with_torch(exported_run, model):
    import torch

    from dafar.export.fused import FusedDafar
    from dafar.runtime import Defence
    from dafar.train.loading import load_dafar

    d = Defence(exported_run, model)
    u8, y = _test_u8(exported_run)
    net, m = load_dafar(exported_run)
    e = m["exports"][model]
    fused = FusedDafar(net, e["alpha"], e["detector"], "float-nchw").eval()
    with torch.no_grad():
        label, score, rejected, logits, _ = (t.numpy() for t in fused(torch.from_numpy(u8.astype(np.float32) / 255)))
    p = d.predict(u8)  # NCHW uint8 batch
    assert np.mean(p.labels == label) >= 0.98 and np.mean(p.rejected == rejected) >= 0.98
    np.testing.assert_allclose(p.scores, score, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(p.logits, logits, rtol=1e-3, atol=1e-3)
    assert d.describe()["model"] == model and d.alpha == e["alpha"]


def test_input_forms_agree(exported_run):
    from dafar.runtime import Defence

    d = Defence(exported_run, "export/dafar-l2-float-nchw.onnx")
    u8, _ = _test_u8(exported_run, 5)
    ref = d.predict(u8)
    nhwc = u8.transpose(0, 2, 3, 1)
    forms = [nhwc, u8[:, 0], list(u8[:, 0]), list(nhwc), u8.astype(np.float32) / 255, nhwc.astype(np.float64) / 255,
             (u8.astype(np.float16) / 255).astype(np.float16)]
    for f in forms:
        p = d.predict(f)
        assert np.array_equal(p.labels, ref.labels)
        np.testing.assert_allclose(p.scores, ref.scores, rtol=1e-3)
    one = d.predict(u8[0, 0])  # one grayscale image HxW
    assert one.labels.shape == (1,) and one.labels[0] == ref.labels[0]
    assert d.predict(nhwc[0]).labels[0] == ref.labels[0]  # HxWxC
    # a uint8 graph fed floats rounds to pixel levels: same answer as the pixels themselves
    du = Defence(exported_run, "export/dafar-l2-uint8-nhwc-b1.tflite")
    assert np.array_equal(du.predict(u8.astype(np.float32) / 255).labels, du.predict(u8).labels)
    assert len(du.predict(u8[:3])) == 3  # fixed batch 1 model, batch of 3


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 28, 28), np.uint8), "do not fit"),
    (np.zeros((28, 27), np.uint8), "do not fit"),
    (np.zeros((2, 28, 28), bool), "dtype bool"),
    (np.zeros((2, 28, 28), np.int32), "dtype int32"),
    (np.zeros((2, 28, 28), object), "dtype object"),
    (np.full((1, 28, 28), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((1, 28, 28), -0.1, np.float32), r"\[0, 1\]"),
    (np.full((1, 28, 28), np.nan, np.float32), "NaN"),
    (np.full((1, 28, 28), np.inf, np.float32), "NaN or infinite"),
    (np.zeros((0, 28, 28), np.uint8), "size 0"),
    ([], "empty"),
    ("image.png", "numpy array"),
])
def test_bad_inputs_raise(exported_run, bad, match):
    from dafar.runtime import Defence

    d = Defence(exported_run, "export/dafar-l2-float-nchw.onnx")
    with pytest.raises(InputValidationError, match=match):
        d.predict(bad)


def test_on_invalid_reject_keeps_the_good_images(exported_run):
    from dafar.runtime import Defence

    u8, _ = _test_u8(exported_run, 4)
    x = u8.astype(np.float32) / 255
    x[1, 0, 3, 3] = np.nan
    x[2, 0, 0, 0] = 7.0
    d = Defence(exported_run, "export/dafar-autoencoder-float-nchw-b1.tflite", on_invalid="reject")
    p = d.predict(x)
    ref = d.predict(u8)
    assert p.invalid.tolist() == [False, True, True, False]
    assert p.rejected[1] and p.rejected[2] and np.isnan(p.scores[1:3]).all() and (p.labels[1:3] == -1).all()
    assert p.labels[0] == ref.labels[0] and p.labels[3] == ref.labels[3]
    assert len(p.reasons) == 2 and "image 1" in p.reasons[0]


def test_fails_closed_on_non_finite_score(exported_run, monkeypatch):
    from dafar.runtime import Defence

    d = Defence(exported_run, "export/dafar-l2-float-nchw.onnx")
    real = d.runner.run

    def nan_scores(x, *a, **k):
        out = real(x, *a, **k)
        out["score"] = np.full_like(out["score"], np.nan)
        out["rejected"] = np.zeros_like(out["rejected"])  # a broken graph that says "accept"
        return out

    monkeypatch.setattr(d.runner, "run", nan_scores)
    p = d.predict(np.zeros((3, 28, 28), np.uint8))
    assert p.rejected.all()


def test_nan_image_is_rejected_by_the_graph_itself(exported_run):
    """Without the runtime's input check: the exported graph's own decision fails closed."""
    from dafar.runtime import Defence

    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    x[0, 0, 5, 5] = np.nan
    for model in ("export/dafar-l2-float-nchw.onnx", "export/dafar-autoencoder-float-nchw-b1.tflite"):
        d = Defence(exported_run, model)
        out = d.run_prepared(x if d.batch is None else x[:1])
        assert bool(out["rejected"][0])


def test_file_checks_before_loading(run_clone):
    from dafar.runtime import Defence

    rel = "export/dafar-l2-float-nchw-b1.tflite"
    p = run_clone / rel
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(HashMismatchError, match="dafar-l2-float-nchw-b1.tflite"):
        Defence(run_clone, rel)
    # a model swapped for another file of the run
    (run_clone / "export/dafar-l2-float-nchw.onnx").write_bytes((run_clone / "export/victim-float-nchw.onnx").read_bytes())
    with pytest.raises(HashMismatchError):
        Defence(run_clone, "export/dafar-l2-float-nchw.onnx")
    with pytest.raises(ManifestError, match="lists no exported model"):
        Defence(run_clone, "export/nope.onnx")
    # an edited alpha
    man = run_clone / "manifest.json"
    m = json.loads(man.read_text())
    m["exports"]["export/dafar-autoencoder-float-nchw.onnx"]["alpha"] = 1e9
    man.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="edited"):
        Defence(run_clone, "export/dafar-autoencoder-float-nchw.onnx")


def test_corrupt_file_with_matching_hash_is_an_inference_error(run_clone):
    """A file that is garbage but listed with its (garbage) hash: the backend refuses it cleanly."""
    from dafar.manifest import file_entry
    from dafar.runtime import Defence

    rel = "export/dafar-l2-float-nchw.onnx"
    (run_clone / rel).write_bytes(b"not a model")
    m = read_manifest(run_clone)
    m["files"][rel] = file_entry(run_clone, rel, "export")
    write_manifest(run_clone, m)
    with pytest.raises(InferenceError, match="cannot load"):
        Defence(run_clone, rel)


def test_thread_safety(exported_run):
    from dafar.runtime import Defence

    u8, _ = _test_u8(exported_run, 40)
    for model in ("export/dafar-l2-uint8-nhwc-b1.tflite", "export/dafar-l2-float-nchw.onnx"):
        d = Defence(exported_run, model)
        ref = [d.predict(u8[i: i + 1]) for i in range(len(u8))]
        errors, results = [], {}

        def work(t):
            try:
                for rep in range(3):
                    for i in range(t, len(u8), 8):
                        results[(t, rep, i)] = d.predict(u8[i: i + 1])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for (t, rep, i), p in results.items():
            assert p.labels[0] == ref[i].labels[0] and p.scores[0] == ref[i].scores[0]


def test_missing_backend_names_the_extra(exported_run, monkeypatch):
    import builtins

    from dafar.runtime import Defence

    real_import = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("onnxruntime"):
            raise ImportError("no onnxruntime here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingExtraError, match=r"dafar\[onnx-runtime\]"):
        Defence(exported_run, "export/dafar-l2-float-nchw.onnx")


def test_default_model_and_cuda_request(exported_run):
    from dafar.runtime import Defence

    d = Defence(exported_run)
    assert d.model_rel.endswith(".tflite") and d.detector == "l2" and d.batch == 1
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MissingExtraError, match="CUDA"):
            Defence(exported_run, "export/dafar-l2-float-nchw.onnx", provider="cuda")


def test_predict_cli(exported_run, tmp_path, capsys):
    from PIL import Image

    from dafar.cli import main

    u8, _ = _test_u8(exported_run, 3)
    files = []
    for i in range(2):
        f = tmp_path / f"digit{i}.png"
        Image.fromarray(u8[i, 0]).save(f)
        files.append(str(f))
    np.save(tmp_path / "batch.npy", u8[2:3, 0])
    files.append(str(tmp_path / "batch.npy"))
    assert main(["predict", str(exported_run), *files, "--json", "--model", "export/dafar-l2-float-nchw.onnx"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["predictions"]) == 3 and out["model"] == "export/dafar-l2-float-nchw.onnx"
    assert all(r["verdict"] in ("accepted", "rejected") for r in out["predictions"])
    assert main(["predict", str(exported_run), files[0]]) == 0
    assert "label" in capsys.readouterr().out
    assert main(["predict", str(exported_run), str(tmp_path / "missing.png")]) == 2
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert main(["predict", str(exported_run), str(tmp_path / "bad.png")]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_int8_saturation_risk_reads_the_cpu_flags():
    from dafar.runtime.cpu import cpu_flags, int8_saturation_risk

    avx2 = "processor : 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    vnni = "processor : 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert cpu_flags(avx2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert int8_saturation_risk("x86_64", avx2) is True  # VPMADDUBSW: 16-bit pair sums saturate
    assert int8_saturation_risk("x86_64", vnni) is False
    assert int8_saturation_risk("x86_64", "flags : avx2 avx_vnni") is False
    assert int8_saturation_risk("aarch64", avx2) is False  # ARM: no such kernel
    assert int8_saturation_risk("x86_64", "processor : 0\n") is None  # flags unreadable: unknown, not safe
    assert isinstance(int8_saturation_risk(), (bool, type(None)))  # this machine, whatever it is


def test_thread_counts_beyond_the_machine_are_refused_before_the_runtime(monkeypatch):
    """LiteRT segfaults and ONNX Runtime hangs on absurd thread counts: the limit (4 per CPU, at
    least 16, $DAFAR_MAX_THREADS) is checked first, with a message naming it and how to raise it."""
    from dafar.errors import ConfigError, InputValidationError
    from dafar.limits import check_threads, max_threads
    from dafar.runtime.backends import open_model

    monkeypatch.delenv("DAFAR_MAX_THREADS", raising=False)
    assert max_threads() >= 16 and check_threads(None) is None and check_threads(2) == 2
    with pytest.raises(InputValidationError, match="DAFAR_MAX_THREADS"):
        open_model("whatever.tflite", threads=100_000)
    with pytest.raises(ConfigError, match="exceeds the limit of 16"):
        monkeypatch.setenv("DAFAR_MAX_THREADS", "16")
        check_threads(17)
    monkeypatch.setenv("DAFAR_MAX_THREADS", "100000")
    assert check_threads(100_000) == 100_000
    monkeypatch.setenv("DAFAR_MAX_THREADS", "lots")
    with pytest.raises(ConfigError, match="DAFAR_MAX_THREADS must be"):
        check_threads(2)
    for bad in (0, -1, True, 2.5, "4"):
        with pytest.raises(ConfigError):
            check_threads(bad)


@pytest.mark.parametrize("model", ["export/dafar-l2-float-nchw.onnx", "export/dafar-l2-uint8-nhwc-b1.tflite"])
def test_array_likes_take_one_path_on_every_backend(exported_run, model):
    """np.matrix, a big-endian array and an object with the array protocol give the plain array's
    answer on ONNX Runtime and LiteRT alike; a masked array is refused (an out-of-range pixel
    hidden behind its mask was once accepted); a list of mixed dtypes names the dtypes."""
    from dafar.runtime import Defence

    d = Defence(exported_run, model)
    u8, _ = _test_u8(exported_run, 2)
    ref = d.predict(u8[:1, 0])
    as_matrix = np.asmatrix(u8[0, 0])
    big = (u8[:1, 0].astype(np.float32) / 255).astype(">f4")

    class Protocol:
        def __array__(self, dtype=None, copy=None):
            return u8[:1, 0]

    for form in (as_matrix, big, Protocol()):
        p = d.predict(form)
        assert np.array_equal(p.labels, ref.labels)
        np.testing.assert_allclose(p.scores, ref.scores, rtol=1e-3)
    hidden = np.ma.masked_array(np.full((1, 28, 28), 0.5, np.float32), mask=False)
    hidden[0, 0, 0] = 7.0
    hidden[0, 0, 0] = np.ma.masked
    with pytest.raises(InputValidationError, match="masked array"):
        d.predict(hidden)
    with pytest.raises(InputValidationError, match="share one dtype.*float32.*uint8"):
        d.predict([u8[0, 0], u8[1, 0].astype(np.float32) / 255])


def test_minimum_runtime_versions_are_recorded_and_enforced(exported_run, monkeypatch):
    """An interpreter older than a file needs is refused at load with the version named (an old
    tflite_runtime would load the file and fail only on the first image; ONNX Runtime < 1.16
    cannot read IR 9)."""
    import onnxruntime

    import dafar.runtime.core as core
    from dafar.errors import MissingExtraError
    from dafar.manifest import read_manifest
    from dafar.runtime import Defence
    from dafar.runtime.backends import MIN_ONNXRUNTIME, OnnxRuntimeRunner

    ex = read_manifest(exported_run)["exports"]
    tfl = "export/dafar-l2-float-nchw-b1.tflite"
    assert ex["export/dafar-l2-float-nchw.onnx"]["min_runtime"] == {"onnxruntime": MIN_ONNXRUNTIME}
    need = ex[tfl]["min_runtime"]["tflite"]
    assert need and need.count(".") == 2
    assert {o["name"]: o["dtype"] for o in ex[tfl]["outputs"]}["label"] == "int32"

    monkeypatch.setattr(core, "litert_runtime", lambda: ("tflite_runtime", "2.2.0"))
    with pytest.raises(MissingExtraError, match=f">= {need}.*2.2.0"):
        Defence(exported_run, tfl)
    monkeypatch.setattr(core, "litert_runtime", lambda: ("ai_edge_litert", "2.3.0"))  # another numbering: not compared
    Defence(exported_run, tfl)

    monkeypatch.setattr(onnxruntime, "__version__", "1.15.1")
    with pytest.raises(MissingExtraError, match=r"onnxruntime >= 1\.16\.0.*1\.15\.1"):
        OnnxRuntimeRunner(exported_run / "export/dafar-l2-float-nchw.onnx")
