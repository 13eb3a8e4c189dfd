"""A user's own image folder: decoding, sizes and channels, the on-disk cache, the validation
split, every kind of bad data (each an error naming the file, nothing half-written), and the
whole pipeline on a generated folder (train -> export -> quantize -> predict)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dafar.errors import ConfigError, DataCorruptError, DataError, DataNotFoundError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

CLASSES = ("circle", "hbar", "vbar")
H, W = 24, 40  # an odd size: neither square nor a power of two


def _pattern(k: int, rng) -> np.ndarray:
    """A learnable image of class k: a disc, a horizontal bar or a vertical bar on dim noise."""
    a = rng.integers(0, 60, (H, W, 3)).astype(np.uint8)
    if k == 0:
        yy, xx = np.mgrid[:H, :W]
        a[(yy - H / 2) ** 2 + (xx - W / 2) ** 2 < 49] = 220
    elif k == 1:
        r = int(rng.integers(4, H - 4))
        a[r - 2: r + 2] = 230
    else:
        c = int(rng.integers(4, W - 4))
        a[:, c - 2: c + 2] = 230
    return a


def make_folder(root: Path, per_class=(40, 12), seed=0, bad=True) -> Path:
    """train/ and test/ trees in four formats, every fifth image grayscale; with ``bad``, one
    corrupt PNG and one text file among them."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = Image.fromarray(_pattern(k, rng))
                if i % 5 == 0:
                    im = im.convert("L")
                im.save(d / f"{i:03d}.{('png', 'jpg', 'bmp', 'webp')[i % 4]}")
    if bad:
        (root / "train" / "hbar" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        (root / "train" / "circle" / "notes.txt").write_text("not an image")
    return root


def _load(root, **kw):
    from dafar.data import load_dataset

    return load_dataset("imagefolder", root, **kw)


def test_folder_loads_with_stats_split_and_cache(tmp_path):
    root = make_folder(tmp_path / "data", bad=False)
    s = _load(root)
    assert s.classes == CLASSES and s.input_shape == (3, H, W)  # grayscale images converted to RGB
    assert len(s.train) + len(s.val) == 120 and len(s.val) == 12 and len(s.test) == 36
    assert np.bincount(s.val.labels).tolist() == [4, 4, 4]  # class-stratified 10%
    assert isinstance(s.train.images, np.memmap) and not s.train.images.flags.writeable
    assert s.preprocess["val_from"].startswith("12 training images") and s.preprocess["resize"] is False
    x = np.concatenate([np.asarray(s.train.images, np.float64)]) / 255
    np.testing.assert_allclose(s.normalization["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(s.normalization["std"], x.std(axis=(0, 2, 3)), rtol=1e-5)
    again = _load(root)  # from the cache: same content, same fingerprint
    assert again.fingerprint == s.fingerprint and np.array_equal(again.train.images, s.train.images)
    # an edited image makes a new cache; a tampered cache is rebuilt, never trusted
    cache = Path(os.environ["DAFAR_CACHE_DIR"]) / "imagefolder"
    before = set(cache.iterdir())
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "test" / "vbar" / "000.png")
    changed = _load(root)
    assert changed.fingerprint != s.fingerprint and len(set(cache.iterdir()) - before) == 1
    (new,) = set(cache.iterdir()) - before
    raw = bytearray((new / "test.u8").read_bytes())
    raw[10] ^= 0xFF
    (new / "test.u8").write_bytes(bytes(raw))
    assert _load(root).fingerprint == changed.fingerprint


def test_resize_channels_and_a_val_folder(tmp_path):
    from dafar.imagefolder import read_image

    root = make_folder(tmp_path / "data", bad=False)
    for cls in CLASSES:  # a val/ folder is used as it is
        (root / "val" / cls).mkdir(parents=True)
        for p in sorted((root / "train" / cls).iterdir())[:3]:
            p.rename(root / "val" / cls / p.name)
    s = _load(root, image_size=(32, 48), channels=1)
    assert s.input_shape == (1, 32, 48) and len(s.val) == 9 and s.preprocess["val_from"] == "val/ folder"
    assert s.preprocess == {**s.preprocess, "resize": True, "interpolation": "bilinear", "channels": 1}
    # the function dafar predict uses gives exactly the cached pixels
    f = sorted((root / "test" / "hbar").iterdir())[0]
    one = read_image(f, 1, (32, 48))
    assert one.shape == (32, 48, 1)
    order = [p for c in CLASSES for p in sorted((root / "test" / c).iterdir())]
    np.testing.assert_array_equal(s.test.images[order.index(f)], one.transpose(2, 0, 1))


def test_bad_images_fail_naming_the_file_or_are_skipped_and_recorded(tmp_path):
    root = make_folder(tmp_path / "data")
    with pytest.raises(DataCorruptError, match="broken.png"):
        _load(root)
    assert not list((Path(os.environ["DAFAR_CACHE_DIR"]) / "imagefolder").glob("*.*"))  # nothing half-written
    s = _load(root, skip_bad_images=True)
    assert len(s.train) + len(s.val) == 120  # the corrupt file skipped, the text file never decoded
    assert [Path(f["file"]).name for f in s.preprocess["skipped_images"]] == ["broken.png"]
    assert s.preprocess["ignored_non_image_files"] == 1


@pytest.mark.parametrize("case,error,match", [
    ("classes differ", DataError, "only in train/: vbar"),
    ("empty class", DataError, "holds no images"),
    ("single class", DataError, "at least 2"),
    ("mixed sizes", DataError, "--image-size"),
    ("no test folder", DataNotFoundError, "no test/"),
    ("symlink out", DataError, "leaves the data folder"),
    ("truncated", DataCorruptError, "001.png"),
])
def test_bad_folders_are_refused_with_a_clear_error(tmp_path, case, error, match):
    root = make_folder(tmp_path / "data", per_class=(6, 3), bad=False)
    if case == "classes differ":
        for p in (root / "test" / "vbar").iterdir():
            p.unlink()
        (root / "test" / "vbar").rmdir()
    elif case == "empty class":
        for p in (root / "train" / "hbar").iterdir():
            p.unlink()
    elif case == "single class":
        for split in ("train", "test"):
            for cls in CLASSES[1:]:
                for p in (root / split / cls).iterdir():
                    p.unlink()
                (root / split / cls).rmdir()
    elif case == "mixed sizes":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "hbar" / "odd.png")
    elif case == "no test folder":
        import shutil

        shutil.rmtree(root / "test")
    elif case == "symlink out":
        outside = tmp_path / "secret.png"
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(outside)
        (root / "train" / "hbar" / "link.png").symlink_to(outside)
    elif case == "truncated":
        p = root / "train" / "circle" / "001.png"
        Image.fromarray(_pattern(0, np.random.default_rng(1))).save(p)
        p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(error, match=match):
        _load(root)


def test_options_are_checked():
    from dafar.imagefolder import parse_image_size
    from dafar.train.config import TrainConfig

    assert parse_image_size("64") == (64, 64) and parse_image_size("24x40") == (24, 40)
    for bad in ("0", "12x", "axb", "5000"):
        with pytest.raises(ConfigError):
            parse_image_size(bad)
    with pytest.raises(ConfigError, match="image folders"):
        TrainConfig.for_profile("mnist", "quick", image_size=(32, 32))
    with pytest.raises(ConfigError, match="channels"):
        TrainConfig.for_profile("imagefolder", "quick", channels=2)
    assert TrainConfig.for_profile("imagefolder", "quick").val_size is None  # 10% of train, stratified


@pytest.mark.slow
def test_image_folder_end_to_end(tmp_path, capsys):
    """train -> export (labels.txt beside) -> quantize -> predict on a generated folder of mixed
    formats and channel counts with a corrupt and a non-image file."""
    pytest.importorskip("onnx2tf")
    from dafar.cli import main
    from dafar.manifest import load_manifest

    root = make_folder(tmp_path / "data", per_class=(60, 12))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(run)]) == 3  # corrupt file
    assert "broken.png" in capsys.readouterr().err and not run.exists()
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(run), "--skip-bad-images",
                 "--width", "0.5", "--epochs", "6", "--detector-epochs", "2", "--batch-size", "32",
                 "--threads", "2", "--quiet"]) == 0
    m = load_manifest(run)
    assert m["dataset"]["classes"] == list(CLASSES) and m["input"]["shape"] == [3, H, W]
    assert m["dataset"]["skipped_images"]["count"] == 1 and m["dataset"]["ignored_non_image_files"] == 1
    assert m["architecture"]["family"] == "mobile" and m["architecture"]["decoder_output"] == "linear"
    assert len(m["input"]["normalization"]["mean"]) == 3 and m["metrics"]["victim_test_acc"] > 0.6  # chance: 0.33
    assert main(["export", str(run), "--detector", "l2", "--input", "uint8-nhwc", "--no-victim", "--validate", "all",
                 "--quiet"]) == 0
    assert (run / "export" / "labels.txt").read_text().splitlines() == list(CLASSES)
    # a detector that was not exported is an error naming it, not a quiet quantization of the rest
    assert main(["quantize", str(run), "--detector", "autoencoder", "--quiet"]) == 4
    assert "no float export for the detector autoencoder" in capsys.readouterr().err
    assert main(["quantize", str(run), "--attack-images", "0", "--no-naive", "--calib", "64",
                 "--min-label-agreement", "0.9", "--max-accuracy-drop", "0.05", "--quiet"]) == 0
    capsys.readouterr()
    img = sorted((root / "test" / "vbar").glob("*.png"))[0]
    assert main(["predict", str(run), str(img), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"].endswith("-int8-b1.tflite") and out["predictions"][0]["class"] in CLASSES
    load_manifest(run)  # every file still verifies


def test_adversarial_training_on_the_mobile_network(tmp_path, capsys):
    """--adversarial on the batch-normalised mobile network: the attack runs in training mode
    beside batch norm, the monitor's PGD accuracy is logged, the manifest and report say how the
    victim was trained and what a plain PGD does to it, and a changed attack setting refuses to
    resume the checkpoint."""
    from dafar.cli import main
    from dafar.manifest import load_manifest

    root = make_folder(tmp_path / "data", per_class=(24, 8), bad=False)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(run), "--width", "0.25",
            "--epochs", "2", "--detector-epochs", "1", "--batch-size", "16", "--threads", "2", "--quiet",
            "--adversarial", "pgd", "--adv-eps", "4/255", "--adv-steps", "2"]
    assert main(argv) == 0
    m = load_manifest(run)
    assert m["training"]["adversarial"] == {"mode": "pgd", "eps": pytest.approx(4 / 255), "steps": 2,
                                            "step_size": pytest.approx(2.5 * 4 / 255 / 2), "guard": 0.2}
    rob = m["metrics"]["robust"]
    assert rob["eps"] == pytest.approx(4 / 255) and 0 <= rob["victim_pgd_acc"] <= m["metrics"]["victim_test_acc"] + 1e-9
    kept = m["training"]["kept_weights"]["joint"]
    assert kept["best_by"] == "val_robust_acc" and 1 <= kept["best_epoch"] <= 2
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_robust_acc"] <= 1 for r in log if r.get("phase") == "joint")
    assert "## Adversarial training" in (run / "report.md").read_text()
    # a new decoder on the robust victim (issue 22's plug-in route): E and F are the robust ones, unchanged
    att = tmp_path / "att"
    assert main(["attach", "--victim", str(run), "--data-dir", str(root), "--out", str(att), "--epochs", "1",
                 "--no-detector", "--batch-size", "16", "--threads", "2", "--quiet"]) == 0
    a = load_manifest(att)
    assert a["training"]["mode"] == "plug-in" and "l2" in a["thresholds"]
    for k in ("E", "F"):
        assert a["files"][f"weights/{k}.safetensors"]["sha256"] == m["files"][f"weights/{k}.safetensors"]["sha256"]
    assert a["metrics"]["victim_test_acc"] == m["metrics"]["victim_test_acc"]
    # the same run folder with another budget is another schedule: not resumable
    (run / "manifest.json").unlink()
    capsys.readouterr()
    assert main(argv[:-4] + ["--adv-eps", "8/255", "--adv-steps", "2", "--resume"]) == 5  # a configuration error
    assert "differ from the run's saved configuration" in capsys.readouterr().err  # naming adv_eps


def test_a_classifier_trained_alone_then_attached(tmp_path, capsys):
    """--classifier-only trains E and F with cross-entropy (SGD, label smoothing here) into a run
    that holds no decoder: later stages refuse it with the command that attaches one, and
    `dafar attach` then trains D (and C) on it with the classifier's logits unchanged, bit for bit."""
    import torch

    from dafar.cli import main
    from dafar.errors import RunFolderError
    from dafar.manifest import load_manifest
    from dafar.train import TrainConfig
    from dafar.train.loading import load_dafar

    root = make_folder(tmp_path / "data", per_class=(60, 12), bad=False)
    run, att = tmp_path / "clf", tmp_path / "att"
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(run), "--classifier-only",
                 "--width", "0.5", "--epochs", "4", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.05",
                 "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--threads", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "purified" not in out and f"dafar attach --victim {run}" in out
    m = load_manifest(run)
    assert m["training"]["mode"] == "classifier" and m["thresholds"] == {}
    assert m["training"]["seconds_per_epoch"].keys() == {"classifier"}
    assert m["architecture"]["decoder"] is None and m["architecture"]["detector"] is False
    assert m["architecture"]["params"]["D"] == 0 and m["architecture"]["costs"]["D"]["macs"] == 0
    assert {f for f in m["files"] if f.startswith("weights/")} == {"weights/E.safetensors", "weights/F.safetensors"}
    assert "scores.npz" not in m["files"] and m["metrics"]["victim_test_acc"] > 0.6  # chance: 0.33
    assert m["training"]["config"]["label_smoothing"] == 0.1
    report = (run / "report.md").read_text()
    assert "A classifier alone" in report and f"dafar attach --victim {run} --data-dir {root} --out RUN_DIR" in report
    # no defence to export, quantize or evaluate: said so, with the way forward, nothing written
    with pytest.raises(RunFolderError, match="classifier alone"):
        load_dafar(run)
    assert main(["export", str(run), "--quiet"]) == 4
    assert "dafar attach --victim" in capsys.readouterr().err and not (run / "export").exists()
    for cmd in (["quantize", str(run)], ["bench", str(run)], ["eval", str(run)], ["predict", str(run), str(root)]):
        assert main(cmd) != 0, cmd
        assert "holds a classifier alone" in capsys.readouterr().err, cmd
    assert main(["info", str(run)]) == 0 and "none yet" in capsys.readouterr().out
    from dafar.train.publish import publish

    with pytest.raises(RunFolderError, match="classifier alone"):
        publish(run, "nope", "dafar train ...", dest=tmp_path / "nope")
    assert main(["attach", "--victim", str(run), "--data-dir", str(root), "--out", str(att), "--epochs", "2",
                 "--detector-epochs", "1", "--batch-size", "32", "--threads", "2", "--quiet"]) == 0
    a = load_manifest(att)
    assert a["training"]["mode"] == "plug-in" and {"l2", "autoencoder"} <= set(a["thresholds"])
    for k in ("E", "F"):  # the classifier's own weights, unchanged
        assert a["files"][f"weights/{k}.safetensors"]["sha256"] == m["files"][f"weights/{k}.safetensors"]["sha256"]
    # the classifier's training is part of the model's cost: recorded, reported, published
    src = a["training"]["attached_to"]
    assert src["mode"] == "classifier" and src["epochs"] == 4 and src["total_seconds"] == m["training"]["total_seconds"]
    assert "victim + D + C took" in (att / "report.md").read_text()
    assert main(["summary", str(att)]) == 0 and "(+4 of the classifier, trained alone)" in capsys.readouterr().out
    pub = load_manifest(publish(att, "tiny-folder", "dafar train ... && dafar attach ...", dest=tmp_path / "pub"))
    prov = pub["provenance"]
    assert prov["epochs"]["classifier"] == 4 and prov["classifier"]["manifest_sha256"] == src["manifest_sha256"]
    assert prov["total_seconds_in_all"] == pytest.approx(a["training"]["total_seconds"] + src["total_seconds"])
    net, _ = load_dafar(att)
    from dafar.data import load_dataset
    from dafar.train.trainer import _classifier_logits

    x = load_dataset("imagefolder", root).test.images
    clf = json.loads((run / "metrics.json").read_text())["victim_test_acc"]
    logits = _classifier_logits(net, x, torch.device("cpu"), 16)
    assert float(np.mean(logits.argmax(1) == load_dataset("imagefolder", root).test.labels)) == clf
    # options that cannot go together are refused up front
    for bad in ({"train_victim": True}, {"init_from": str(run)}, {"attach_to": str(run)}):
        with pytest.raises(ConfigError, match="classifier_only"):
            TrainConfig.for_profile("imagefolder", "quick", classifier_only=True, **bad)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ConfigError, match="label_smoothing"):
            TrainConfig.for_profile("imagefolder", "quick", label_smoothing=bad)


