"""The main job as a function: train (or start from a pretrained model), export the default
deployment variant (or, with ``full``, every graph variant), quantize to int8, benchmark, and
write the reports.  ``dafar pipeline`` on the command
line; ``dafar.pipeline(...)`` from Python.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dafar.schema import Detector, InputContract, Mode

__all__ = ["pipeline", "PipelineResult", "CHECK_IMAGES"]

# The main job's checks run on this many test images (the stages' own commands use all 10,000):
# with them, README's first command fits in 5 minutes on a 2-core machine.  2,000 images still
# resolve a 0.1-point accuracy change and a 99% agreement gate.
CHECK_IMAGES = 2000


@dataclass(frozen=True)
class PipelineResult:
    """The run folder the main job wrote, its report, and each stage's result."""

    run_dir: Path
    report: Path
    stages: dict = field(default_factory=dict)


def trained_with_edge_profile(run: str | os.PathLike) -> bool:
    """Whether run folder ``run`` was trained with ``--profile edge`` (as its manifest records)."""
    from dafar.manifest import load_manifest

    return load_manifest(run, verify=False).get("training", {}).get("config", {}).get("profile") == "edge"


def pipeline(out: str | os.PathLike, config=None, *, pretrained: str | None = None, data_dir=None,
             resume: bool = False, overwrite: bool = False, download: bool = True, quantize: bool = True,
             bench: bool = True, full: bool = False, mode: Mode | str = Mode.HYBRID, quiet: bool = False,
             check_images: int | None = CHECK_IMAGES, log=print) -> PipelineResult:
    """Run the main job into the run folder ``out``.

    ``config`` is a :class:`dafar.train.TrainConfig` (default: MNIST, quick profile); with
    ``pretrained`` (e.g. ``"mnist"``) the shipped model is copied instead of training.  By default
    the one variant a device runs by default is exported and quantized (the L2 detector on raw
    camera pixels, ``uint8-nhwc``, in ONNX and TFLite, beside the undefended victim); ``full``
    exports every detector the model has for both input contracts and both modes (five times the
    files and about five times the export, quantize and bench time).  ``mode`` picks the defence
    graph's mode otherwise: ``hybrid`` (the paper's) or ``detect`` (the victim's label; no second
    E/F pass).  A config of the ``edge`` profile (or a pretrained model trained with it) exports
    detect graphs and quantizes them with the mixed layout (E and D in int8), the configuration that
    profile was measured as.

    ``check_images`` test images (``None``: all) measure the int8 files against float and every
    file's accuracy in the benchmark; with it the int8 detection check uses 100 adversarial images
    per attack, the report leaves out the naive int8 layout and the benchmark its per-stage profile
    and GPU-readiness sections (``full`` keeps them all).  ``dafar
    quantize`` and ``dafar bench`` on their own use the whole test set."""
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
    if full:
        dets, contracts = ((Detector.L2, Detector.AUTOENCODER) if has_c else (Detector.L2,)), tuple(InputContract)
        modes = tuple(Mode)
    else:  # what dafar.runtime.Defence runs when no model is named
        dets, contracts, modes = (Detector.L2,), (InputContract.UINT8_NHWC,), (Mode(mode),)
    # the edge profile ships what it was measured as: detect graphs, E and D in int8 (mixed layout);
    # a pretrained model trained with it (cifar10-mobile-edge) ships the same way
    edge = trained_with_edge_profile(run)
    if edge and not full:
        modes = (Mode.DETECT,)
    log("== export")
    stages["export"] = export(run, ExportConfig(detectors=dets, contracts=contracts, modes=modes), data_dir=data_dir,
                              log=log)
    if quantize:
        log("== quantize")
        quick = check_images is not None and not full
        qcfg = QuantizeConfig(validate_images=check_images, compare_naive=not quick,
                              attack_images=100 if quick else QuantizeConfig().attack_images,
                              **({"layout": "mixed"} if edge else {}))
        stages["quantize"] = run_quantize(run, qcfg, data_dir=data_dir, log=log)
    if bench:
        log("== bench")
        quick = check_images is not None and not full
        # The quick look times, sizes and scores every file; the bench report's deeper sections
        # (per-stage profile with LiteRT's official tool beside ours, GPU readiness) cost about
        # 35 s of a 5-minute main job on a slow 2-core VM, so they come with --full or `dafar bench
        # RUN` (the published model's full report: bench/results/mnist/bench_report.md).
        bcfg = BenchConfig(threads=(1, 2), accuracy_images=check_images, stage_profile=not quick,
                           gpu_readiness=not quick,
                           fp16_images=min(250, check_images) if check_images is not None else BenchConfig().fp16_images)
        stages["bench"] = run_bench(run, bcfg, data_dir=data_dir, log=log)
    return PipelineResult(Path(run), write_run_report(run), stages)
