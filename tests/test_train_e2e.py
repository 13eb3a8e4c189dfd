"""End-to-end training on a few hundred images: the run folder, its checks, resume and failure paths."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dafar.cli import main
from dafar.data import load_dataset
from dafar.errors import ConfigError, NonFiniteLossError, RunFolderError
from dafar.manifest import load_manifest, sha256_file
from dafar.train import trainer as trainer_mod
from dafar.train.config import TrainConfig
from dafar.train.models import build_dafar
from dafar.train.trainer import to_model_scale, train
from dafar.train.weights import load_into

pytestmark = pytest.mark.slow

TINY = dict(train_limit=256, test_limit=200, val_size=300, batch_size=64, detector_epochs=1, threads=2)


def _tiny(**kw):
    return TrainConfig.for_profile("mnist", "quick", **{**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    code = main(["train", "--out", str(run), "--train-limit", "256", "--test-limit", "200", "--val-size", "300",
                 "--batch-size", "64", "--epochs", "2", "--detector-epochs", "1", "--victim", "--quiet",
                 "--threads", "2"])
    assert code == 0
    return run


def test_run_folder_is_complete_and_verified(tiny_run, capsys):
    m = load_manifest(tiny_run)  # verifies every file hash
    assert {"weights/E.safetensors", "weights/F.safetensors", "weights/D.safetensors", "weights/C.safetensors",
            "weights/victim_only.safetensors", "metrics.json", "train_log.jsonl", "config.json",
            "scores.npz"} <= set(m["files"])
    assert m["input"]["shape"] == [1, 28, 28] and m["input"]["layout"] == "NCHW"
    assert m["input"]["normalization"]["mean"] == [0.5]
    assert m["architecture"]["unpool"] == "mask"
    for det in ("l2", "autoencoder"):
        th = m["thresholds"][det]
        assert th["default"] == "mean+zstd@z=3"
        assert {"mean+zstd@z=3", "quantile@fpr=0.01"} <= set(th["rules"])
        for rule in th["rules"].values():
            assert np.isfinite(rule["alpha"]) and 0 <= rule["test_fpr"] <= 1
    assert m["dataset"]["sizes"] == {"train": 256, "val": 300, "test": 200}
    assert m["versions"]["torch"].startswith("2.13")
    log = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in log] == [("joint", 0), ("joint", 1), ("detector", 0), ("victim", 0),
                                                       ("victim", 1)]
    assert (tiny_run / "report.md").exists() and (tiny_run / "plots" / "training.png").exists()
    assert main(["info", str(tiny_run)]) == 0
    assert "verified" in capsys.readouterr().out


def test_weights_reproduce_the_recorded_metrics(tiny_run):
    m = load_manifest(tiny_run)
    net = build_dafar("mnist").eval()
    for name in "EFDC":
        load_into(getattr(net, name), tiny_run / f"weights/{name}.safetensors")
    from dafar.data import load_mnist

    test = load_mnist(None).test.sample(200, seed=0)  # the trainer's --test-limit subset
    with torch.no_grad():
        x = to_model_scale(torch.from_numpy(test.images.copy()))
        logits, recon = net(x)
        acc = (logits.argmax(1).numpy() == test.labels).mean()
        l2 = net.l2_score(x, recon).numpy()
    assert acc == pytest.approx(m["metrics"]["victim_test_acc"])
    with np.load(tiny_run / "scores.npz") as z:
        np.testing.assert_allclose(l2, z["test_l2"], rtol=1e-4, atol=1e-5)
    alpha = m["thresholds"]["l2"]["rules"]["mean+zstd@z=3"]["alpha"]
    assert np.mean(l2 > alpha) == pytest.approx(m["metrics"]["l2_test_fpr"], abs=1 / 200)


def test_tampered_weights_are_refused(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    p = run / "weights" / "D.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-5] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert main(["info", str(run)]) == 4
    assert "D.safetensors" in capsys.readouterr().err


def test_finished_run_is_not_overwritten(tiny_run, capsys):
    before = sha256_file(tiny_run / "manifest.json")
    assert main(["train", "--out", str(tiny_run), "--train-limit", "256", "--quiet"]) == 4
    assert "already holds a finished run" in capsys.readouterr().err
    assert sha256_file(tiny_run / "manifest.json") == before


def test_overwrite_never_deletes_a_foreign_folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(RunFolderError, match="not a dafar run folder"):
        train(_tiny(), d, overwrite=True, quiet=True)
    assert (d / "holiday.jpg").read_bytes() == b"precious"


class _FailAfter:
    """Wraps the L2 helper the training loop calls; fails at the n-th call."""

    def __init__(self, n, exc=None, nan=False):
        self.n, self.calls, self.exc, self.nan = n, 0, exc, nan
        self.real = trainer_mod.l2_per_sample

    def __call__(self, t):
        self.calls += 1
        out = self.real(t)
        if self.calls >= self.n:
            if self.exc is not None:
                raise self.exc
            if self.nan:
                return out * float("nan")
        return out


def _state(run):
    return {name: sha256_file(run / f"weights/{name}.safetensors") for name in "EFDC"}


def test_resume_after_interrupt_gives_identical_weights(tmp_path, monkeypatch):
    cfg = _tiny(epochs=2)
    ref = train(cfg, tmp_path / "ref", quiet=True)
    # 256 images / 64 per batch = 4 joint steps per epoch (+1 val call per epoch): die in epoch 2
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", quiet=True)
    monkeypatch.undo()
    assert json.loads((tmp_path / "b/checkpoints/joint.json").read_text())["info"]["epochs_done"] == 1
    with pytest.raises(RunFolderError, match="--resume"):
        train(cfg, tmp_path / "b", quiet=True)
    res = train(cfg, tmp_path / "b", resume=True, quiet=True)
    assert _state(tmp_path / "ref") == _state(tmp_path / "b")
    assert res.metrics["victim_test_acc"] == ref.metrics["victim_test_acc"]
    assert res.manifest["training"]["resumed"] is True


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = _tiny(epochs=2)
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, nan=True))
    with pytest.raises(NonFiniteLossError, match="joint epoch 2"):
        train(cfg, tmp_path / "r", quiet=True)
    ck = tmp_path / "r" / "checkpoints"
    meta = json.loads((ck / "joint.json").read_text())
    assert meta["info"]["epochs_done"] == 1
    assert sha256_file(ck / "joint.safetensors") == meta["tensors_sha256"]
    assert not (tmp_path / "r" / "manifest.json").exists()


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.05, 5e-4), ("adamw", 2e-3, 0.05)])
def test_each_optimizer_trains_resumes_identically_and_is_recorded(tmp_path, monkeypatch, optimizer, lr, wd):
    cfg = _tiny(epochs=2, optimizer=optimizer, lr=lr, weight_decay=wd)
    ref = train(cfg, tmp_path / "ref", quiet=True)
    assert ref.manifest["training"]["config"]["optimizer"] == optimizer
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ref/train_log.jsonl").read_text().splitlines()
              if json.loads(line).get("phase") == "joint"]
    assert len(losses) == 2 and losses[1] < losses[0]  # it learns (8 steps: too few for accuracy to show)
    train(cfg.replace(optimizer="adam", lr=2e-3, weight_decay=0.0), tmp_path / "adam", quiet=True)  # the default
    assert _state(tmp_path / "adam")["E"] != _state(tmp_path / "ref")["E"]  # the option changes the training
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", quiet=True)
    monkeypatch.undo()
    from dafar.errors import TrainingError

    with pytest.raises(TrainingError, match="differ"):  # momentum buffers of another optimizer do not resume
        train(cfg.replace(optimizer="adam"), tmp_path / "b", resume=True, quiet=True)
    train(cfg, tmp_path / "b", resume=True, quiet=True)
    assert _state(tmp_path / "ref") == _state(tmp_path / "b")


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch):
    cfg = _tiny(epochs=2)
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", quiet=True)
    monkeypatch.undo()
    from dafar.errors import TrainingError

    with pytest.raises(TrainingError, match="differ"):
        train(cfg.replace(lr=1e-2), tmp_path / "r", resume=True, quiet=True)


def test_resume_may_drop_the_victim_only_model_and_keeps_the_time(tmp_path, monkeypatch):
    # A long CPU run (CIFAR-10: 30 joint epochs over several days) may be finished without the
    # victim-only comparison: its joint and C checkpoints stay valid, the weights are those of an
    # uninterrupted run, and the recorded time counts the epochs the earlier call trained.
    cfg = _tiny(epochs=2, train_victim=True)
    train(cfg.replace(train_victim=False), tmp_path / "ref", quiet=True)
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", quiet=True)
    monkeypatch.undo()
    res = train(cfg.replace(train_victim=False), tmp_path / "b", resume=True, quiet=True)
    assert _state(tmp_path / "ref") == _state(tmp_path / "b")
    assert "victim_only_test_acc" not in res.metrics
    assert json.loads((tmp_path / "b/config.json").read_text())["train_victim"] is False
    t = res.manifest["training"]
    assert t["seconds_in_earlier_calls"]["joint"] > 0 and len(t["seconds_per_epoch"]["joint"]) == 2
    assert t["total_seconds"] >= sum(t["seconds_per_epoch"]["joint"])


def test_keep_best_with_weight_average_keeps_that_epoch_and_resumes_identically(tmp_path, monkeypatch):
    # With a validation set no larger than the monitor (300 < 2,000 images), the kept weights'
    # whole-validation accuracy must be the best logged epoch's monitor accuracy.
    cfg = _tiny(epochs=3, ema=0.9, keep_best=True, lr=5e-3, train_victim=True)
    ref = train(cfg, tmp_path / "ref", quiet=True)
    log = [json.loads(line) for line in (tmp_path / "ref/train_log.jsonl").read_text().splitlines()]
    joint = [r for r in log if r["phase"] == "joint"]
    assert all(r["val_of"] == "ema" for r in joint)
    accs = [r["val_acc"] for r in joint]
    best = int(np.argmax(accs))  # the first maximum: a later tie does not replace it
    kept = ref.manifest["training"]["kept_weights"]["joint"]
    assert kept["weights"] == "best validation epoch" and kept["best_epoch"] == best + 1 and kept["ema_decay"] == 0.9
    assert ref.metrics["victim_val_acc"] == pytest.approx(accs[best], abs=1e-9)
    assert ref.manifest["training"]["kept_weights"]["victim"]["weights"] == "best validation epoch"
    from dafar.report import write_run_report as write_report

    assert f"best validation epoch (epoch {best + 1} of 3" in write_report(tmp_path / "ref").read_text()
    # the kept weights are neither the last step's nor (unless it was best) the last average's
    st = load_file(str(tmp_path / "ref/checkpoints/joint.safetensors"))
    e = load_file(str(tmp_path / "ref/weights/E.safetensors"))
    assert any(not torch.equal(e[k], st[f"model.E.{k}"]) for k in e)
    assert all(torch.equal(e[k], st[f"best.E.{k}"]) for k in e)
    # interrupted in epoch 2 and resumed: the average and the best epoch survive the checkpoint
    monkeypatch.setattr(trainer_mod, "l2_per_sample", _FailAfter(7, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", quiet=True)
    monkeypatch.undo()
    train(cfg, tmp_path / "b", resume=True, quiet=True)
    assert _state(tmp_path / "ref") == _state(tmp_path / "b")


def test_weight_average_follows_the_ema_rule_and_is_swapped_back():
    lin = torch.nn.Linear(3, 2)
    ema = trainer_mod._Ema(lin, list(lin.parameters()), 0.5)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # decay min(0.5, 2/11): the average moves 9/11 of the way
    np.testing.assert_allclose(ema.shadow["weight"].numpy(), (w0 + 9 / 11).numpy(), rtol=1e-6)
    live = lin.weight.detach().clone()
    with ema.applied():
        assert torch.equal(lin.weight, ema.shadow["weight"])
    assert torch.equal(lin.weight, live)
    with pytest.raises(Exception, match="no weight average"):
        ema.load({}, 3)


@pytest.mark.parametrize("kw, match", [(dict(ema=1.0), "ema"), (dict(ema=0.2), "ema"), (dict(ema=True), "ema"),
                                       (dict(keep_best="yes"), "keep_best")])
def test_averaging_options_are_validated(kw, match):
    from dafar.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        _tiny(**kw)


def test_phase_checkpoints_ignore_options_the_phase_does_not_use():
    base = {"phase": "joint", "schedule": _tiny().schedule_key()}
    other = {**base["schedule"], "train_victim": True, "detector_epochs": 99}
    assert trainer_mod._same_schedule(base, {"phase": "joint", "schedule": other})
    assert not trainer_mod._same_schedule({"phase": "detector", "schedule": base["schedule"]},
                                          {"phase": "detector", "schedule": other})
    assert not trainer_mod._same_schedule(base, {"phase": "joint", "schedule": {**base["schedule"], "lr": 1.0}})
    assert not trainer_mod._same_schedule(None, base) and not trainer_mod._same_schedule({"phase": "joint"}, base)


def test_checkpoints_written_before_new_fields_still_resume():
    # The CIFAR-10 run's joint checkpoint predates dropout/init_from: it was made with their defaults.
    now = {"phase": "joint", "schedule": _tiny().schedule_key()}
    old = {"phase": "joint", "schedule": {k: v for k, v in now["schedule"].items() if k not in ("dropout", "init_from", "ema", "keep_best")}}
    assert trainer_mod._same_schedule(old, now)
    assert not trainer_mod._same_schedule(old, {"phase": "joint", "schedule": {**now["schedule"], "dropout": 0.5}})


def test_init_from_continues_a_finished_run(tiny_run, tmp_path):
    # A second schedule started from a finished run: it starts at the parent's weights (with a
    # vanishing learning rate it ends there too, unlike a fresh model), records its parent in
    # the manifest and report, and the exported graph has no dropout (eval mode).
    parent = load_manifest(tiny_run)
    cfg = _tiny(epochs=1, lr=1e-12, dropout=0.5, train_victim=True, init_from=str(tiny_run))
    res = train(cfg, tmp_path / "cont", quiet=True)
    rec = res.manifest["training"]["init_from"]
    assert rec["manifest_sha256"] == parent["manifest_sha256"] and rec["epochs_total"] == 2 and rec["same_data"]
    assert rec["total_seconds"] == pytest.approx(parent["training"]["total_seconds"])
    for name in ("E", "F", "D", "victim_only"):
        a = load_file(tiny_run / f"weights/{name}.safetensors")
        b = load_file(tmp_path / f"cont/weights/{name}.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert res.metrics["victim_test_acc"] == pytest.approx(parent["metrics"]["victim_test_acc"])
    train(_tiny(epochs=1, lr=1e-12), tmp_path / "fresh", quiet=True)
    a, b = load_file(tiny_run / "weights/E.safetensors"), load_file(tmp_path / "fresh/weights/E.safetensors")
    assert not all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    from dafar.report import write_run_report as write_report

    text = write_report(tmp_path / "cont").read_text()
    assert "3 joint epochs in all" in text and "--dropout 0.5" in text and f"--init-from {tiny_run}" in text
    from dafar.train.publish import publish

    pub = load_manifest(publish(tmp_path / "cont", "cont", "two commands", dest=tmp_path / "pub"))
    prov = pub["provenance"]
    assert prov["epochs"]["joint_in_all"] == 3 and prov["continued_from"]["manifest_sha256"] == parent["manifest_sha256"]
    assert prov["total_seconds_in_all"] > prov["total_seconds"]
    # dropout acts in training only: eval-mode outputs are deterministic
    net = build_dafar("mnist", dropout=0.5).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(net(x)[0], net(x)[0])
    assert not torch.equal(net.train()(x)[0], net(x)[0])


def test_init_from_refuses_what_cannot_start_a_run(tiny_run, tmp_path):
    from dafar.errors import ConfigError, ManifestError

    with pytest.raises(RunFolderError, match="not a finished run"):
        train(_tiny(init_from=str(tmp_path)), tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="unpool"):
        train(_tiny(init_from=str(tiny_run), unpool="maxunpool"), tmp_path / "b", quiet=True)
    no_victim = train(_tiny(epochs=1), tmp_path / "nv", quiet=True)
    with pytest.raises(ConfigError, match="--no-victim"):
        train(_tiny(init_from=str(no_victim.run_dir), train_victim=True), tmp_path / "c", quiet=True)
    with pytest.raises(ConfigError, match="dropout"):
        _tiny(dropout=1.0)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    w = bad / "weights/F.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ManifestError):
        train(_tiny(init_from=str(bad)), tmp_path / "d", quiet=True)
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before any run folder was made


def test_maxunpool_variant_trains(tmp_path):
    res = train(_tiny(unpool="maxunpool", detector=False), tmp_path / "mu", quiet=True)
    assert res.manifest["architecture"]["unpool"] == "maxunpool"
    assert "autoencoder" not in res.manifest["thresholds"]


def test_cifar10_trains_on_a_small_image_folder(tmp_path):
    from conftest import make_image_folder

    from dafar.data import CIFAR10_CLASSES

    root = make_image_folder(tmp_path / "cifar", CIFAR10_CLASSES, per_class=8)
    cfg = TrainConfig.for_profile("cifar10", "quick", train_limit=48, val_size=16, batch_size=16, epochs=1,
                                  detector_epochs=1, threads=2, train_victim=True)
    res = train(cfg, tmp_path / "c", data_dir=root, quiet=True)
    m = res.manifest
    assert m["input"]["shape"] == [3, 32, 32] and m["thresholds"]["l2"]["default"] == "mean+zstd@z=2"
    assert m["architecture"]["params"]["C"] == 3072 * 512 + 512 + 512 * 64 + 64 + 64 * 512 + 512 + 512 * 3072 + 3072
    load_manifest(tmp_path / "c")


def test_publish_float16_recalibrates_on_the_weights_as_loaded(tiny_run, tmp_path, monkeypatch):
    from dafar import pretrained
    from dafar.train.loading import load_dafar
    from dafar.train.publish import publish

    dest = publish(tiny_run, "tiny", "dafar train --train-limit 256 ...", dest=tmp_path / "pre" / "tiny",
                              weights_dtype="float16")
    src = load_manifest(tiny_run)
    m = load_manifest(dest)  # every hash verified, including the rewritten weights and scores
    assert m["provenance"]["weights_dtype"] == "float16"
    assert m["recalibrated"]["before"]["l2_alpha"] == src["metrics"]["l2_alpha"]
    w = {rel: e for rel, e in m["files"].items() if e["role"] == "weights"}
    assert w and all(e["stored_dtype"] == "float16" for e in w.values())
    for rel in w:  # half the bytes, give or take the header
        assert m["files"][rel]["bytes"] < 0.6 * src["files"][rel]["bytes"]
    # alpha moved by float16 rounding only, and was re-measured rather than copied
    a16, a32 = m["metrics"]["l2_alpha"], src["metrics"]["l2_alpha"]
    assert a16 != a32 and abs(a16 - a32) / a32 < 1e-2
    # the rest of the pipeline reads it like any run folder: weights upcast to float32 at load
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "pre")
    run = pretrained.materialize("tiny", tmp_path / "run")
    net, _ = load_dafar(run)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    # a different data set is refused: its validation split would not be the held-out one
    import dataclasses

    import dafar.train.calibrate as calibrate
    from dafar.errors import DataError

    real = calibrate.load_dataset
    monkeypatch.setattr(calibrate, "load_dataset",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), fingerprint="0" * 64))
    before = sha256_file(run / "manifest.json")
    with pytest.raises(DataError, match="not the data"):
        calibrate.recalibrate(run, reason="test", download=False)
    assert sha256_file(run / "manifest.json") == before  # nothing rewritten


def _victim_logits(run, n: int = 300) -> np.ndarray:
    """The run's victim logits F(E(x)) on the first ``n`` MNIST test images."""
    from dafar.train.loading import load_dafar
    from dafar.train.trainer import evaluate_arrays

    net, _ = load_dafar(run)
    return evaluate_arrays(net, load_dataset("mnist").test.images[:n], torch.device("cpu"), 100, purify=False)["logits"]


