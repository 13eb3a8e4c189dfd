"""dafar.bench: benchmark harness and adversarial evaluation (issues 5 and 6; not built yet)."""
