"""Detection thresholds (alpha) calibrated on clean held-out scores.

Two rules:

* ``mean+zstd``: ``alpha = mean + z * std`` of the clean validation scores.  The paper writes
  ``mean + z * sigma / n`` (Eq. 9) and calls the result the right edge of the 99.7 % (z = 3,
  MNIST) or 95 % (z = 2, CIFAR-10) interval; ``sigma / n`` is read as a typo for ``sigma``, since
  only ``sigma`` gives that interval.  The rule assumes normal scores; reconstruction errors are
  right-skewed, so its real false-positive rate is measured and recorded, never assumed.
* ``quantile``: the smallest score with at most ``target_fpr`` of the calibration scores above
  it, so the calibration false-positive rate is <= ``target_fpr`` by construction.

Scores that are not finite are treated as rejections everywhere (the defence fails closed).
numpy only: the runtime and the quantizer recalibrate with it too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import numpy as np

from dafar.errors import ConfigError, InputValidationError

__all__ = ["ThresholdRule", "Threshold", "calibrate", "false_positive_rate", "rejects"]


class ThresholdRule(str, Enum):
    MEAN_ZSTD = "mean+zstd"
    QUANTILE = "quantile"


@dataclass(frozen=True)
class Threshold:
    """A calibrated alpha and how it was obtained."""

    rule: ThresholdRule
    alpha: float
    n: int  # calibration scores used
    mean: float
    std: float
    calib_fpr: float  # fraction of calibration scores above alpha
    z: float | None = None
    target_fpr: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rule"] = self.rule.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Threshold":
        return cls(**{**d, "rule": ThresholdRule(d["rule"])})


def _scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise InputValidationError(f"scores must be a 1-D array, got shape {s.shape}")
    if s.size < 2:
        raise InputValidationError(f"need at least 2 calibration scores, got {s.size}")
    if not np.all(np.isfinite(s)):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise InputValidationError(
            f"{bad} of {s.size} calibration scores are not finite; clean calibration data must score finitely"
        )
    return s


def rejects(scores, alpha: float) -> np.ndarray:
    """Boolean reject decision ``score > alpha``; a non-finite score is always rejected."""
    s = np.asarray(scores, dtype=np.float64)
    return ~(s <= alpha)  # NaN compares False, so it lands on the reject side


def false_positive_rate(clean_scores, alpha: float) -> float:
    """Fraction of clean scores rejected at ``alpha``."""
    s = np.asarray(clean_scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise InputValidationError("no scores to measure a false-positive rate on")
    return float(np.mean(rejects(s, alpha)))


def calibrate(scores, rule: ThresholdRule | str, *, z: float | None = None,
              target_fpr: float | None = None) -> Threshold:
    """Calibrate alpha on clean scores with ``rule`` (``z`` or ``target_fpr`` as the rule needs)."""
    try:
        rule = ThresholdRule(rule)
    except ValueError:
        raise ConfigError(f"unknown threshold rule {rule!r}; choose one of: {', '.join(r.value for r in ThresholdRule)}") from None
    s = _scores(scores)
    mean, std = float(s.mean()), float(s.std(ddof=1))
    if rule is ThresholdRule.MEAN_ZSTD:
        if z is None or not np.isfinite(z) or z <= 0:
            raise ConfigError(f"the mean+zstd rule needs z > 0, got {z!r}")
        alpha = mean + float(z) * std
        target_fpr = None
    else:
        if target_fpr is None or not 0.0 < target_fpr < 1.0:
            raise ConfigError(f"the quantile rule needs 0 < target_fpr < 1, got {target_fpr!r}")
        # The (n - k)-th smallest score with k = floor(target * n): exactly the smallest observed
        # score with at most k (= target_fpr of the scores) strictly above it.
        k = int(np.floor(float(target_fpr) * s.size + 1e-9))
        alpha = float(np.sort(s)[s.size - k - 1]) if k < s.size else float(s.min())
        z = None
    return Threshold(rule, float(alpha), int(s.size), mean, std, false_positive_rate(s, alpha), z, target_fpr)
