"""Metric functions on hand-made inputs with known answers."""
import numpy as np
import pytest

from dafar.bench.security.metrics import (
    defence_success,
    detection_rate,
    hybrid_accuracy,
    robust_accuracy,
    roc_auc,
    roc_curve,
    threshold_at_fpr,
    tpr_at_fpr,
)


def test_roc_auc_known_values():
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 1.0
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5  # all ties
    # clean {1, 3}, adv {2, 4}: pairs (2>1 yes, 2>3 no, 4>1 yes, 4>3 yes) = 3/4
    assert roc_auc([1, 3], [2, 4]) == 0.75
    assert roc_auc([1, 2], [2, 3]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # one tie counts half
    assert roc_auc([0.0, 1.0], [np.nan, 0.5]) == pytest.approx(0.75)  # NaN = rejected = top score


def test_roc_curve_endpoints_and_monotone():
    fpr, tpr, thr = roc_curve([1, 2, 3, 4], [3, 5, 6])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # at threshold 4 (reject > 4): no clean rejected, 2 of 3 adversarial rejected
    i = list(thr).index(4)
    assert fpr[i] == 0.0 and tpr[i] == pytest.approx(2 / 3)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc([1, 2, 3, 4], [3, 5, 6]))


def test_threshold_and_tpr_at_fpr():
    clean = np.arange(100, dtype=float)  # 0..99
    t = threshold_at_fpr(clean, 0.05)
    assert t == 94.0 and detection_rate(clean, t) == 0.05
    assert threshold_at_fpr(clean, 0.0) == 99.0
    det, fpr, thr = tpr_at_fpr(clean, [50, 95, 96, 200], 0.01)
    assert thr == 98.0 and fpr == 0.01 and det == 0.25
    with pytest.raises(ValueError):
        threshold_at_fpr(clean, 1.0)


def test_success_robust_and_hybrid():
    rej = [True, False, False, False]
    pred = [0, 1, 2, 9]
    true = [5, 1, 7, 9]
    assert defence_success(rej, pred, true) == 0.75  # rejected, correct, wrong, correct
    assert robust_accuracy(rej, pred, true) == 0.5
    # clean: 2 images, one rejected (an error), one accepted correct; adversarial: one rejected, one fooled
    h = hybrid_accuracy([True, False], [1, 2], [1, 2], [True, False], [0, 3], [1, 2])
    assert h == 0.5
    with pytest.raises(ValueError, match="1:1"):
        hybrid_accuracy([True], [1], [1], [True, False], [0, 3], [1, 2])
    assert detection_rate([1.0, np.nan, 3.0], 2.0) == pytest.approx(2 / 3)
