"""The security evaluation (``dafar eval``): gray-box attacks, the peers (MagNet, Feature
Squeezing, a binary detector), white-box adaptive attacks, the deployed files, and its report."""
from .evaluate import EvalConfig, EvalResult, evaluate

__all__ = ["evaluate", "EvalConfig", "EvalResult"]
