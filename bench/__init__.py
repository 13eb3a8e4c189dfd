"""dafar.bench: measuring a run folder, by purpose.

* :mod:`dafar.bench.perf`: cost, latency, memory and accuracy of every model file (:func:`bench`), and
  cost against detection across configurations (:func:`pareto`);
* :mod:`dafar.bench.security`: the adversarial evaluation (:func:`evaluate`);
* :mod:`dafar.bench.reliability`: fuzzing, tampering, long runs, concurrency (:func:`check_reliability`);
* :mod:`dafar.bench.summary`: one table of a run's headline numbers from every stage (:func:`summarize`).

Shell scripts live in ``bench/scripts/`` and committed results in ``bench/results/``.  Importing
this package imports nothing heavy; ``--device-only`` benchmarks need only numpy and a backend.
"""
from .perf import BenchConfig, BenchResult, ParetoConfig, ParetoResult, bench, pareto
from .reliability import ReliabilityConfig, ReliabilityResult, check_reliability
from .security import EvalConfig, EvalResult, evaluate
from .summary import summarize

__all__ = ["bench", "BenchConfig", "BenchResult", "pareto", "ParetoConfig", "ParetoResult", "evaluate", "EvalConfig", "EvalResult", "check_reliability",
           "ReliabilityConfig", "ReliabilityResult", "summarize"]
