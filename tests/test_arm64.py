"""The emulated aarch64 (Raspberry Pi) cross-check of every model file: `-m arm64` (needs root and,
on first use, the Debian mirror and PyPI; about 10 minutes)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm64
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scripts" / "arm64_check.sh"


def test_every_model_matches_on_emulated_aarch64(exported_run, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, binfmt_misc)")
    import shutil
    import sys

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    env = dict(os.environ, PYTHON=sys.executable, IMAGES="100")
    out = subprocess.run(["bash", str(SCRIPT), str(run)], capture_output=True, text=True, env=env, timeout=3600)
    res = json.loads((run / "bench" / "arm64_crosscheck.json").read_text())
    assert res["machine"] == "aarch64" and res["reference_machine"]["machine"] == "x86_64"
    assert out.returncode == 0 and res["ok"], out.stderr[-3000:]
    assert len(res["models"]) == len(json.loads((run / "manifest.json").read_text())["exports"])


def test_instruction_counts_on_emulated_pi_cpus(exported_run, tmp_path):
    """arm64_icount.sh: a count per inference for every file on both CPU models, repeatable to
    within 1%, the defence costing more than its victim and the hybrid graph more than detect."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chroot, mounts)")
    import shutil
    import sys

    run = tmp_path / "run"
    shutil.copytree(exported_run, run)
    env = dict(os.environ, PYTHON=sys.executable, RUNS="3")
    script = SCRIPT.with_name("arm64_icount.sh")
    out = subprocess.run(["bash", str(script), str(run)], capture_output=True, text=True, env=env, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((run / "bench" / "arm64_icount.json").read_text())
    n_files = len(json.loads((run / "manifest.json").read_text())["exports"])
    assert res["cpus"] == ["cortex-a72", "cortex-a76"] and len(res["rows"]) == 2 * n_files
    for r in res["rows"]:
        assert "error" not in r, r
        assert len(r["counts"]) == 3 and r["median"] > 1e5 and r["spread"] < 0.01, r
        if "over_victim" in r:
            assert r["over_victim"] > 1.5, r
