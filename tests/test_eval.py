"""Adversarial evaluation: the ART attack wrappers and their cache, the adaptive loss, and the
whole `dafar eval` on a small run producing records and a report."""
import json

import numpy as np
import pytest

pytest.importorskip("art")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_run(exported_run, tmp_path_factory):
    import shutil

    run = tmp_path_factory.mktemp("ev") / "run"
    shutil.copytree(exported_run, run)
    return run


def test_attack_wrappers_respect_their_budgets(eval_run):
    from dafar.train.attacks import attack_sets, spec_from_string

    specs = [spec_from_string(s) for s in ("fgsm@0.1", "pgd@0.2,max_iter=5", "noise@0.3", "cw-l2@max_iter=5,binary_search_steps=2",
                                           "jsma@theta=1,gamma=0.05")]
    sets = attack_sets(eval_run, specs, n=8, log=lambda *a: None)
    for s in sets:
        assert s.x_adv.shape == s.x_clean.shape == (8, 1, 28, 28) and s.x_adv.dtype == np.float32
        assert s.x_adv.min() >= 0 and s.x_adv.max() <= 1
        if s.spec.attack.value in ("fgsm", "pgd"):
            assert s.linf.max() <= s.spec.eps + 1e-5 and s.linf.max() > 0
        if s.spec.attack.value == "jsma":  # at most gamma of the pixels change
            changed = (np.abs(s.x_adv - s.x_clean) > 1e-6).reshape(8, -1).mean(1)
            assert changed.max() <= 0.05 + 2 / 784 + 1e-9  # JSMA changes pixels in pairs
        assert 0 <= s.meta["victim_accuracy"] <= 1
    assert sets[0].meta["victim_accuracy"] < 1.0 or sets[1].meta["victim_accuracy"] < 1.0  # the attacks bite
    # the cache: same parameters give the same arrays without regenerating; the manifest lists the files
    again = attack_sets(eval_run, specs[:2], n=8, log=lambda *a: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert np.array_equal(again[0].x_adv, sets[0].x_adv)
    m = json.loads((eval_run / "manifest.json").read_text())
    assert any(k.startswith("attacks/fgsm-eps0.1") for k in m["files"])
    # the images are the ones the victim gets right
    from dafar.train.attacks import victim_classifier

    _, model, _ = victim_classifier(eval_run)
    import torch

    with torch.no_grad():
        assert (model(torch.from_numpy(sets[0].x_clean)).argmax(1).numpy() == sets[0].labels).all()


def test_adaptive_loss_gradient_reaches_the_input(eval_run):
    import torch

    from dafar.bench.security.adaptive import DafarTarget, pgd_attack
    from dafar.train.attacks import select_images
    from dafar.train.loading import load_dafar

    net, m = load_dafar(eval_run)
    alpha = m["thresholds"]["l2"]["rules"]["mean+zstd@z=3"]["alpha"]
    x, y, _ = select_images(eval_run, 6)
    grads = []
    for st in (False, True):
        t = DafarTarget(net, alpha, "l2", straight_through=st)
        xx = torch.from_numpy(x).requires_grad_(True)
        t.loss(xx, torch.from_numpy(y), 10.0).sum().backward()
        assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0
        grads.append(xx.grad.clone())
    assert not torch.allclose(grads[0], grads[1])  # BPDA changes the backward pass only
    assert not net.D.unpool.straight_through  # and is switched off again
    t = DafarTarget(net, alpha, "autoencoder")
    r = pgd_attack(t, x, y, 0.3, steps=5, restarts=1)
    assert r.x_adv.shape == x.shape and np.abs(r.x_adv - x).max() <= 0.3 + 1e-5
    ok = t.success(torch.from_numpy(r.x_adv), torch.from_numpy(y))
    assert np.array_equal(ok[r.success], np.ones(r.success.sum(), bool))  # what it reports as broken is broken


def test_eval_end_to_end_writes_records_and_report(eval_run):
    from dafar.bench.security.evaluate import EvalConfig, run_eval
    from dafar.bench.security.report import write_eval_report

    cfg = EvalConfig(images=12, slow_images=4, eps=(0.1, 0.3), clean_images=100, peer_train_images=400, peer_epochs=1,
                     adaptive_images=6, adaptive_steps=3, adaptive_restarts=1, adaptive_eps=(0.1, 1.0))
    s = run_eval(eval_run, cfg, log=lambda *a: None)
    models = {r["model"] for r in s["records"]}
    assert models == {"DAFAR (l2)", "DAFAR (autoencoder)", "MagNet", "Feature Squeezing", "Binary detector"}
    n_sets = len({r["attack"] for r in s["records"]})
    assert n_sets == 2 * 2 + 4 + 1  # FGSM and PGD at 2 eps, CW and JSMA weak/strong, noise
    recs = list((eval_run / "eval" / "records").glob("*.json"))
    assert len(recs) == len(s["records"]) + len(s["deployed"])
    for r in s["records"]:
        for k in ("detection_rate", "auc", "hybrid_accuracy", "defence_success", "robust_accuracy", "detection_at_fpr_0.01"):
            assert 0 <= r[k] <= 1, (k, r)
    assert {"noise", "fgsm", "pgd"} <= set(s["table4"])
    assert set(s["adaptive"]["methods"]) == {"DAFAR (l2)", "DAFAR (autoencoder)", "DAFAR detect (l2)", "Victim alone",
                                             "MagNet", "Feature Squeezing"}
    # APGD ran after PGD on DAFAR and the victim alone, not on the peers; the victim alone never rejects
    for name, rows in s["adaptive"]["methods"].items():
        assert ("broken_only_by_apgd_ce" in rows[0]) == (name not in ("MagNet", "Feature Squeezing")), name
    for r in s["adaptive"]["methods"]["Victim alone"]:
        assert r["defence_success"] == pytest.approx(r["robust_accuracy"])
    assert s["adaptive"]["sanity"]["DAFAR (l2)"]["eps"] == 0.1  # the largest given budget below 1
    for rows in s["adaptive"]["methods"].values():
        assert rows[-1]["attack_success"] >= rows[0]["attack_success"] - 1e-9 or rows[-1]["eps"] == 1.0
    assert s["deployed"] and {d["precision"] for d in s["deployed"]} == {"float32"}
    assert s["adaptive"]["reused_from_cache"] == 0 and (eval_run / "eval" / "peers.safetensors").is_file()

    # a rerun (an interrupted evaluation resumed) reuses the trained peers and every adaptive piece
    # whose key still matches; a damaged cache entry is recomputed, never trusted
    import dafar.bench.security.adaptive as A
    import dafar.bench.security.peers as P

    calls = []
    real_pgd = A.pgd_attack

    def counting_pgd(*a, **k):
        calls.append(a[3])
        return real_pgd(*a, **k)

    def no_training(*a, **k):
        raise AssertionError("peers retrained although cached")

    cache = eval_run / "eval" / "adaptive"
    damaged = cache / "DAFAR_l2_eps_1.json"
    assert damaged.is_file(), sorted(p.name for p in cache.iterdir())
    damaged.write_text("{not json")
    mp = pytest.MonkeyPatch()
    mp.setattr(A, "pgd_attack", counting_pgd)
    mp.setattr(P, "train_peers", no_training)
    try:
        s2 = run_eval(eval_run, cfg, log=lambda *a: None)
    finally:
        mp.undo()
    assert calls and set(calls) == {1.0}  # only the damaged row (exact gradient, then BPDA) ran again
    n_pieces = sum(len(r) for r in s["adaptive"]["methods"].values()) + len(s["adaptive"]["sanity"]) + 1
    assert s2["adaptive"]["reused_from_cache"] == n_pieces - 1
    for key in ("methods", "sanity", "cw_l2"):
        a, b = s["adaptive"][key], s2["adaptive"][key]
        if key == "methods":  # seconds differ for the recomputed row only
            a = {m: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for m, rows in a.items()}
            b = {m: [{k: v for k, v in r.items() if k != "seconds"} for r in rows] for m, rows in b.items()}
        assert a == b, key
    assert [r["detection_rate"] for r in s2["records"]] == [r["detection_rate"] for r in s["records"]]

    text = write_eval_report(eval_run).read_text()
    for part in ("## Detection (gray-box)", "Table 4", "White-box adaptive", "Sanity checks", "MagNet"):
        assert part in text
    for fig in ("eval_fig7_detection_vs_eps", "eval_fig9_purification", "eval_fig10_hybrid", "eval_roc", "eval_fig4_images"):
        assert (eval_run / "plots" / f"{fig}.png").is_file(), fig
