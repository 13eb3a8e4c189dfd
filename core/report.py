"""A run folder's ``report.md``: each stage writes its own part, this assembles them.

The training part (with its plots) comes from :mod:`dafar.train.report`, the exported files'
table from :mod:`dafar.export.report`, the int8 headline from :mod:`dafar.quantize.report` and
the benchmark headline from :mod:`dafar.bench.perf.report`; a part whose stage has not run is
left out.  The stages' own full reports (``quantize_report.md``, ``bench_report.md``,
``eval_report.md``, ``reliability_report.md``) are written by the stages themselves.
"""
from __future__ import annotations

import os
from pathlib import Path

from dafar.manifest import atomic_write_text, load_manifest

__all__ = ["write_run_report"]


def write_run_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` (and its plots) from the run folder; returns its path."""
    from dafar.train.report import training_sections

    run_dir = Path(run_dir)
    m = load_manifest(run_dir)
    lines = training_sections(run_dir, m)
    if m.get("exports"):
        from dafar.export.report import exports_section
        from dafar.quantize.report import summary_section as int8_section

        lines += exports_section(m)
        lines += int8_section(m)
    if (run_dir / "bench" / "summary.json").is_file():
        from dafar.bench.perf.report import summary_section as bench_section

        lines += bench_section(run_dir)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
