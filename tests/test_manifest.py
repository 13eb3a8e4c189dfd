import json

import pytest

from dafar.errors import HashMismatchError, ManifestError, RunFolderError
from dafar.manifest import (
    MANIFEST_NAME,
    atomic_write_bytes,
    file_entry,
    get_field,
    load_manifest,
    read_manifest,
    write_manifest,
)


def _run(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "E.safetensors").write_bytes(b"abc")
    (tmp_path / "metrics.json").write_text("{}")
    m = {"kind": "dafar-run", "thresholds": {"l2": {"alpha": 1.5}},
         "files": {"weights/E.safetensors": file_entry(tmp_path, "weights/E.safetensors", "weights"),
                   "metrics.json": file_entry(tmp_path, "metrics.json", "metrics")}}
    write_manifest(tmp_path, m)
    return tmp_path


def test_round_trip(tmp_path):
    run = _run(tmp_path)
    m = load_manifest(run)
    assert m["files"]["weights/E.safetensors"]["bytes"] == 3
    assert get_field(m, "thresholds.l2.alpha") == 1.5
    with pytest.raises(ManifestError, match="thresholds.autoencoder"):
        get_field(m, "thresholds.autoencoder.alpha", run)


def test_changed_file_is_refused_naming_it(tmp_path):
    run = _run(tmp_path)
    (run / "weights" / "E.safetensors").write_bytes(b"abd")
    with pytest.raises(HashMismatchError, match="E.safetensors"):
        load_manifest(run)
    load_manifest(run, verify=["metrics.json"])  # a subset can still be checked
    read_manifest(run)  # no file hashes checked


def test_missing_file(tmp_path):
    run = _run(tmp_path)
    (run / "metrics.json").unlink()
    with pytest.raises(RunFolderError, match="metrics.json"):
        load_manifest(run)


def test_edited_manifest_is_refused(tmp_path):
    run = _run(tmp_path)
    p = run / MANIFEST_NAME
    m = json.loads(p.read_text())
    m["thresholds"]["l2"]["alpha"] = 99.0
    p.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="edited"):
        load_manifest(run)


def test_unreadable_and_missing_manifest(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        load_manifest(tmp_path)


def test_paths_outside_the_run_folder_are_refused(tmp_path):
    run = _run(tmp_path)
    m = read_manifest(run)
    m["files"]["../evil"] = {"sha256": "0"}
    write_manifest(run, m)
    with pytest.raises(ManifestError, match="outside the run folder"):
        load_manifest(run)


def test_non_finite_numbers_are_refused(tmp_path):
    with pytest.raises(ManifestError, match="non-finite"):
        write_manifest(tmp_path, {"alpha": float("nan"), "files": {}})
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"good")

    class Boom(bytes):
        pass

    with pytest.raises(TypeError):
        atomic_write_bytes(p, object())  # type: ignore[arg-type]
    assert p.read_bytes() == b"good"
    assert [f.name for f in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


def test_reports_name_the_jpeg_copy_of_cifar10():
    from dafar.manifest import dataset_label

    assert dataset_label({"dataset": {"name": "cifar10", "source": "../shared/data/cifar10-jpg/cifar10-jpg.tar.gz"}}) \
        == "CIFAR-10 (JPEG q75)"
    assert dataset_label({"dataset": {"name": "cifar10", "source": "/data/cifar-10-batches-py"}}) == "CIFAR-10"
    assert dataset_label({"dataset": {"name": "mnist", "source": "vendored"}}) == "MNIST"
