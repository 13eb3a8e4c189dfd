"""The Node client (examples/node/classify.js, onnxruntime-node) against the Python runtime
(dafar.runtime.Defence) on the same images and files: labels, scores and reject decisions.

Skipped, with the reason, where node or npm is missing or onnxruntime-node cannot be installed
(it installs from the npm registry with ONNXRUNTIME_NODE_INSTALL=skip: its CPU binaries ship
inside the package, nothing else is downloaded)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dafar.runtime import Defence
from dafar.runtime.core import default_model

CLIENT = Path(__file__).resolve().parents[1] / "examples" / "node" / "classify.js"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory) -> str:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Node client cannot be checked here")
    cached = os.environ.get("DAFAR_TEST_NODE_MODULES")  # a folder holding onnxruntime-node, to skip the install
    if cached and (Path(cached) / "onnxruntime-node").is_dir():
        return cached
    d = tmp_path_factory.mktemp("node")
    shutil.copy2(CLIENT.with_name("package.json"), d / "package.json")
    try:
        r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=d, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"})
    except subprocess.TimeoutExpired:
        pytest.skip("npm install onnxruntime-node took over 10 minutes")
    if r.returncode != 0:
        pytest.skip(f"npm install onnxruntime-node failed (no registry?): {(r.stderr or r.stdout).strip()[-300:]}")
    return str(d / "node_modules")


def _node(node_modules: str, run: Path, npy: Path, model: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["node", str(CLIENT), str(run), str(npy), "--json"] + (["--model", model] if model else [])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "NODE_PATH": node_modules})


def _images(run: Path, n: int = 64) -> np.ndarray:
    from dafar.run import RunFolder
    from dafar.schema import InputContract

    test = RunFolder.open(run, verify=False).test_set(None, limit=n)
    return InputContract.UINT8_NHWC.from_pixels(test.images)  # uint8 N x H x W x C camera pixels


def test_node_client_agrees_with_the_python_runtime(exported_run, node_modules, tmp_path):
    manifest = json.loads((exported_run / "manifest.json").read_text())
    pixels = _images(exported_run)
    files = [rel for rel, e in manifest["exports"].items() if e["format"] == "onnx"]
    assert any(manifest["exports"][r]["graph"] == "dafar" for r in files) and any(
        manifest["exports"][r]["graph"] == "victim" for r in files)
    for rel in files:
        e = manifest["exports"][rel]
        d = Defence(exported_run, rel, backend="onnxruntime")
        x = d.prepare(pixels)  # the file's own input contract: uint8 NHWC or float NCHW in [0, 1]
        npy = tmp_path / f"x-{e['contract']}.npy"
        np.save(npy, x)
        r = _node(node_modules, exported_run, npy, rel)
        assert r.returncode == 0, (rel, r.stderr)
        out = json.loads(r.stdout)
        assert out["model"] == rel
        rows = out["predictions"]
        p = d.predict(pixels)
        assert [row["label"] for row in rows] == p.labels.tolist(), rel
        if e["graph"] == "dafar":
            scores = np.array([row["score"] for row in rows], dtype=np.float64)
            # the same ONNX Runtime kernels (1.30 in Node, this environment's in Python): equal
            # in every run so far; 1e-5 leaves room for a kernel change between versions
            np.testing.assert_allclose(scores, p.scores, rtol=1e-5, err_msg=rel)
            assert [row["rejected"] for row in rows] == p.rejected.tolist(), rel
            assert out["alpha"] == pytest.approx(d.alpha)
        else:
            logits = np.array([row["logits"] for row in rows], dtype=np.float32)
            np.testing.assert_allclose(logits, p.logits, rtol=1e-4, atol=1e-5, err_msg=rel)
            assert all(row["rejected"] is None for row in rows)


def test_node_client_picks_the_python_runtimes_default_model(exported_run, node_modules, tmp_path):
    manifest = json.loads((exported_run / "manifest.json").read_text())
    npy = tmp_path / "x.npy"
    np.save(npy, _images(exported_run, 8))  # uint8 camera pixels
    r = _node(node_modules, exported_run, npy)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == default_model(manifest, prefer="onnx")


def test_node_client_refuses_a_tampered_model_and_bad_input(exported_run, node_modules, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    rel = default_model(manifest, prefer="onnx")
    npy = tmp_path / "x.npy"
    np.save(npy, _images(run, 4))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((4, 5, 5, 1), np.uint8))
    r = _node(node_modules, run, bad, rel)
    assert r.returncode == 2 and "shape" in r.stderr and "Error" not in r.stderr.split(":", 1)[0]
    with open(run / rel, "r+b") as f:  # one byte changed: the sha256 no longer matches the manifest
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    r = _node(node_modules, run, npy, rel)
    assert r.returncode == 2 and "sha256" in r.stderr and "refusing" in r.stderr