@pytest.mark.slow
def test_attach_trains_only_the_decoder_and_keeps_the_victim_bit_identical(exported_run, tmp_path, capsys):
    """Plug-in mode: E and F come from the victim run, frozen; D and C train; the defended model's
    victim logits are the classifier's, bit for bit."""
    from dafar.cli import main
    from dafar.train import attach

    cfg = TrainConfig.for_profile("mnist", "quick", train_limit=512, test_limit=200, val_size=200, batch_size=64,
                                  epochs=1, detector_epochs=1, threads=2)
    res = attach(exported_run, tmp_path / "att", cfg, quiet=True)
    m, src = res.manifest, load_manifest(exported_run, verify=False)
    assert m["training"]["mode"] == "plug-in"
    assert m["training"]["attached_to"]["manifest_sha256"] == src["manifest_sha256"]
    for k in ("E", "F"):  # the victim's own weights, recorded and unchanged
        assert m["files"][f"weights/{k}.safetensors"]["sha256"] == src["files"][f"weights/{k}.safetensors"]["sha256"]
        assert m["training"]["attached_to"]["weights_sha256"][k] == src["files"][f"weights/{k}.safetensors"]["sha256"]
    assert m["files"]["weights/D.safetensors"]["sha256"] != src["files"]["weights/D.safetensors"]["sha256"]
    la, lb = _victim_logits(tmp_path / "att"), _victim_logits(exported_run)
    assert np.array_equal(la, lb)
    assert {"l2", "autoencoder"} <= set(m["thresholds"]) and m["metrics"]["victim_test_acc"] == m["metrics"]["victim_test_acc"]
    # the CLI: a victim that does not exist, and one trained on other data
    assert main(["attach", "--victim", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 4
    assert "neither a finished run folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="trained on mnist, not cifar10"):
        train(TrainConfig.for_profile("cifar10", "quick", attach_to=str(exported_run)), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_attach_at_an_earlier_feedback_position_resplits_the_victim_and_exports(exported_run, tmp_path, capsys):
    """--feedback-at pool1: the victim's second conv block moves from E into F (the same tensors),
    so the classifier's logits stay bit-identical; D mirrors one block only (far fewer MACs), and
    the run exports to ONNX and TFLite with the export's own parity checks passing."""
    from dafar.export import ExportConfig, export
    from dafar.train import attach

    cfg = TrainConfig.for_profile("mnist", "quick", train_limit=512, test_limit=200, val_size=200, batch_size=64,
                                  epochs=1, detector=False, threads=2, feedback_at="pool1")
    res = attach(exported_run, tmp_path / "p1", cfg, quiet=True)
    m, src = res.manifest, load_manifest(exported_run, verify=False)
    assert m["architecture"]["feedback_at"] == "pool1" and m["training"]["config"]["feedback_at"] == "pool1"
    e1 = load_file(str(tmp_path / "p1/weights/E.safetensors"))
    e0 = load_file(str(exported_run / "weights/E.safetensors"))
    f1 = load_file(str(tmp_path / "p1/weights/F.safetensors"))
    assert set(e1) == {k for k in e0 if k.startswith("blocks.0.")}  # E keeps the first block only
    assert all(torch.equal(e0[k.replace("blocks.0.", "blocks.1.", 1)], f1[k]) for k in f1 if k.startswith("blocks.0."))
    costs, costs0 = m["architecture"]["costs"], src["architecture"]["costs"]
    assert costs["D"]["macs"] < costs0["D"]["macs"] / 2 and costs["E"]["macs"] < costs0["E"]["macs"]
    assert costs["E"]["macs"] + costs["F"]["macs"] == costs0["E"]["macs"] + costs0["F"]["macs"]
    la, lb = _victim_logits(tmp_path / "p1"), _victim_logits(exported_run)
    assert np.array_equal(la, lb)
    out = export(tmp_path / "p1", ExportConfig(validate_images=64, victim=False), log=lambda *a: None)
    assert any(k.endswith(".onnx") for k in out.entries) and any(k.endswith(".tflite") for k in out.entries)
    # a position the network does not have
    with pytest.raises(ConfigError, match="stage1"):
        TrainConfig.for_profile("imagefolder", "quick", feedback_at="pool1")
    assert main(["attach", "--victim", str(exported_run), "--feedback-at", "stage2", "--out", str(tmp_path / "z")]) == 2
    assert "pool1, pool2" in capsys.readouterr().err and not (tmp_path / "z").exists()


@pytest.mark.slow
@pytest.mark.parametrize("feedback", ["pool1", "pool2"])
def test_a_narrower_decoder_attaches_and_exports_in_both_modes(exported_run, tmp_path, feedback):
    """--decoder-width 0.5 at either feedback position: the victim stays bit-identical, D's
    parameters and MACs fall, the manifest records the width, and both graph modes export to ONNX
    and TFLite (builtin ops only) with the export's parity checks passing."""
    from dafar.export import ExportConfig, export
    from dafar.train import attach

    cfg = TrainConfig.for_profile("mnist", "quick", train_limit=512, test_limit=400, val_size=200, batch_size=64,
                                  epochs=1, detector=False, threads=2, feedback_at=feedback, decoder_width=0.5)
    res = attach(exported_run, tmp_path / "w", cfg, quiet=True)
    m, src = res.manifest, load_manifest(exported_run, verify=False)
    assert m["architecture"]["decoder_width"] == 0.5 and m["training"]["config"]["decoder_width"] == 0.5
    assert np.array_equal(_victim_logits(tmp_path / "w"), _victim_logits(exported_run))
    full_d = src["architecture"]["costs"]["D"] if feedback == "pool2" else None
    if full_d is not None:  # same position as the source: D itself is narrower
        assert m["architecture"]["costs"]["D"]["params"] < 0.55 * full_d["params"]  # (its last layer keeps C channels)
        assert m["architecture"]["costs"]["D"]["macs"] < 0.6 * full_d["macs"]
    out = export(tmp_path / "w", ExportConfig(validate_images=400, victim=False, modes=("hybrid", "detect")),
                 log=lambda *a: None)
    kinds = {(e["format"], e.get("mode")) for e in out.entries.values()}
    assert kinds == {(f, md) for f in ("onnx", "tflite") for md in ("hybrid", "detect")}
    for e in out.entries.values():  # export raises on a parity failure; what it recorded says so too
        assert e["validation"] and not any(op.startswith(("FLEX", "CUSTOM", "Flex")) for op in e["ops"])


@pytest.mark.slow
def test_attach_to_a_classifier_of_ones_own(tmp_path, capsys, monkeypatch):
    """dafar attach --victim package.module:callable --weights W: the user's module is traced into a
    stored graph of torch.nn layers, split at --feedback-at; the run loads without the user's code,
    its logits are the module's bit for bit, and it exports with the export's parity checks."""
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from dafar.export import ExportConfig, export
    from dafar.train.loading import load_dafar
    from dafar.train.trainer import evaluate_arrays

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "assets"))
    import usernet

    torch.manual_seed(0)
    model = usernet.build()
    opt = torch.optim.Adam(model.parameters(), 3e-3)  # a few real steps: a classifier, not noise
    mn = load_dataset("mnist")
    x = torch.from_numpy(mn.train.images[:4096]).float().div(255).sub(0.5).div(0.5)
    y = torch.from_numpy(mn.train.labels[:4096]).long()
    for _ in range(2):
        for i in range(0, 4096, 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i: i + 128]), y[i: i + 128]).backward()
            opt.step()
    model.eval()
    wpath = tmp_path / "usernet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wpath))
    run = tmp_path / "run"
    base = ["attach", "--victim", "usernet:build", "--weights", str(wpath), "--dataset", "mnist", "--train-limit", "512",
            "--test-limit", "200", "--val-size", "200", "--batch-size", "64", "--epochs", "1", "--detector-epochs", "1",
            "--threads", "2", "--quiet", "--out"]
    # what is missing or wrong is named, and nothing is written
    assert main([*base, str(run), "--feedback-at", "layer1"]) == 2
    assert "--mean and --std" in capsys.readouterr().err
    assert main([*base, str(run), "--mean", "0.5", "--std", "0.5", "--feedback-at", "layer9"]) == 2
    assert "layer1.conv1" in capsys.readouterr().err  # the layers it has, listed
    assert main([*base, str(run), "--mean", "0.5", "--std", "0.5", "--feedback-at", "layer2.conv1"]) == 2
    assert "skip connection" in capsys.readouterr().err
    assert not run.exists()
    assert main([*base, str(run), "--mean", "0.5", "--std", "0.5", "--feedback-at", "layer1"]) == 0
    m = load_manifest(run)
    arch = m["architecture"]
    assert arch["family"] == "custom" and arch["feedback_at"] == "layer1" and arch["feature_shape"] == [32, 14, 14]
    assert m["training"]["mode"] == "plug-in" and m["training"]["attached_to"]["weights_sha256"]["victim"] == \
        sha256_file(wpath)
    assert "usernet:build --weights" in (run / "report.md").read_text()
    # the run loads without the user's module: the graph comes from the manifest alone
    monkeypatch.delitem(sys.modules, "usernet")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not p.endswith("assets")])
    net, _ = load_dafar(run)
    xs = to_model_scale(mn.test.images[:300], net.norm)
    with torch.no_grad():  # the same input through the user's module and through the rebuilt E and F
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = xs.to(memory_format=fmt)
            assert torch.equal(net.F(net.E(xf).z), model(xf))
    got = evaluate_arrays(net, mn.test.images[:300], torch.device("cpu"), 100, purify=False)["logits"]
    with torch.no_grad():
        want = model(xs.to(memory_format=torch.channels_last)).numpy()
    assert np.array_equal(got, want)
    assert m["metrics"]["victim_test_acc"] > 0.5
    out = export(run, ExportConfig(validate_images=64, victim=False), log=lambda *a: None)
    assert any(k.endswith(".tflite") for k in out.entries)
    # a layer type that cannot be stored is refused, naming it
    assert main(["attach", "--victim", "usernet:build_custom", "--mean", "0.5", "--std", "0.5", "--feedback-at", "conv",
                 "--dataset", "mnist", "--out", str(tmp_path / "c"), "--weights", str(wpath)]) in (2, 3, 4)