def test_a_classifier_trained_alone_then_finished_jointly(tmp_path, capsys):
    """--init-from a classifier trained alone: E and F start from its weights (re-split when the
    joint run feeds back at another layer), D from its initialisation, and --decoder-optimizer /
    --decoder-lr give D an optimizer and schedule of its own: with E and F's learning rate near zero
    the classifier is kept while D still learns."""
    from safetensors.numpy import load_file

    from dafar.cli import main
    from dafar.manifest import load_manifest
    from dafar.train import TrainConfig

    root = make_folder(tmp_path / "data", per_class=(60, 12), bad=False)
    clf = tmp_path / "clf"
    common = ["--dataset", "imagefolder", "--data-dir", str(root), "--width", "0.5", "--batch-size", "32",
              "--threads", "2", "--quiet"]
    assert main(["train", *common, "--out", str(clf), "--classifier-only", "--epochs", "4", "--optimizer", "sgd",
                 "--lr", "0.05"]) == 0
    m = load_manifest(clf)
    runs = {}
    for name, extra in (("split", ["--decoder-optimizer", "adam", "--decoder-lr", "0.01"]), ("same", []),
                        ("stage1", ["--feedback-at", "stage1", "--decoder-optimizer", "adam", "--decoder-lr", "0.01"])):
        out = tmp_path / name
        assert main(["train", *common, "--out", str(out), "--init-from", str(clf), "--epochs", "2", "--optimizer",
                     "sgd", "--lr", "1e-6", "--detector-epochs", "1", *extra]) == 0, name
        runs[name] = load_manifest(out)
    capsys.readouterr()
    j = runs["split"]
    assert j["training"]["mode"] == "joint" and "weights/D.safetensors" in j["files"]
    src = j["training"]["init_from"]
    assert src["mode"] == "classifier" and src["epochs_total"] == 4 and src["total_seconds"] == m["training"]["total_seconds"]
    cfg = j["training"]["config"]
    assert (cfg["decoder_optimizer"], cfg["decoder_lr"], cfg["optimizer"]) == ("adam", 0.01, "sgd")
    # E and F: the classifier's, moved by lr 1e-6 only (batch-norm statistics are re-estimated, so
    # on these few images the accuracy itself may move); at stage1 the same tensors, split elsewhere
    def weights(run):
        out = {}
        for k in ("E", "F"):
            out.update({t: v for t, v in load_file(str(run / f"weights/{k}.safetensors")).items()
                        if "running" not in t and "num_batches" not in t})
        return out

    ref = weights(clf)
    for name in ("split", "stage1"):
        got = weights(tmp_path / name)
        assert len(got) == len(ref) and sum(v.size for v in got.values()) == sum(v.size for v in ref.values())
        assert sorted(np.abs(v).sum() for v in got.values()) == pytest.approx(sorted(np.abs(v).sum() for v in
                                                                                    ref.values()), rel=1e-3)
    a, b = weights(clf), weights(tmp_path / "split")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3
    # D on its own learning rate learns; at the classifier's 1e-6 it does not
    recon = {k: [json.loads(line) for line in (tmp_path / k / "train_log.jsonl").read_text().splitlines()
                 if '"joint"' in line][-1]["val_recon"] for k in runs}
    assert recon["split"] < recon["same"]
    # both runs start D from the same seeded initialisation: at lr 1e-6 it stays there, at its own 0.01 it moves
    d_split, d_same = (load_file(str(tmp_path / k / "weights/D.safetensors")) for k in ("split", "same"))
    moved = {k: float(np.abs(d_split[k] - d_same[k]).max()) for k in d_split if "running" not in k
             and "num_batches" not in k}
    assert max(moved.values()) > 1e-2
    assert runs["stage1"]["architecture"]["feedback_at"] == "stage1"
    # the classifier's epochs and seconds count as the model's training, said as what they were
    assert "4 classifier epochs (trained alone)" in (tmp_path / "split" / "report.md").read_text()
    assert main(["summary", str(tmp_path / "split")]) == 0
    assert "2 (+4 of the classifier, trained alone)" in capsys.readouterr().out
    from dafar.train.publish import publish

    prov = load_manifest(publish(tmp_path / "split", "tiny", "dafar train ...", dest=tmp_path / "pub"))["provenance"]
    assert prov["epochs"]["classifier"] == 4 and "joint_in_all" not in prov["epochs"]
    assert prov["total_seconds_in_all"] == pytest.approx(j["training"]["total_seconds"] + m["training"]["total_seconds"])
    # a decoder cannot be continued at another feedback position, nor a classifier's in plug-in mode
    with pytest.raises(ConfigError, match="reads E at stage2"):
        from dafar.train.trainer import _parent_run

        _parent_run(TrainConfig.for_profile("imagefolder", "quick", arch="mobile", init_from=str(tmp_path / "split"),
                                            feedback_at="stage1"))
    assert main(["attach", "--victim", str(clf), "--init-from", str(clf), "--data-dir", str(root),
                 "--out", str(tmp_path / "att"), "--quiet"]) != 0
    assert "has no decoder to continue" in capsys.readouterr().err and not (tmp_path / "att").exists()
    for bad, field in (({"decoder_lr": 0.0}, "decoder_lr"), ({"decoder_lr": 2.0}, "decoder_lr"),
                       ({"decoder_optimizer": "rmsprop"}, "decoder_optimizer"),
                       ({"classifier_only": True, "decoder_lr": 1e-3}, "classifier_only")):
        with pytest.raises(ConfigError, match=field):
            TrainConfig.for_profile("imagefolder", "quick", **bad)


