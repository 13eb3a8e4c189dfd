"""The main job as a function: train (or start from a pretrained model), export every graph
variant, quantize to int8, benchmark, and write the reports.  ``dafar pipeline`` on the command
line; ``dafar.pipeline(...)`` from Python.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dafar.schema import Detector, InputContract

__all__ = ["pipeline", "PipelineResult"]


@dataclass(frozen=True)
class PipelineResult:
    """The run folder the main job wrote, its report, and each stage's result."""

    run_dir: Path
    report: Path
    stages: dict = field(default_factory=dict)


def pipeline(out: str | os.PathLike, config=None, *, pretrained: str | None = None, data_dir=None,
             resume: bool = False, overwrite: bool = False, download: bool = True, quantize: bool = True,
             bench: bool = True, quiet: bool = False, log=print) -> PipelineResult:
    """Run the main job into the run folder ``out``.

    ``config`` is a :class:`dafar.train.TrainConfig` (default: MNIST, quick profile); with
    ``pretrained`` (e.g. ``"mnist"``) the shipped model is copied instead of training.  Every
    detector the model has is exported for both input contracts, in ONNX and TFLite."""
    from dafar.bench import BenchConfig
    from dafar.bench import bench as run_bench
    from dafar.export import ExportConfig, export
    from dafar.quantize import QuantizeConfig
    from dafar.quantize import quantize as run_quantize
    from dafar.report import write_run_report

    stages: dict = {}
    if pretrained:
        from dafar.pretrained import materialize
        from dafar.run import RunFolder

        run = materialize(pretrained, out, overwrite=overwrite)
        log(f"run folder: {run} (pretrained {pretrained}, no training)")
        has_c = RunFolder.open(run, verify=False).has_autoencoder
    else:
        from dafar.train import TrainConfig, train

        cfg = config if config is not None else TrainConfig.for_profile("mnist", "quick")
        result = train(cfg, out, data_dir, resume=resume, overwrite=overwrite, download=download, quiet=quiet)
        stages["train"] = result
        log("\n".join(result.summary_lines()))
        run, has_c = result.run_dir, cfg.detector
    dets = (Detector.L2, Detector.AUTOENCODER) if has_c else (Detector.L2,)
    log("== export")
    stages["export"] = export(run, ExportConfig(detectors=dets, contracts=tuple(InputContract)), data_dir=data_dir,
                              log=log)
    if quantize:
        log("== quantize")
        stages["quantize"] = run_quantize(run, QuantizeConfig(), data_dir=data_dir, log=log)
    if bench:
        log("== bench")
        stages["bench"] = run_bench(run, BenchConfig(threads=(1, 2)), data_dir=data_dir, log=log)
    return PipelineResult(Path(run), write_run_report(run), stages)
