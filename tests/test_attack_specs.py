"""The evaluation's default attack settings and their translation into ART attacks (fast: no attack runs)."""
import pytest

from dafar.bench.security.evaluate import default_attacks
from dafar.train.attacks import Attack, _make, spec_from_string


def test_default_attacks_cover_every_family_and_budget():
    for ds, n_eps in (("mnist", 8), ("cifar10", 6)):
        specs = default_attacks(ds)
        kinds = [s.attack for s in specs]
        assert kinds.count(Attack.FGSM) == kinds.count(Attack.PGD) == n_eps
        assert kinds.count(Attack.CW_L2) == 2 and kinds.count(Attack.JSMA) == 2 and kinds.count(Attack.NOISE) == 1
        assert len({s.key for s in specs}) == len(specs)  # one cache file each


def test_cifar_cw_settings_reach_art():
    pytest.importorskip("art")
    import numpy as np
    import torch
    from art.estimators.classification import PyTorchClassifier

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    clf = PyTorchClassifier(net, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 4, 4), nb_classes=10,
                            clip_values=(0.0, 1.0))
    cw = [s for s in default_attacks("cifar10") if s.attack is Attack.CW_L2]
    strong = max(cw, key=lambda s: dict(s.params)["confidence"])
    atk = _make(strong, clf, 16)
    assert (atk.confidence, atk.max_iter, atk.binary_search_steps, atk.max_halving, atk.max_doubling) == (20, 30, 3, 2, 2)
    mnist = _make(spec_from_string("cw-l2@confidence=0,max_iter=50,binary_search_steps=5"), clf, 16)
    assert (mnist.max_halving, mnist.max_doubling) == (5, 5)  # ART's defaults unless asked
    assert np.isfinite(atk.initial_const)