def test_a_narrower_decoder_from_a_joint_runs_encoder(tmp_path, capsys):
    """--init-from a joint run with --new-decoder: E and F start from its weights, D at another
    width starts from its initialisation and trains on its own optimizer; without the flag the
    width change is refused with a message naming it, and the flag needs --init-from."""
    from safetensors.numpy import load_file

    from dafar.cli import main
    from dafar.manifest import load_manifest

    root = make_folder(tmp_path / "data", per_class=(40, 8), bad=False)
    common = ["--dataset", "imagefolder", "--data-dir", str(root), "--width", "0.5", "--batch-size", "32",
              "--threads", "2", "--quiet", "--no-detector"]
    parent = tmp_path / "joint"
    assert main(["train", *common, "--out", str(parent), "--epochs", "2"]) == 0
    pm = load_manifest(parent)
    capsys.readouterr()
    half = ["--init-from", str(parent), "--decoder-width", "0.5", "--epochs", "2", "--optimizer", "sgd", "--lr", "1e-6",
            "--decoder-optimizer", "adam", "--decoder-lr", "0.01"]
    assert main(["train", *common, "--out", str(tmp_path / "refused"), *half]) == 2
    assert "--new-decoder" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["train", *common, "--out", str(tmp_path / "lone"), "--new-decoder"]) == 2
    assert "--init-from" in capsys.readouterr().err
    out = tmp_path / "half"
    assert main(["train", *common, "--out", str(out), *half, "--new-decoder"]) == 0
    m = load_manifest(out)
    assert m["architecture"]["decoder_width"] == 0.5
    assert m["architecture"]["params"]["D"] < 0.5 * pm["architecture"]["params"]["D"]
    src = m["training"]["init_from"]
    assert src["decoder"] == {"kept": False, "width": 1.0, "feedback_at": "stage2"} and "mode" not in src
    assert m["training"]["config"]["new_decoder"] is True

    def tensors(run, names):
        return {t: v for k in names for t, v in load_file(str(run / f"weights/{k}.safetensors")).items()
                if "running" not in t and "num_batches" not in t}

    a, b = tensors(parent, "EF"), tensors(out, "EF")  # E and F: the parent's, moved by lr 1e-6 only
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3
    d = tensors(out, "D")
    assert all(v.shape != load_file(str(parent / "weights/D.safetensors"))[k].shape for k, v in d.items() if v.ndim > 1)
    report = (out / "report.md").read_text()
    assert "its width-1 D at stage2 not kept" in report and "4 joint epochs" in report


