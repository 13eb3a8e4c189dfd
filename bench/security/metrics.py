"""Detection and defence metrics, numpy only, each with hand-checked tests.

Conventions: a *score* is higher for "more adversarial"; an input is rejected when its score is
above the threshold (a NaN score is always rejected, the defence fails closed).  Clean inputs are
the negatives, adversarial ones the positives.
"""
from __future__ import annotations

import numpy as np

__all__ = ["roc_curve", "roc_auc", "tpr_at_fpr", "threshold_at_fpr", "detection_rate", "hybrid_accuracy",
           "defence_success", "robust_accuracy"]


def _clean(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    return np.where(np.isnan(s), np.inf, s)  # NaN = rejected = most adversarial


def roc_curve(clean_scores, adv_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds), thresholds descending; the point (0, 0) first and (1, 1) last."""
    c, a = _clean(clean_scores), _clean(adv_scores)
    if c.size == 0 or a.size == 0:
        raise ValueError("need clean and adversarial scores")
    thr = np.unique(np.concatenate([c, a]))[::-1]
    # rejected when score > t: count with searchsorted on sorted arrays
    cs, as_ = np.sort(c), np.sort(a)
    fpr = (c.size - np.searchsorted(cs, thr, side="right")) / c.size
    tpr = (a.size - np.searchsorted(as_, thr, side="right")) / a.size
    # score >= highest value: reject everything above thr[0] -> start at (0, 0); also end at (1, 1)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    tpr = np.concatenate([[0.0], tpr, [1.0]])
    thr = np.concatenate([[np.inf], thr, [-np.inf]])
    return fpr, tpr, thr


def roc_auc(clean_scores, adv_scores) -> float:
    """Area under the ROC curve = P(adv score > clean score) + 0.5 P(tie) (Mann-Whitney U)."""
    c, a = _clean(clean_scores), _clean(adv_scores)
    allv = np.concatenate([c, a])
    order = np.argsort(allv, kind="mergesort")
    _, start, counts = np.unique(allv[order], return_index=True, return_counts=True)
    ranks = np.empty(allv.size, dtype=np.float64)
    ranks[order] = np.repeat(start + (counts + 1) / 2.0, counts)  # average rank of each tie group
    rank_sum = ranks[c.size:].sum()
    return float((rank_sum - a.size * (a.size + 1) / 2.0) / (a.size * c.size))


def threshold_at_fpr(clean_scores, fpr: float) -> float:
    """The smallest threshold whose false-positive rate on ``clean_scores`` is <= ``fpr``."""
    c = np.sort(_clean(clean_scores))
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
    k = int(np.floor(fpr * c.size + 1e-9))  # clean scores allowed above the threshold
    return float(c[c.size - k - 1])


def tpr_at_fpr(clean_scores, adv_scores, fpr: float) -> tuple[float, float, float]:
    """(detection rate, actual FPR, threshold) with the threshold set on the clean scores for ``fpr``."""
    t = threshold_at_fpr(clean_scores, fpr)
    return detection_rate(adv_scores, t), detection_rate(clean_scores, t), t


def detection_rate(scores, threshold: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(~(s <= threshold)))


def defence_success(rejected, labels_pred, labels_true) -> float:
    """Fraction of (adversarial) inputs that are rejected or classified correctly."""
    rej = np.asarray(rejected, bool)
    return float(np.mean(rej | (np.asarray(labels_pred) == np.asarray(labels_true))))


def robust_accuracy(rejected, labels_pred, labels_true) -> float:
    """Fraction of inputs that are accepted and classified correctly."""
    rej = np.asarray(rejected, bool)
    return float(np.mean(~rej & (np.asarray(labels_pred) == np.asarray(labels_true))))


def hybrid_accuracy(clean_rejected, clean_pred, clean_true, adv_rejected, adv_pred, adv_true) -> float:
    """The paper's Fig. 10 on a 1:1 mix: a clean image counts when accepted and correct; an
    adversarial one when rejected or correct (a rejected clean image is an error)."""
    n_c, n_a = len(clean_true), len(adv_true)
    if n_c != n_a:
        raise ValueError(f"a 1:1 mix needs as many clean as adversarial images ({n_c} != {n_a})")
    good = robust_accuracy(clean_rejected, clean_pred, clean_true) * n_c
    good += defence_success(adv_rejected, adv_pred, adv_true) * n_a
    return float(good / (n_c + n_a))
