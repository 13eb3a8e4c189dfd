import pytest

from dafar.errors import ConfigError
from dafar.train.config import Profile, TrainConfig
from dafar.train.models import Unpool


def test_profiles():
    q = TrainConfig.for_profile("mnist", "quick")
    p = TrainConfig.for_profile("mnist", "paper")
    assert q.profile is Profile.QUICK and not q.train_victim and q.z == 3.0
    assert p.train_victim and p.epochs > q.epochs
    c = TrainConfig.for_profile("cifar10", "paper")
    assert c.z == 2.0 and c.augment.value == "crop-flip"
    assert TrainConfig.for_profile("mnist", "quick", epochs=4, unpool="maxunpool").unpool is Unpool.MAXUNPOOL


@pytest.mark.parametrize("kw,msg", [
    (dict(epochs=0), "epochs"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(z=-1.0), "z must be"),
    (dict(target_fprs=(0.0,)), "target_fprs"),
    (dict(unpool="bilinear"), "unpool"),
    (dict(dataset="imagenet"), "dataset"),
    (dict(device="tpu"), "device"),
    (dict(train_limit=1), "train_limit"),
    (dict(train_limit=100, batch_size=128), "exceeds train_limit"),
    (dict(augment="crop-flip"), "flipping digits"),
    (dict(recon_weight=0.0), "recon_weight"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(init_from=""), "init_from"),
    (dict(init_from=3), "init_from"),
    (dict(cutout=-1), "cutout"),
    (dict(cutout=28), "cutout"),
    (dict(cutout=True), "cutout"),
    (dict(cutout=4.0), "cutout"),
    (dict(optimizer="rmsprop"), "optimizer='rmsprop' is not one of: adam, adamw, sgd"),
])
def test_validation(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


def test_cli_training_options_reach_the_config():
    from dafar.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--dataset", "cifar10", "--profile", "paper", "--out", "r",
                                      "--dropout", "0.5", "--weight-decay", "5e-4", "--init-from", "runs/c", "--lr", "1e-3"])
    cfg = _train_config(args)
    assert (cfg.dropout, cfg.weight_decay, cfg.init_from, cfg.lr, cfg.epochs) == (0.5, 5e-4, "runs/c", 1e-3, 30)
    assert "dropout" in cfg.schedule_key() and "init_from" in cfg.schedule_key()


def test_optimizer_option_reaches_the_config_and_the_resume_key():
    from dafar.cli import _train_config, build_parser
    from dafar.train.config import Optimizer

    args = build_parser().parse_args(["train", "--out", "r", "--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "5e-4"])
    cfg = _train_config(args)
    assert cfg.optimizer is Optimizer.SGD and cfg.schedule_key()["optimizer"] == "sgd"
    assert TrainConfig(optimizer="adamw").optimizer is Optimizer.ADAMW
    assert TrainConfig().optimizer is Optimizer.ADAM  # every published result was trained with Adam


def test_unknown_override():
    with pytest.raises(ConfigError, match="unknown training options: colour"):
        TrainConfig.for_profile("mnist", "quick", colour="red")


def test_frozen_and_round_trip():
    cfg = TrainConfig.for_profile("mnist", "paper", seed=5)
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_attack_budgets_read_as_the_data_set_writes_them():
    # CIFAR-10 budgets are k/255; a report that printed "pgd-eps0.0313725" would hide which one
    from dafar.train.attacks import attack_label, eps_label, spec_from_string

    assert eps_label(8 / 255) == "8/255" and eps_label(1.0) == "1" and eps_label(0.2) == "0.2"
    assert attack_label(spec_from_string(f"pgd@{16 / 255!r},max_iter=20").key) == "pgd-eps16/255-max_iter20"
    assert attack_label(spec_from_string("fgsm@0.3").key) == "fgsm-eps0.3"
    assert attack_label("cw-l2-confidence20") == "cw-l2-confidence20"


def test_quantize_compares_detection_at_each_data_sets_budgets():
    from dafar.quantize.api import default_attack_specs

    assert {s.eps for s in default_attack_specs("mnist")} == {0.1, 0.2, 0.3}
    c = default_attack_specs("cifar10")
    assert {s.attack.value for s in c} == {"fgsm", "pgd"}
    assert max(s.eps for s in c) == pytest.approx(16 / 255) and min(s.eps for s in c) == pytest.approx(2 / 255)
