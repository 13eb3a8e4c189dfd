"""Adversarial training (train/adversarial.py, the trainer's guard) and the attacks the robust
evaluation adds (Auto-PGD, the victim-alone and detect-mode targets)."""
import json

import numpy as np
import pytest
import torch

from dafar.errors import ConfigError
from dafar.train.adversarial import perturb, robust_accuracy
from dafar.train.config import AdvMode, TrainConfig
from dafar.train.models import Normalize


def _toy(seed=0, c=1):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * 8 * 8, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x01 = torch.rand((16, c, 8, 8), generator=g)
    y = net(x01).argmax(1)  # labels it gets right on the clean images
    return net, x01, y


@pytest.mark.parametrize("mean,std", [([0.5], [0.5]), ([0.13], [0.31])])
def test_perturb_stays_in_the_pixel_budget_and_range(mean, std):
    net, x01, y = _toy()
    norm = Normalize(mean, std)
    model = torch.nn.Sequential(net)  # logits of model-scale input: undo the norm inside
    classify = lambda xm: model((xm - norm.shift) / norm.scale)  # noqa: E731
    xm = norm(x01)
    for steps, size in ((1, 0.125), (10, 0.025)):
        xa = perturb(classify, xm, y, norm, 0.1, steps, size, torch.Generator().manual_seed(1))
        back = (xa - norm.shift) / norm.scale  # pixels in [0, 1]
        assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
        assert (back - x01).abs().max() <= 0.1 + 1e-5
        assert not xa.requires_grad
        # it attacks: the loss rises over the clean images
        ce = torch.nn.functional.cross_entropy
        assert ce(classify(xa), y) > ce(classify(xm), y)
    # no parameter gradients are left behind
    assert all(p.grad is None for p in net.parameters())
    acc = robust_accuracy(classify, xm, y, norm, 0.5, steps=10, gen=torch.Generator().manual_seed(0))
    assert 0 <= acc < 1  # a random linear model falls to a large budget


def test_adversarial_config_defaults_and_errors():
    a = TrainConfig(adversarial="fast").adv_settings()
    assert (a.mode, a.eps, a.steps, a.step_size) == (AdvMode.FAST, 0.3, 1, pytest.approx(0.375))
    a = TrainConfig(dataset="cifar10", adversarial="pgd").adv_settings()
    assert (a.eps, a.steps, a.step_size) == (pytest.approx(8 / 255), 7, pytest.approx(2.5 * 8 / 255 / 7))
    assert TrainConfig().adv_settings() is None
    for bad, msg in ((dict(adversarial="fgsm"), "adversarial"),
                     (dict(adv_eps=0.3), "apply to adversarial training"),
                     (dict(adversarial="fast", adv_steps=5), "pgd"),
                     (dict(adversarial="pgd", adv_eps=3.0), "adv_eps"),
                     (dict(adversarial="pgd", adv_steps=0), "adv_steps"),
                     (dict(adversarial="pgd", adv_guard=1.5), "adv_guard"),
                     (dict(adversarial="pgd", keep_best=True), "keep_best"),
                     (dict(adversarial="fast", attach_to="mnist"), "plug-in")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**bad)


def test_cli_budget_spelling():
    from dafar.options import to_argv

    cfg = TrainConfig(dataset="cifar10", adversarial="pgd", adv_eps=8 / 255, adv_steps=10)
    argv = to_argv(cfg)
    assert "--adversarial" in argv and "8/255" in argv and "--adv-steps" in argv


