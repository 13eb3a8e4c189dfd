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
