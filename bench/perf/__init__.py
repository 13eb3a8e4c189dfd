"""Cost, latency, memory and accuracy of every model file of a run (``dafar bench``), the MAC
counts behind the cost tables, and the training-step benchmark (``python -m dafar.bench.perf.train_speed``)."""
from .harness import BenchConfig, BenchResult, bench
from .pareto import ParetoConfig, ParetoResult, pareto

__all__ = ["bench", "BenchConfig", "BenchResult", "pareto", "ParetoConfig", "ParetoResult"]