def test_train_holds_the_run_folder_lock_and_overwrite_respects_another_holder(tmp_path):
    """`train --overwrite` on a folder another stage is using is refused before anything is deleted."""
    from conftest import lock_held_elsewhere

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # an interrupted run's folder
    with lock_held_elsewhere(run, "quantize"):
        with pytest.raises(RunFolderError, match="in use by dafar quantize"):
            train(TrainConfig.for_profile("mnist", "quick", train_limit=64, test_limit=64, val_size=64, epochs=1,
                                          detector=False), run, overwrite=True, quiet=True)
        assert (run / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_a_mask_free_decoder_attaches_exports_and_quantizes(exported_run, tmp_path):
    """dafar attach --unpool upsample on a victim trained with the mask: the decoder is the new
    run's own (recorded, the victim bit-identical), no op of the exported graphs compares E's
    activations (no EQUAL: the mask's ops, which XNNPACK does not run, are gone), and the detect graph
    quantizes with the mixed layout through dafar quantize's checks."""
    from dafar.export import ExportConfig, export
    from dafar.quantize.api import Checks, QuantizeConfig, quantize_run
    from dafar.train import attach

    assert load_manifest(exported_run, verify=False)["architecture"]["unpool"] == "mask"
    cfg = TrainConfig.for_profile("mnist", "quick", train_limit=2000, test_limit=400, val_size=200, batch_size=64,
                                  epochs=2, detector=False, threads=2, feedback_at="pool1", decoder_width=0.5,
                                  unpool="upsample")
    res = attach(exported_run, tmp_path / "u", cfg, quiet=True)
    m = res.manifest
    assert m["architecture"]["unpool"] == "upsample" and "no mask" in m["architecture"]["unpool_tie_rule"]
    from dafar.train.report import reproduce_command

    assert "--unpool upsample" in reproduce_command(m["training"]["config"])
    assert np.array_equal(_victim_logits(tmp_path / "u"), _victim_logits(exported_run))
    out = export(tmp_path / "u", ExportConfig(validate_images=400, victim=False, modes=("hybrid", "detect")),
                 log=lambda *a: None)
    for e in out.entries.values():
        assert e["validation"] and not {"EQUAL", "Equal"} & set(e["ops"])
    q = quantize_run(tmp_path / "u", QuantizeConfig(formats=("tflite",), contracts=("float-nchw",), detectors=("l2",),
                                                    layout="mixed", validate_images=400, calib_images=64,
                                                    compare_naive=False, attack_images=0,
                                                    checks=Checks(min_label_agreement=0.97, max_accuracy_drop=0.015)),
                     log=lambda *a: None)
    e = q["export/dafar-l2-detect-float-nchw-int8-b1.tflite"]
    assert e["layout"] == "mixed" and {"CONV_2D", "TRANSPOSE_CONV"}.isdisjoint(e["quantization"]["float_node_types"])
    assert e["validation"]["decision_agreement"] >= 0.99


def test_edge_profile_and_default_fpr_config():
    """--profile edge: the cheap defence of issue 21 as one flag on each data set; default_fpr validated."""
    from dafar.train.models import Unpool

    c = TrainConfig.for_profile("mnist", "edge")
    assert (c.feedback_at, c.decoder_width, c.unpool, c.default_fpr) == ("pool1", 0.5, Unpool.UPSAMPLE, 0.003)
    assert not c.train_victim and c.epochs == 8
    # CIFAR-10 and image folders: the published mobile recipe with D after the first stage, l2 only
    for ds in ("cifar10", "imagefolder"):
        c2 = TrainConfig.for_profile(ds, "edge")
        assert (c2.arch_name.value, c2.feedback_at, c2.decoder_width, c2.unpool) == ("mobile", "stage1", 1.0,
                                                                                     Unpool.MASK)
        assert (c2.epochs, c2.optimizer.value, c2.lr, c2.weight_decay) == (30, "adamw", 3e-3, 0.05)
        assert not c2.detector and not c2.train_victim and c2.z == 2.0
    assert TrainConfig.for_profile("cifar10", "edge").augment.value == "crop-flip"
    assert TrainConfig.for_profile("imagefolder", "edge").augment.value == "none"  # a flip can change a class
    # the position is the mobile network's: another network says which positions it has
    with pytest.raises(ConfigError, match="feedback_at must be one of pool1, pool2 for the paper-cifar10"):
        TrainConfig.for_profile("cifar10", "edge", arch="paper-cifar10")
    for bad in (0, 0.5, -0.1, True, "x"):
        with pytest.raises(ConfigError, match="default_fpr"):
            TrainConfig.for_profile("mnist", "quick", default_fpr=bad)
    # evaluation-only: a changed alpha rule does not make a checkpoint unresumable
    assert "default_fpr" not in c.schedule_key()


def test_default_fpr_makes_the_quantile_rule_the_default():
    import numpy as np

    from dafar.train.trainer import _thresholds

    rng = np.random.default_rng(0)
    val, test = {"l2": rng.random(4000)}, {"l2": rng.random(4000)}
    t = _thresholds(TrainConfig.for_profile("mnist", "quick", default_fpr=0.004), val, test, "mnist")["l2"]
    assert t["default"] == "quantile@fpr=0.004" and "mean+zstd@z=3" in t["rules"]
    assert t["rules"]["quantile@fpr=0.004"]["calib_fpr"] == pytest.approx(0.004, abs=5e-4)
    assert _thresholds(TrainConfig.for_profile("mnist", "quick"), val, test, "mnist")["l2"]["default"] == "mean+zstd@z=3"


@pytest.mark.slow
def test_the_edge_profile_pipeline_ships_detect_graphs_with_the_mixed_layout(tmp_path):
    """dafar.pipeline with an edge-profile config: the run is the cheap configuration (D at pool1,
    half width, no mask, 0.3%-FPR alpha), and the shipped files are detect graphs quantized with the
    mixed layout through quantize's checks."""
    from dafar import pipeline
    from dafar.manifest import load_manifest

    cfg = TrainConfig.for_profile("mnist", "edge", train_limit=3000, test_limit=600, val_size=500, epochs=2,
                                  detector_epochs=1, threads=2)
    res = pipeline(tmp_path / "edge", cfg, bench=False, check_images=600, quiet=True, log=lambda *a: None)
    m = load_manifest(res.run_dir)
    a = m["architecture"]
    assert (a["unpool"], a["feedback_at"], a["decoder_width"]) == ("upsample", "pool1", 0.5)
    assert m["thresholds"]["l2"]["default"] == "quantile@fpr=0.003"
    defence = {rel: e for rel, e in m["exports"].items() if e["graph"] == "dafar"}
    assert defence and all(e["mode"] == "detect" for e in defence.values())
    int8 = [e for e in defence.values() if e.get("precision") == "int8"]
    assert int8 and all(e["layout"] == "mixed" for e in int8)
