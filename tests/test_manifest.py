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
    (tmp_path / "weights").mkdir(parents=True)
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


def test_written_files_follow_the_umask(tmp_path):
    """manifest.json and every atomically written file get the mode a plain open() would
    (0644 under umask 022), not mkstemp's private 0600."""
    import os
    import stat

    from dafar.manifest import atomic_write_json, umask_mode

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644 == umask_mode()
        os.umask(0o077)
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_manifest_parsing_is_bounded_in_size_and_depth(tmp_path, monkeypatch):
    """A crafted manifest (huge, or nested thousands deep) is refused with a message naming the
    limit, before it costs memory or a RecursionError."""
    run = _run(tmp_path / "a")
    (run / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nests"):
        read_manifest(run)
    nested = {"kind": "dafar-run", "files": {}}
    d = nested
    for _ in range(100):
        d["x"] = {}
        d = d["x"]
    run2 = tmp_path / "b"
    run2.mkdir()
    write_manifest(run2, nested)
    with pytest.raises(ManifestError, match="levels deep, above the limit of 64"):
        read_manifest(run2)
    monkeypatch.setenv("DAFAR_MAX_MANIFEST_BYTES", "100")
    with pytest.raises(ManifestError, match="DAFAR_MAX_MANIFEST_BYTES"):
        read_manifest(run)
    monkeypatch.delenv("DAFAR_MAX_MANIFEST_BYTES")
    read_manifest(_run(tmp_path / "c"))


def test_a_symbolic_link_out_of_the_run_folder_is_refused(tmp_path):
    import os

    run = _run(tmp_path / "run")
    outside = tmp_path / "elsewhere.bin"
    (run / "weights" / "E.safetensors").rename(outside)
    os.symlink(outside, run / "weights" / "E.safetensors")  # same bytes, same hash: only the place is wrong
    with pytest.raises(ManifestError, match="outside the run folder"):
        load_manifest(run)
    # a link that stays inside the run folder is fine
    (run / "weights" / "E.safetensors").unlink()
    (run / "weights" / "real.bin").write_bytes(b"abc")
    os.symlink("real.bin", run / "weights" / "E.safetensors")
    load_manifest(run)


def test_a_second_process_on_a_run_folder_is_refused_clearly(tmp_path):
    """Two stages on one run folder: the second is refused naming the first (no stage deletes the
    other's staging); the lock is re-entrant in one process and gone when its holder ends."""
    from conftest import lock_held_elsewhere

    from dafar.run import RunFolder, run_lock

    run = _run(tmp_path / "run")
    with lock_held_elsewhere(run, "export"):
        with pytest.raises(RunFolderError, match=r"in use by dafar export \(pid \d+\)"):
            with RunFolder.open(run).staging("quantize", log=lambda *a: None):
                pass
        with pytest.raises(RunFolderError, match="in use"):
            RunFolder.open(run).register({})
    with run_lock(run, "a"), run_lock(run, "b"):  # free again once the holder died; re-entrant
        RunFolder.open(run).register({})


def test_a_manifest_linked_from_outside_is_refused(tmp_path):
    import os

    run = _run(tmp_path / "run")
    outside = tmp_path / "manifest-elsewhere.json"
    (run / "manifest.json").rename(outside)
    os.symlink(outside, run / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json is a symbolic link .* outside the run folder"):
        load_manifest(run)


def test_depth_is_counted_across_scan_chunks_and_outside_strings():
    """The nesting scan goes a chunk at a time (bounded memory): the depth carries across chunk
    boundaries, and brackets inside strings do not count."""
    from dafar.manifest import _text_depth

    text = b'{"a": "[[[[", "b": ' + b"[" * 10 + b"]" * 10 + b', "c": ' + b"{" * 7 + b"}" * 7 + b"}"
    want = _text_depth(text)
    assert want == 11  # the outer object and ten brackets; the string's four do not count
    for chunk in (1, 3, 7, 64):
        assert _text_depth(text, chunk=chunk) == want
    assert _text_depth(b"") == 0


def test_a_restamped_manifest_of_the_wrong_structure_is_refused(tmp_path):
    """A digest says who wrote a manifest, not that it is well formed: a forged one re-stamped with a
    valid digest but a list where dafar writes an object is refused naming the section."""
    from dafar.manifest import manifest_digest

    for key, bad in (("thresholds", ["l2"]), ("files", []), ("exports", [1]), ("exports", {"m.onnx": "x"})):
        run = _run(tmp_path / f"{key}-{type(bad).__name__}")
        m = json.loads((run / MANIFEST_NAME).read_text())
        m[key] = bad
        m["manifest_sha256"] = manifest_digest(m)
        (run / MANIFEST_NAME).write_text(json.dumps(m))
        with pytest.raises(ManifestError, match=f"{key}.* should be a JSON object"):
            read_manifest(run)


def test_a_recorded_input_shape_of_the_wrong_rank_names_the_export():
    from dafar.schema import ExportEntry

    e = {"graph": "dafar", "format": "onnx", "contract": "float-nchw", "detector": "l2", "alpha": 1.0,
         "input": {"shape": [1, 28, 28], "dtype": "float32"}}
    with pytest.raises(ManifestError, match=r"run/manifest.json: export export/m.onnx: .*4 dimensions"):
        ExportEntry.parse("export/m.onnx", e, "run/manifest.json")
    e["input"]["shape"] = ["N", 1, "x", 28]
    with pytest.raises(ManifestError, match="export/m.onnx: .*positive integer"):
        ExportEntry.parse("export/m.onnx", e, "run/manifest.json")


def test_another_thread_on_a_locked_run_folder_is_refused(tmp_path):
    """flock is per process: without its own check a second thread shared the lock and its staging
    clean-up deleted the first thread's live staging folder.  Now it is refused like a second
    process, while the holding thread stays re-entrant."""
    import threading

    from dafar.run import RunFolder, run_lock

    run = _run(tmp_path / "run")
    got, inside, release = [], threading.Event(), threading.Event()

    def hold():
        with RunFolder.open(run).staging("export", log=lambda *a: None) as live:
            with run_lock(run, "register"):  # re-entrant in its own thread
                inside.set()
                release.wait(30)
                got.append(live.is_dir())

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(30)
    try:
        with pytest.raises(RunFolderError, match="in use by dafar export in another thread"):
            with RunFolder.open(run).staging("quantize", log=lambda *a: None):
                pass
    finally:
        release.set()
        t.join(30)
    assert got == [True]  # its staging folder survived the other thread's attempt
    with RunFolder.open(run).staging("quantize", log=lambda *a: None):
        pass  # free once the holder is done


def test_stale_cleanup_spares_a_fresh_atomic_write(tmp_path):
    import os
    import time

    from dafar.manifest import clean_stale_staging

    run = _run(tmp_path / "run")
    (run / "bench").mkdir()
    fresh, old = run / "bench" / ".summary.json.abc.tmp", run / ".report.md.def.tmp"
    fresh.write_text("being written")
    old.write_text("left by a crash")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert clean_stale_staging(run) == [".report.md.def.tmp"]
    assert fresh.is_file() and not old.exists()
