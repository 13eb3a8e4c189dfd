"""The package's layers, enforced: core <- train <- export <- quantize <- bench, the runtime on
core alone, and the CLI and the main job on top.  A module may import its own layer and the
layers below it, never a later stage, a sibling stage sideways or another layer's private
(underscore) names.  Every import counts, the ones inside functions included: a lazy import is
still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"core": "dafar", "train": "dafar.train", "export": "dafar.export", "quantize": "dafar.quantize",
           "runtime": "dafar.runtime", "bench": "dafar.bench"}
# what sits on top of every stage: the package facade (its lazy `dafar.pipeline`), the CLI, the
# main job and the assembled run report
TOP = {"dafar", "dafar.__main__", "dafar.cli", "dafar.workflow", "dafar.report"}
RANK = {"core": 0, "runtime": 1, "train": 2, "export": 3, "quantize": 4, "bench": 5, "top": 6}


def layer(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("runtime", "train", "export", "quantize", "bench"):
        return parts[1]
    return "core"


def allowed(src: str, dst: str) -> bool:
    if src == dst:
        return True
    if src == "runtime":  # what ships to a device: core's vocabulary and nothing else
        return dst == "core"
    return RANK[dst] < RANK[src]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    base = FOLDERS[rel.parts[0]]
    rest = list(rel.with_suffix("").parts[1:])
    if rest and rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([base, *rest])


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every import in ``source`` (the text of ``module``) that crosses the layers."""
    src = layer(module)
    out = []
    for node in ast.walk(ast.parse(source)):
        targets: list[tuple[str, str | None]] = []
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            targets = [(base, a.name) for a in node.names]
        for target, name in targets:
            if target != "dafar" and not target.startswith("dafar."):
                continue
            if name is not None and target == "dafar" and name in {"cli", "workflow", "report", "__main__"}:
                target, name = f"dafar.{name}", None
            dst = layer(target if name is None or target == "dafar" else target)
            what = f"{module} imports {target}{'.' + name if name else ''} (line {node.lineno})"
            if not allowed(src, dst):
                out.append(f"{what}: {src} may not import {dst}")
                continue
            if dst != src:
                private = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
                if private or (name is not None and name.startswith("_") and not name.startswith("__")):
                    out.append(f"{what}: a private name of the {dst} layer")
    return out


def _package_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def test_every_import_respects_the_layers():
    found = []
    for path in _package_files():
        module = _module_name(path)
        found += violations(module, path.read_text(), path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module,source,why", [
    # the crossings the refactor removed, written again: each must be caught
    ("dafar.export._tflite_worker", "from dafar.quantize.layout import Layout", "export may not import quantize"),
    ("dafar.quantize.api", "from dafar.bench.attacks import attack_sets", "quantize may not import bench"),
    ("dafar.bench.security.evaluate", "from dafar.quantize.api import _splits", "private name"),
    ("dafar.quantize.api", "from dafar.export.api import _input_spec", "private name"),
    ("dafar.pretrained", "def publish():\n    from dafar.train.weights import save_state", "core may not import train"),
    ("dafar.runtime.core", "import dafar.train.models", "runtime may not import train"),
    ("dafar.runtime.core", "from dafar.export import export", "runtime may not import export"),
    ("dafar.train.trainer", "from dafar.runtime.core import _litert", "private name"),
    ("dafar.quantize.tflite_quant", "from ..export._tflite_worker import main", "private name"),
    ("dafar.manifest", "from dafar import cli", "core may not import top"),
])
def test_a_deliberate_crossing_is_caught(module, source, why):
    found = violations(module, source)
    assert found and why in found[0], found


@pytest.mark.parametrize("module,source", [
    ("dafar.quantize.api", "from dafar.export.api import source_onnx"),  # a later stage's public name
    ("dafar.quantize.api", "from .layout import Layout\nfrom ._tflite_worker import main"),  # its own private module
    ("dafar.bench.perf.harness", "from dafar.runtime import Defence"),
    ("dafar.runtime.core", "from dafar.schema import ExportEntry\nfrom .backends import open_model"),
    ("dafar.cli", "from dafar.bench import bench"),
])
def test_downward_imports_are_allowed(module, source):
    assert violations(module, source) == []