def test_two_optimizers_resume_bit_identically(tmp_path):
    """The pair of optimizers (E/F and D each with its own) goes through a checkpoint and back:
    training continued from it matches training that never stopped."""
    import torch

    from dafar.train.config import Optimizer
    from dafar.train.trainer import _Optimizers, _optimizer, _Schedules
    from dafar.train.weights import load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        a = _optimizer(list(net[0].parameters()), Optimizer.SGD, 0.1, 5e-4, 20)
        b = _optimizer(list(net[2].parameters()), Optimizer.ADAM, 0.01, 5e-4, 20)
        return net, _Optimizers(a[0], b[0]), _Schedules(a[1], b[1])

    def train(net, opt, sched, steps, start=0):
        for i in range(start, start + steps):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(16, 4, generator=g)
            loss = (net(x) - x[:, :2]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    ref = make()
    train(*ref, 10)
    first = make()
    train(*first, 4)
    assert len(first[2].get_last_lr()) == 2 and first[2].get_last_lr()[0] != first[2].get_last_lr()[1]
    save_checkpoint(tmp_path / "ck", *first, {"epochs_done": 1})
    again = make()
    load_checkpoint(tmp_path / "ck", *again)
    train(*again, 6, start=4)
    for p, q in zip(ref[0].parameters(), again[0].parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_the_edge_profile_on_an_image_folder(tmp_path, monkeypatch):
    """--profile edge on a user's own images: the mobile network with D after its first stage,
    l2 only; the pipeline ships detect graphs and asks dafar quantize for the mixed layout, whose
    own checks then run on it (loosened here for a 3-class model trained 2 epochs on 120 images)."""
    pytest.importorskip("onnx2tf")
    from dataclasses import replace

    import dafar.quantize as quantize_stage
    from dafar import pipeline
    from dafar.manifest import load_manifest
    from dafar.quantize import Checks
    from dafar.train.config import TrainConfig

    asked, real = [], quantize_stage.quantize

    def loosened(run, cfg, **kw):
        asked.append(cfg)
        return real(run, replace(cfg, attack_images=0, calib_images=64,
                                 checks=Checks(min_label_agreement=0.8, max_accuracy_drop=0.2,
                                               min_decision_agreement=0.8, min_score_correlation=0.5)), **kw)

    monkeypatch.setattr(quantize_stage, "quantize", loosened)
    root = make_folder(tmp_path / "data", per_class=(40, 12), bad=False)
    cfg = TrainConfig.for_profile("imagefolder", "edge", epochs=2, width=0.5, batch_size=32, threads=2)
    res = pipeline(tmp_path / "edge", cfg, data_dir=root, bench=False, check_images=None, quiet=True,
                   log=lambda *a: None)
    m = load_manifest(res.run_dir)
    a = m["architecture"]
    assert (a["family"], a["feedback_at"], a["decoder_width"]) == ("mobile", "stage1", 1.0)
    assert m["training"]["config"]["profile"] == "edge" and not res.run_dir.joinpath("weights/C.safetensors").exists()
    assert [c.layout.value for c in asked] == ["mixed"]
    defence = {rel: e for rel, e in m["exports"].items() if e["graph"] == "dafar"}
    assert defence and all(e["mode"] == "detect" for e in defence.values())
    int8 = [e for e in defence.values() if e.get("precision") == "int8"]
    assert int8 and all(e["layout"] == "mixed" for e in int8)
