"""ARM cost without a Pi: the instruction counts ``bench/scripts/arm64_icount.sh`` measured under
qemu-user, summarised into ``RUN/bench/arm64_icount.json`` (and the bench report's section).

    python -m dafar.bench.perf.icount RUN_DIR RAW_DIR [--runs N] [--qemu VERSION]

RAW_DIR holds one ``<cpu>--<file>.txt`` per CPU model and model file, one count per marked
inference (the plugin's output).  Per file and CPU: the median count and the spread (max - min
over the median) across inferences; per defence graph, its count over its undefended victim's
(same format, precision, contract, batch), and per int8 file, its count over the float file's.
Counts depend on the CPU model (the kernels the runtime picks for it): a relative cost, not cycles.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from dafar.errors import DafarError
from dafar.manifest import atomic_write_json
from dafar.run import RunFolder
from dafar.schema import Graph

__all__ = ["summarize", "report_section"]


def summarize(run_dir, raw_dir, runs: int | None = None, qemu: str | None = None) -> dict:
    run = RunFolder.open(run_dir, verify=False)
    specs = run.exports()
    rows: dict[tuple[str, str], dict] = {}
    for txt in sorted(Path(raw_dir).glob("*--*.txt")):
        cpu, name = txt.stem.split("--", 1)
        rel = f"export/{name}"
        if rel not in specs:
            continue
        counts = [int(v) for v in txt.read_text().split() if v.strip().isdigit()]
        row: dict = {"model": rel, "cpu": cpu}
        if counts:
            med = statistics.median(counts)
            row.update({"counts": counts, "median": med, "spread": (max(counts) - min(counts)) / med if med else None})
        else:
            log = txt.with_name(txt.name + ".log")
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            row["error"] = tail[0] if tail else "no counts written"
        rows[(rel, cpu)] = row
    victims = {(specs[rel].pair_key, cpu): rel for (rel, cpu) in rows if specs[rel].graph is Graph.VICTIM}
    for (rel, cpu), row in rows.items():
        e = specs[rel]
        if "median" not in row:
            continue
        v = victims.get((e.pair_key, cpu))
        if e.graph is Graph.DAFAR and v and "median" in rows[(v, cpu)]:
            row["victim"] = v
            row["over_victim"] = row["median"] / rows[(v, cpu)]["median"]
        if "-int8" in rel:
            f = rel.replace("-int8", "")
            if (f, cpu) in rows and "median" in rows[(f, cpu)]:
                row["over_float"] = row["median"] / rows[(f, cpu)]["median"]
    out = {"run": run.path.name, "runs_per_file": runs, "qemu": qemu, "cpus": sorted({c for _, c in rows}),
           "note": "instructions per inference under qemu-user (TCG) with a counting plugin, one thread, after two "
                   "warm-up inferences; a relative cost, not Pi cycles or milliseconds",
           "rows": [rows[k] for k in sorted(rows)]}
    bench = run.path / "bench"
    bench.mkdir(exist_ok=True)
    atomic_write_json(bench / "arm64_icount.json", out)
    return out


def report_section(s: dict | None) -> list[str]:
    """The bench report's section for ``RUN/bench/arm64_icount.json`` (nothing when absent)."""
    if not s or not s.get("rows"):
        return []
    cpus = s["cpus"]
    by = {(r["model"], r["cpu"]): r for r in s["rows"]}
    models = sorted({r["model"] for r in s["rows"]})
    L = ["", "## aarch64 instruction counts (emulated Raspberry Pi CPUs)", "",
         f"Instructions per inference on {', '.join(cpus)} ({s.get('qemu') or 'qemu-user'}, counting plugin, one "
         f"thread, {s.get('runs_per_file')} inferences after two warm-ups; `bench/scripts/arm64_icount.sh`). "
         "**A relative cost, not Pi milliseconds**: emulation says nothing about caches, memory bandwidth or clock, "
         "and the counts depend on the CPU model because the runtimes pick kernels for it. Ratios: the defence over its "
         "undefended victim, and int8 over float.", "",
         "| file | " + " | ".join(f"{c}: M instr. | x victim | int8/float | spread" for c in cpus) + " |",
         "|---" * (1 + 4 * len(cpus)) + "|"]
    for m in models:
        cells = []
        for c in cpus:
            r = by.get((m, c))
            if r is None or "median" not in r:
                cells += [("error: " + r["error"][:60]) if r else "-", "-", "-", "-"]
                continue
            cells += [f"{r['median'] / 1e6:.2f}", f"{r['over_victim']:.2f}" if "over_victim" in r else "-",
                      f"{r['over_float']:.2f}" if "over_float" in r else "-",
                      f"{100 * r['spread']:.2f}%" if r.get("spread") is not None else "-"]
        L.append(f"| `{Path(m).name}` | " + " | ".join(cells) + " |")
    L.append("")
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="summarise arm64_icount.sh's raw counts into RUN/bench/arm64_icount.json")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("raw_dir", type=Path)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--qemu", default=None)
    a = ap.parse_args(argv)
    try:
        s = summarize(a.run_dir, a.raw_dir, a.runs, a.qemu)
    except (DafarError, OSError) as exc:
        print(f"icount: {exc}", file=sys.stderr)
        return 2
    for line in report_section(s):
        print(line)
    if (a.run_dir / "bench" / "summary.json").is_file():
        from .report import write_bench_report

        print(f"report: {write_bench_report(a.run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
