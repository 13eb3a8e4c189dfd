"""Compare an exported model's outputs with the source model's (after optimum's
``validate_model_outputs``): names and shapes first, then decisions, then continuous values.

Float exports must reproduce the torch graph: labels and reject decisions agree on at least
``min_agreement`` of the inputs (a few can flip where a score sits within float noise of alpha
or two logits tie), the score's median relative error stays under ``score_rtol_median``, and
the victim logits stay within ``logits_atol`` everywhere (absolute for logits up to 1 in
magnitude, relative to an image's largest logit above that: float32 rounding scales with it).

Per image, the score's relative error must stay under ``score_rtol_max`` and the purified
logits within ``logits_atol``, except on at most ``max_outlier_fraction`` of the images.  Why an
allowance: the decoder's unpooling is a discontinuous function of the encoder's activations
(which window position holds the maximum); where two positions of a window differ by float
noise, two correct float32 implementations can pick differently and rebuild that spot
differently.  Measured on the MNIST model: torch itself gives a score 0.2% apart for the same
image at batch 1 and batch 500, on 3 of 10,000 test images; ONNX Runtime and LiteRT (XNNPACK)
differ from torch on 0.05-0.1% of images.  The number of such images and the largest error are
reported, never hidden; a real export bug moves far more than the 0.5% allowance.
Failures raise typed errors that say which output, by how much, and on how many inputs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dafar.errors import DecisionMismatchError, OutputShapeError, ToleranceError

__all__ = ["Tolerance", "validate_model_outputs"]


@dataclass(frozen=True)
class Tolerance:
    min_agreement: float = 0.9995  # labels and reject decisions
    score_rtol_median: float = 1e-4
    score_rtol_max: float = 1e-3  # per image, outside the outlier allowance
    logits_atol: float = 1e-3  # times max(1, the image's largest |logit|)
    max_outlier_fraction: float = 0.005  # images allowed past score_rtol_max (unpool near-ties)

    def to_dict(self) -> dict:
        return asdict(self)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a), 1e-6)


def validate_model_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], tol: Tolerance,
                    what: str) -> dict:
    """Check ``candidate`` against ``reference`` (same output names); returns the measured report."""
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise OutputShapeError(f"{what}: outputs {missing} are missing (has {sorted(candidate)})")
    report: dict = {"images": int(len(next(iter(reference.values()))))}
    for name, ref in reference.items():
        got = np.asarray(candidate[name])
        if got.shape != ref.shape:
            raise OutputShapeError(f"{what}: output '{name}' has shape {got.shape}, expected {ref.shape}")
    for name in ("label", "rejected"):
        if name in reference:
            agree = float(np.mean(np.asarray(candidate[name]).astype(np.int64) == reference[name].astype(np.int64)))
            report[f"{name}_agreement"] = agree
            if agree < tol.min_agreement:
                n_bad = int(round((1 - agree) * report["images"]))
                raise DecisionMismatchError(
                    f"{what}: '{name}' agrees with torch on {100 * agree:.3f}% of {report['images']} images "
                    f"({n_bad} differ); required >= {100 * tol.min_agreement:.2f}%"
                )
    n = report["images"]
    outlier = np.zeros(n, dtype=bool)
    if "score" in reference:
        ref, got = reference["score"], np.asarray(candidate["score"])
        finite = np.isfinite(ref)
        if not np.array_equal(finite, np.isfinite(got)):
            raise ToleranceError(f"{what}: 'score' is non-finite on different inputs than torch's")
        rel = np.zeros(n)
        rel[finite] = _rel(ref[finite], got[finite])
        report["score_rel_err_median"] = float(np.median(rel))
        report["score_rel_err_p999"] = float(np.quantile(rel, 0.999))
        report["score_rel_err_max"] = float(rel.max())
        if report["score_rel_err_median"] > tol.score_rtol_median:
            raise ToleranceError(f"{what}: 'score' median relative error {report['score_rel_err_median']:.2e} "
                                 f"exceeds {tol.score_rtol_median:.0e}")
        outlier |= rel > tol.score_rtol_max
    for name in ("logits", "purified_logits"):
        if name in reference:
            ref = reference[name].astype(np.float64)
            err = np.abs(ref - np.asarray(candidate[name], np.float64)).max(axis=1)
            report[f"{name}_abs_err_max"] = float(err.max())
            allowed = tol.logits_atol * np.maximum(1.0, np.abs(ref).max(axis=1))
            if name == "logits" and (err > allowed).any():
                # the victim path F(E(x)) has no unpool: no allowance
                i = int(np.argmax(err / allowed))
                raise ToleranceError(f"{what}: 'logits' differ by up to {err[i]:.2e} on an image whose largest logit is "
                                     f"{np.abs(ref[i]).max():.3g}; allowed {tol.logits_atol:.0e} x max(1, that)")
            if name == "purified_logits":
                outlier |= err > allowed
    report["outlier_images"] = int(outlier.sum())
    if outlier.sum() > tol.max_outlier_fraction * n:
        raise ToleranceError(
            f"{what}: {int(outlier.sum())} of {n} images have a score relative error above {tol.score_rtol_max:.0e} "
            f"or purified logits off by more than {tol.logits_atol:.0e} (max score error "
            f"{report.get('score_rel_err_max', 0):.2e}); at most {100 * tol.max_outlier_fraction:.2f}% allowed"
        )
    return report
