import numpy as np
import pytest

from dafar.errors import ConfigError, InputValidationError
from dafar.threshold import Threshold, ThresholdRule, calibrate, false_positive_rate, rejects


def test_mean_zstd_by_hand():
    s = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    th = calibrate(s, "mean+zstd", z=3)
    assert th.alpha == pytest.approx(3.0 + 3 * np.std(s, ddof=1))
    assert th.rule is ThresholdRule.MEAN_ZSTD and th.z == 3 and th.target_fpr is None
    assert th.calib_fpr == 0.0 and th.n == 5


def test_quantile_holds_its_target_on_the_calibration_set():
    rng = np.random.default_rng(0)
    s = rng.gamma(2.0, 1.0, 10000)  # right-skewed like reconstruction errors
    for target in (0.003, 0.01, 0.05):
        th = calibrate(s, ThresholdRule.QUANTILE, target_fpr=target)
        assert th.calib_fpr <= target
        assert th.calib_fpr > target - 2 / len(s)  # and not far below it
        assert th.alpha in s  # an observed score


def test_quantile_exact_small_case():
    s = np.arange(1.0, 101.0)  # 1..100
    th = calibrate(s, "quantile", target_fpr=0.05)
    assert th.alpha == 95.0 and false_positive_rate(s, th.alpha) == 0.05


def test_mean_zstd_on_skewed_scores_exceeds_its_nominal_rate():
    # the reason the real FPR is measured, never assumed from z
    s = np.random.default_rng(1).lognormal(0, 0.8, 50000)
    th = calibrate(s, "mean+zstd", z=3)
    assert th.calib_fpr > 0.0027


def test_non_finite_scores_fail_closed():
    assert rejects(np.array([0.1, np.nan, np.inf, -np.inf, 5.0]), 1.0).tolist() == [False, True, True, False, True]
    assert false_positive_rate([np.nan, 0.0], 1.0) == 0.5


def test_bad_calibration_input():
    with pytest.raises(InputValidationError, match="not finite"):
        calibrate([1.0, np.nan, 2.0], "mean+zstd", z=3)
    with pytest.raises(InputValidationError, match="at least 2"):
        calibrate([1.0], "mean+zstd", z=3)
    with pytest.raises(InputValidationError, match="1-D"):
        calibrate(np.ones((3, 3)), "mean+zstd", z=3)
    with pytest.raises(ConfigError, match="z > 0"):
        calibrate([1.0, 2.0], "mean+zstd")
    with pytest.raises(ConfigError, match="target_fpr"):
        calibrate([1.0, 2.0], "quantile", target_fpr=1.5)
    with pytest.raises(ConfigError, match="unknown threshold rule"):
        calibrate([1.0, 2.0], "median")


def test_round_trip_dict():
    th = calibrate([1.0, 2.0, 3.0], "quantile", target_fpr=0.5)
    assert Threshold.from_dict(th.to_dict()) == th
