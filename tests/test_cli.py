import re
import subprocess
import sys
from pathlib import Path

import pytest

from dafar.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from dafar.cli import build_parser; build_parser().format_help();"
            "import dafar.data, dafar.manifest, dafar.threshold;"
            "bad=[m for m in ('torch','tensorflow','onnxruntime','matplotlib') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_help():
    exe = Path(sys.executable).with_name("dafar")
    if not exe.exists():
        pytest.skip("the dafar console script is not installed beside this interpreter")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_bad_arguments_exit_2(capsys):
    assert main(["train", "--dataset", "imagenet", "--out", "x"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0


def test_invalid_config_value_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "0"]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err


def test_attack_budgets_read_as_decimals_or_k_over_255(tmp_path, capsys):
    from dafar.train.attacks import parse_budgets

    assert parse_budgets("0.1, 8/255,1") == (0.1, 8 / 255, 1.0)
    for bad in ("8/0", "eight", "0", "2"):
        assert main(["eval", str(tmp_path), "--adaptive-eps", bad]) == 2
        assert "--adaptive-eps" in capsys.readouterr().err


def test_missing_run_folder(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 4
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_exit_3(tmp_path, capsys):
    code = main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--no-download", "--quiet"])
    assert code == 3
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err


def test_readme_commands_and_ci_agree():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert blocks, "README has no command block"
    first = [line for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(first) == 2, f"README must start with exactly two set-up commands, found {first}"
    main_cmd, test_cmd = first
    assert "dafar" in main_cmd and "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci, ".ci/run must run README's test command verbatim"
    # torch is installed by pip first (pip.conf's find-links holds the CPU build on these machines;
    # uv reads no pip.conf), so both commands name the same torch as pyproject.toml's pin
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for cmd in (main_cmd, test_cmd):
        assert f"torch=={pin} " in cmd, f"README's install must pin the torch of pyproject.toml ({pin}): {cmd}"


def test_opt_in_checks_are_chosen_by_marker_not_by_folder_name(tmp_path):
    """A checkout inside folders named like the opt-in markers still runs its default tests."""
    import shutil

    root = tmp_path / "arm64" / "full" / "fresh"  # the clone itself named like a marker: the case that bit
    (root / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "test_probe.py").write_text(
        "import pytest\n\ndef test_default():\n    pass\n\n@pytest.mark.full\ndef test_opt_in():\n    pass\n")
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: s\n    full: f\n    arm64: a\n    fresh: r\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(root / "tests")],
                         capture_output=True, text=True, cwd=root)
    assert "1 passed, 1 skipped" in out.stdout, out.stdout[-2000:]


def test_overwrite_never_replaces_a_users_file_or_folder(tmp_path, capsys):
    """--overwrite replaces run folders only: a regular file, a folder of other things and a
    symbolic link given as --out are refused (exit 4), left exactly as they were."""
    from dafar.cli import main

    f = tmp_path / "notes.txt"
    f.write_text("mine")
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(d)
    for out in (f, d, link):
        assert main(["pretrained", "mnist", "--out", str(out), "--overwrite"]) == 4
        err = capsys.readouterr().err
        assert str(out) in err and "run folder" in err
        assert main(["train", "--out", str(out), "--overwrite", "--train-limit", "64", "--quiet"]) == 4
        capsys.readouterr()
    assert f.read_text() == "mine" and (d / "a.jpg").read_bytes() == b"x" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt", "photos"]  # no staging left behind


def test_npy_inputs_are_bounded_before_numpy_allocates(tmp_path, monkeypatch):
    """A .npy whose header claims terabytes, or more bytes than the file holds, is refused naming
    the limit (and how to raise it) before np.load tries to allocate it."""
    import numpy as np

    from dafar.cli import _check_npy_header
    from dafar.errors import InputValidationError

    data = np.zeros((1, 28, 28, 1), np.uint8).tobytes()
    for name, shape, match in (("huge", (100000, 100000, 1000), "DAFAR_MAX_ARRAY_BYTES"),
                               ("short", (2, 28, 28, 1), "truncated or a forged header")):
        with open(tmp_path / f"{name}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            f.write(data)
        with pytest.raises(InputValidationError, match=match):
            _check_npy_header(tmp_path / f"{name}.npy")
    np.save(tmp_path / "ok.npy", np.zeros((1, 28, 28, 1), np.uint8))
    _check_npy_header(tmp_path / "ok.npy")
    monkeypatch.setenv("DAFAR_MAX_ARRAY_BYTES", "100")
    with pytest.raises(InputValidationError, match="limit of 0 MiB"):
        _check_npy_header(tmp_path / "ok.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(InputValidationError, match="not a readable .npy"):
        _check_npy_header(tmp_path / "junk.npy")


@pytest.mark.parametrize("exc,code,words", [
    (PermissionError(13, "Permission denied", "/r/manifest.json"), 4, ["/r/manifest.json", "permissions"]),
    (OSError(30, "Read-only file system", "/r/export"), 4, ["/r/export", "read-only"]),
    (OSError(28, "No space left on device", "/r/x.onnx"), 4, ["disk is full"]),
    (ModuleNotFoundError("No module named 'torch'", name="torch"), 6, ["dafar[train]"]),
    (ModuleNotFoundError("No module named 'ai_edge_litert'", name="ai_edge_litert"), 6, ["dafar[litert]"]),
])
def test_the_cli_boundary_turns_file_system_and_import_failures_into_exit_codes(monkeypatch, capsys, exc, code, words):
    import dafar.cli as cli

    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_info", boom)
    assert cli.main(["info", "anything"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words)


def test_an_unexpected_failure_is_one_line_and_a_log_with_the_traceback(monkeypatch, capsys, tmp_path):
    import re

    import dafar.cli as cli

    def boom(args):
        raise RuntimeError("something dafar did not foresee")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert cli.main(["info", "anything"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "something dafar did not foresee" in err
    log = re.search(r"traceback is in (\S+\.log)", err).group(1)
    assert "Traceback" in open(log).read() and log.startswith(str(tmp_path))


@pytest.mark.parametrize("argv,extra", [(["quantize", "RUN"], "eval"), (["export", "RUN"], "export"),
                                        (["train", "--out", "RUN"], "train"), (["pipeline", "--out", "RUN"], "all")])
def test_heavy_command_without_its_extra_exits_6_before_touching_data(argv, extra, tmp_path, monkeypatch, capsys):
    """A device install (numpy + a runtime) names the extra to add before looking for data: no
    MNIST download attempt, no run folder created."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    argv = [str(tmp_path / a) if a == "RUN" else a for a in argv]
    assert main(argv) == 6
    err = capsys.readouterr().err
    assert "'torch'" in err and f"pip install 'dafar[{extra}]'" in err
    assert not (tmp_path / "RUN").exists()


def test_closed_output_pipe_stops_quietly(tmp_path):
    """`dafar info RUN --json | head -1`: the reader leaves early; dafar stops without a traceback."""
    from dafar import pretrained

    run = pretrained.materialize("mnist", tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-m", "dafar", "info", str(run), "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # before dafar has written a byte
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "error" not in err.lower(), err
