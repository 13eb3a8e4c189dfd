"""Resource limits on what users pass in: each names itself and how to raise it.

A value far beyond what the machine has is refused before it reaches a runtime, because the
runtimes do not refuse it themselves: LiteRT segfaults when asked for 100,000 threads (after
printing a result) and ONNX Runtime hangs.  Torch-free (the device runtime uses it).
"""
from __future__ import annotations

import os

from dafar.errors import ConfigError

__all__ = ["max_threads", "check_threads"]


def max_threads() -> int:
    """At most 4 threads per CPU of this machine (at least 16), or ``$DAFAR_MAX_THREADS``."""
    env = os.environ.get("DAFAR_MAX_THREADS")
    if env:
        try:
            n = int(env)
            if n >= 1:
                return n
        except ValueError:
            pass
        raise ConfigError(f"DAFAR_MAX_THREADS must be a positive integer, got {env!r}")
    return max(16, 4 * (os.cpu_count() or 1))


def check_threads(threads, what: str = "threads", error=ConfigError):
    """``threads`` (None, or an int in 1..max_threads()) or ``error`` naming the limit."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise error(f"{what} must be a positive integer or None, got {threads!r}")
    limit = max_threads()
    if threads > limit:
        raise error(f"{what} = {threads} exceeds the limit of {limit} (4 per CPU of this machine's "
                    f"{os.cpu_count()}, at least 16); set DAFAR_MAX_THREADS to raise it")
    return threads
