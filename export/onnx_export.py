"""torch -> ONNX with the dynamo exporter (opset 18), checked by the ONNX checker.

The legacy exporter cannot export MaxUnpool ("cond must be a bool"); the dynamo exporter exports
both unpool variants.  The batch dimension is dynamic unless a fixed batch is asked for (the
TFLite path wants a static shape).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

from dafar.errors import ExportError, require

__all__ = ["OPSET", "export_onnx", "onnx_op_counts"]

OPSET = 18


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress and harmless notes (torchvision missing, ambiguous
    attributes); keep the CLI's output readable.  Errors still raise."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            warnings.simplefilter("ignore")
            yield buf_out, buf_err
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# ONNX IR version 9 (ONNX 1.15) is what ONNX Runtime 1.16 and 1.17 read; the exporter writes
# IR 10 although an opset-18 graph uses nothing of it, and those runtimes (still common on
# devices) refuse the file: "Unsupported model IR version: 10, max supported IR version: 9".
PORTABLE_IR_VERSION = 9


def portable_ir(model) -> bool:
    """Drop the opset imports no node uses, and lower ``model``'s (an onnx ModelProto) IR version
    to 9 where its opsets allow (default domain <= 20); True when it changed.  Rewritten to IR 9, the files ran bit-identically on
    ONNX Runtime 1.16/1.17 (issue 24's measurement)."""
    used = {n.domain or "" for n in model.graph.node}
    for f in model.functions:
        used |= {n.domain or "" for n in f.node}
    # ONNX Runtime's quantizer declares every domain it knows (ai.onnx.ml opset 5 among them, which
    # ONNX Runtime 1.16 refuses to load); the ones no node uses only stand in an older reader's way
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    changed = len(keep) != len(model.opset_import)
    if changed:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    if model.ir_version <= PORTABLE_IR_VERSION:
        return changed
    default = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    ml = max((o.version for o in model.opset_import if o.domain == "ai.onnx.ml"), default=0)
    if default > 20 or ml > 4:  # opsets IR 9 does not know
        return changed
    model.ir_version = PORTABLE_IR_VERSION
    return True


# torch.onnx records, per node, the Python stack that made it: absolute paths of the machine that
# exported the file (a user's home folder, shipped inside every model on every device) and source
# line numbers, so any edit to dafar changed the file's bytes.  The other metadata (module names,
# scopes) names no path and stays for debugging.
_BUILD_METADATA = ("pkg.torch.onnx.stack_trace",)


def strip_build_paths(model) -> bool:
    """Remove the per-node records of the exporting machine's source paths from ``model`` (an onnx
    ModelProto, its functions included); True when anything was removed."""
    changed = False
    for g in [model.graph, *model.functions]:
        for node in g.node:
            keep = [p for p in node.metadata_props if p.key not in _BUILD_METADATA]
            if len(keep) != len(node.metadata_props):
                changed = True
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
    return changed


def export_onnx(module: torch.nn.Module, sample: torch.Tensor, path: str | os.PathLike,
                output_names: tuple[str, ...], dynamic_batch: bool = True) -> Path:
    """Export ``module(sample)`` to ``path`` (input named ``x``) and run the ONNX checker."""
    onnx = require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")
    path = Path(path)
    module = module.eval()
    dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    try:
        with _quiet() as (_, err):
            prog = torch.onnx.export(
                module, (sample,), dynamo=True, opset_version=OPSET, input_names=["x"],
                output_names=list(output_names), dynamic_shapes=dynamic_shapes, external_data=False,
                optimize=True, verbose=False,
            )
            prog.save(str(path))
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {exc}") from exc
    model = onnx.load(str(path))
    if strip_build_paths(model) | portable_ir(model):
        onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX checker rejected {path}: {exc}") from exc
    got = [o.name for o in model.graph.output]
    if got != list(output_names):
        raise ExportError(f"{path.name}: outputs are {got}, expected {list(output_names)}")
    return path


def onnx_op_counts(path: str | os.PathLike) -> dict[str, int]:
    onnx = require("onnx", "export", "ONNX export")
    model = onnx.load(str(path))
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))