def test_guard_stops_and_keeps_the_best_epoch(tmp_path):
    """Wong et al.'s guard: a fall of the monitored PGD accuracy by more than the guard stops the
    phase, keeps the best epoch's weights, and a resumed run does not train past it."""
    from dafar.train.trainer import _fit, _load_model_only, _Logger

    cfg = TrainConfig(adversarial="fast", epochs=6, batch_size=4, train_limit=8)
    model = torch.nn.Linear(2, 2)
    seen = []

    def step(idx, gen):
        return model(torch.ones(len(idx), 2)).pow(2).mean(), {}

    # 0.8 -> 0.65 -> 0.55: a slow slide (kept going: the best epoch is kept anyway); 0.55 -> 0.3: stop
    monitor = iter([0.5, 0.8, 0.65, 0.55, 0.3, 0.9])

    def validate():
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_acc": 0.9, "val_robust_acc": next(monitor)}

    ck = tmp_path / "ck" / "joint"
    ck.parent.mkdir()
    log = _Logger(tmp_path / "log.jsonl", quiet=True)
    secs = _fit("joint", model, list(model.parameters()), 8, 6, 1e-2, cfg, step, validate, ck, log, False, True,
                keep_best=True, best_key="val_robust_acc", guard=0.2)
    assert len(secs) == 5  # 0.3 < 0.55 - 0.2 after epoch 5: stopped
    info = _load_model_only(ck, model)
    assert info["stopped_after"] == 5 and info["best_epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k])  # epoch 2's weights
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "stopped" in recs[-1] and "guard" in recs[-1]["stopped"]
    # resuming trains nothing more
    again = _fit("joint", model, list(model.parameters()), 8, 6, 1e-2, cfg, step,
                 lambda: (_ for _ in ()).throw(AssertionError("trained past the guard")), ck, log, True, True,
                 keep_best=True, best_key="val_robust_acc", guard=0.2)
    assert len(again) == 5


# ---------------------------------------------------------------- attacks of the robust evaluation
class _LinearTarget:
    """A linear classifier with a fake detector that rejects images whose mean pixel exceeds t."""

    def __init__(self, reject_above=None):
        self.net, self.x, self.y = _toy(3)
        self.t = reject_above

    def _parts(self, x):
        return self.net(x), x.mean(dim=(1, 2, 3))

    def loss(self, x, y, c=10.0, kind="margin"):
        from dafar.bench.security.adaptive import _classifier_term

        logits, s = self._parts(x)
        pen = torch.relu(s - 0.98 * self.t) if self.t is not None else torch.zeros(len(x))
        return _classifier_term(logits, y, kind) - c * pen

    def success(self, x, y):
        with torch.no_grad():
            logits, s = self._parts(x)
        ok = logits.argmax(1) != y
        if self.t is not None:
            ok &= s <= self.t
        return ok.numpy()


def test_apgd_checkpoints_follow_croce_and_hein():
    from dafar.bench.security.adaptive import _apgd_checkpoints

    assert _apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("kind", ["ce", "dlr"])
def test_apgd_respects_the_budget_and_reports_true_successes(kind):
    from dafar.bench.security.adaptive import apgd_attack, pgd_attack

    t = _LinearTarget()
    x, y = t.x.numpy(), t.y.numpy()
    r = apgd_attack(t, x, y, 0.05, steps=30, loss=kind, seed=0, batch=7)
    assert r.x_adv.shape == x.shape and np.abs(r.x_adv - x).max() <= 0.05 + 1e-6
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    ok = t.success(torch.from_numpy(r.x_adv), torch.from_numpy(y))
    assert np.array_equal(ok, r.success)  # broken means broken, and standing means standing
    # at least as strong as PGD with the same steps on a linear model (both find the vertex)
    p = pgd_attack(t, x, y, 0.05, steps=30, restarts=1)
    assert r.success.sum() >= p.success.sum() - 1
    big = apgd_attack(t, x, y, 1.0, steps=30, loss=kind)
    assert big.success.all()  # an unbounded budget breaks every image


def test_apgd_honours_the_detector_term():
    """Against a detector that rejects bright images the attack must stay dark: every success it
    reports is accepted by the detector."""
    from dafar.bench.security.adaptive import apgd_attack

    t = _LinearTarget()
    t.t = float(t.x.mean(dim=(1, 2, 3)).max()) + 0.01
    x, y = t.x.numpy(), t.y.numpy()
    r = apgd_attack(t, x, y, 0.3, steps=40, loss="ce")
    assert r.success.any()
    assert (r.x_adv[r.success].mean(axis=(1, 2, 3)) <= t.t + 1e-6).all()


@pytest.mark.slow
def test_victim_and_detect_targets_on_a_run(exported_run):
    from dafar.bench.security.adaptive import DafarTarget, VictimTarget, apgd_attack
    from dafar.train.attacks import select_images
    from dafar.train.loading import load_dafar

    net, m = load_dafar(exported_run)
    alpha = m["thresholds"]["l2"]["rules"][m["thresholds"]["l2"]["default"]]["alpha"]
    x, y, _ = select_images(exported_run, 8)
    v = VictimTarget(net)
    rej, lab = v.decide(torch.from_numpy(x))
    assert not rej.any() and (lab == y).all()  # select_images picks images the victim gets right
    d = DafarTarget(net, alpha, "l2", mode="detect")
    with torch.no_grad():
        logits, score = d.outputs(torch.from_numpy(x))
        assert torch.equal(logits.argmax(1), v.logits(torch.from_numpy(x)).argmax(1))
    h = DafarTarget(net, alpha, "l2")
    assert d.identity() != h.identity()  # cached separately
    for tgt in (v, d):
        r = apgd_attack(tgt, x, y, 0.3, steps=10, loss="dlr")
        assert np.array_equal(tgt.success(torch.from_numpy(r.x_adv), torch.from_numpy(y)), r.success)
    with pytest.raises(ValueError):
        DafarTarget(net, alpha, "l2", mode="purify")


def test_eval_config_graybox_and_image_counts():
    from dafar.bench.security.evaluate import EvalConfig

    assert EvalConfig(graybox="fgsm,pgd").graybox == ("fgsm", "pgd")
    assert EvalConfig().graybox == ("fgsm", "pgd", "cw-l2", "jsma", "noise")
    with pytest.raises(ConfigError, match="pgd"):
        EvalConfig(graybox="fgsm")
    with pytest.raises(ConfigError, match="unknown attack family deepfool"):
        EvalConfig(graybox="pgd,deepfool")
    with pytest.raises(ConfigError, match="adaptive_images"):
        EvalConfig(images=300, adaptive_images=500)  # silently fewer images before
    EvalConfig(images=50, adaptive=False)  # without the adaptive attack its image count does not matter


def test_a_decoder_without_unpool_mask_is_attacked_without_bpda():
    """The mobile decoder upsamples without a mask: a straight-through target computes exactly what
    the plain one does (nothing to bypass) instead of failing, and gradients reach the image."""
    from dafar.bench.security.adaptive import DafarTarget
    from dafar.train.models import build_dafar, paper_spec

    torch.manual_seed(0)
    net = build_dafar(paper_spec("mobile", (3, 32, 32), 10, "linear", 0.5)).eval()
    assert not hasattr(net.D, "unpool")
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    plain, st = DafarTarget(net, 5.0, "l2"), DafarTarget(net, 5.0, "l2", straight_through=True)
    with torch.no_grad():
        (a, sa), (b, sb) = plain.outputs(x), st.outputs(x)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    loss, _ = plain.loss_and_success(x, y, 10.0)
    loss.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
