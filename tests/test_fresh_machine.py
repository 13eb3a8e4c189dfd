"""README's main command from a fresh clone in a new virtual environment (`-m fresh`, ~8 minutes).
CI already runs README's test command that way, so this covers the other one."""
import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.fresh
REPO = Path(__file__).resolve().parents[1]


def test_readme_main_command_from_a_fresh_clone(tmp_path):
    out = tmp_path / "fresh.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "scripts" / "fresh_machine_check.sh"), str(REPO)], capture_output=True,
                          text=True, env={**__import__("os").environ, "OUT": str(out)}, timeout=3 * 3600)
    res = json.loads(out.read_text())
    assert proc.returncode == 0 and res["ok"], proc.stderr[-3000:]
    assert any(r.endswith("bench_report.md") for r in res["reports"])
