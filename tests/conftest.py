"""Shared fixtures.  Real data come from ``../shared/data`` beside the checkout (or
``$DAFAR_SHARED_DATA``); tests that need them skip with a reason when it is absent."""
from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DAFAR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    # Never touch the network or the user's cache from tests.
    monkeypatch.setenv("DAFAR_OFFLINE", "1")
    monkeypatch.delenv("DAFAR_DATA_DIR", raising=False)
    monkeypatch.setenv("DAFAR_CACHE_DIR", str(_session_cache(tmp_path_factory)))


_CACHE: list[Path] = []


def _session_cache(factory) -> Path:
    # One cache per session so the (slow) CIFAR-10 JPEG decode happens once.
    if not _CACHE:
        env = os.environ.get("DAFAR_TEST_CACHE_DIR")
        _CACHE.append(Path(env) if env else factory.mktemp("dafar-cache"))
    return _CACHE[0]


@pytest.fixture
def shared_mnist() -> Path:
    p = SHARED_DATA / "mnist"
    if not (p / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {p} (set DAFAR_SHARED_DATA)")
    return p


@pytest.fixture
def shared_cifar() -> Path:
    p = SHARED_DATA / "cifar10-jpg"
    if not p.is_dir() or not any(p.iterdir()):
        pytest.skip(f"CIFAR-10 (JPEG q75) not found at {p} (set DAFAR_SHARED_DATA)")
    return p


def write_idx(path: Path, arr: np.ndarray, gz: bool = True, magic: int | None = None) -> Path:
    """Write ``arr`` (uint8) as an IDX file, optionally gzip-compressed."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = 0x0800 + arr.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_image_folder(root: Path, classes, per_class: int = 2, size=(32, 32), splits=("train", "test"), seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def pytest_collection_modifyitems(config, items):
    # full-scale and emulation checks run only when asked for: -m full / -m arm64, or DAFAR_RUN_FULL=1 /
    # DAFAR_RUN_ARM64=1
    markexpr = config.getoption("-m") or ""  # the markers asked for by name
    for mark, env, why in (("full", "DAFAR_RUN_FULL", "full-scale training check"),
                           ("arm64", "DAFAR_RUN_ARM64", "emulated aarch64 check (root, ~10 min)"),
                           ("fresh", "DAFAR_RUN_FRESH", "fresh-clone check of README's main command (~20 min)")):
        if mark in markexpr or os.environ.get(env) == "1":
            continue
        skip = pytest.mark.skip(reason=f"{why}: run with -m {mark} or {env}=1")
        for item in items:
            # by marker only: an item's keywords also hold the names of its parent folders, so a
            # checkout in a folder named "fresh" or "full" would otherwise skip every test
            if item.get_closest_marker(mark) is not None:
                item.add_marker(skip)


# ---------------------------------------------------------------- a small exported MNIST run, shared
_EXPORTED: list = []


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """A small real MNIST run (2,000 training images, 2 epochs), exported to ONNX and TFLite with both
    detectors and both input contracts, plus the victim alone.  Read-only: copy it before changing it."""
    pytest.importorskip("onnx2tf")
    pytest.importorskip("ai_edge_litert")
    if not _EXPORTED:
        from dafar.export import ExportConfig, export
        from dafar.train.config import TrainConfig
        from dafar.train.trainer import train

        root = tmp_path_factory.mktemp("exported") / "run"
        cfg = TrainConfig.for_profile("mnist", "quick", train_limit=2000, test_limit=400, val_size=500, batch_size=64,
                                      epochs=2, detector_epochs=2, threads=2)
        run = train(cfg, root, quiet=True).run_dir
        export(run, ExportConfig(detectors=("l2", "autoencoder"), contracts=("float-nchw", "uint8-nhwc"),
                                     validate_images=400), log=lambda *a: None)
        _EXPORTED.append(run)
    return _EXPORTED[0]


@pytest.fixture
def run_clone(exported_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(exported_run, dst)
    return dst


# ---------------------------------------------------------------- another process holding a run's lock
@contextlib.contextmanager
def lock_held_elsewhere(run, stage: str):
    """A second process holding ``run``'s lock as dafar ``stage`` for the duration of the block."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from dafar.run import run_lock\n"
        f"with run_lock({str(run)!r}, {stage!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
