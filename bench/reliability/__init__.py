"""How the shipped pieces hold up (``dafar reliability``): input fuzzing, tampered files, long runs,
concurrency, the CLI on bad arguments, a stage killed mid-way; and the cross-machine check of
every model file (``python -m dafar.bench.reliability.crosscheck``, used by
``bench/scripts/arm64_check.sh``)."""
from .checks import ReliabilityConfig, ReliabilityResult, check_reliability

__all__ = ["check_reliability", "ReliabilityConfig", "ReliabilityResult"]
