"""``dafar export``: the fused defence (and the victim alone) to ONNX and TFLite, each file
validated against torch on real test images before it is added to the run folder.

Files land in ``RUN/export/``::

    dafar-<detector>-<contract>.onnx           dynamic batch
    dafar-<detector>-<contract>-b<N>.tflite    fixed batch N (1 by default), signature serving_default
    dafar-<detector>-detect-<contract>...      the same in --mode detect (label from the victim's logits)
    victim-<contract>.onnx / victim-<contract>-b<N>.tflite

and the manifest gains an ``exports`` table (format, detector, contract, alpha and its rule,
input/output specs, op counts, validation figures) plus their sha256 in ``files``.  Everything is
built in a staging folder inside the run folder and moved into place only after every file
passed its checks, so a failed or interrupted export leaves the run folder as it was.  Each file
is checked by running it through the device runtime's backends (:mod:`dafar.runtime.backends`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dafar.errors import ExportError, InferenceError, ManifestError, OutputShapeError, UnsupportedOpError
from dafar.manifest import get_field, package_versions
from dafar.options import option
from dafar.run import RunFolder
from dafar.schema import Detector, Format, Graph, InputContract, Mode, input_spec, output_names, output_specs, parse_enums

from .validate import Tolerance, validate_model_outputs

__all__ = ["ExportConfig", "ExportResult", "export", "alpha_for", "graph_module", "source_onnx", "LABELS"]

LABELS = "export/labels.txt"  # the class names, one per line, in label order


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[Format, ...] = option((Format.ONNX, Format.TFLITE), flag="--format",
                                         help="comma list of model formats to write")
    detectors: tuple[Detector, ...] = option((Detector.L2,), flag="--detector", help="comma list of detectors")
    contracts: tuple[InputContract, ...] = option(
        (InputContract.FLOAT_NCHW,), flag="--input",
        help="comma list of input contracts: float-nchw (float32 in [0, 1]) and/or uint8-nhwc (raw pixels)")
    modes: tuple[Mode, ...] = option(
        (Mode.HYBRID,), flag="--mode",
        help="comma list of defence graph modes: hybrid (label from the purified logits, the paper's) and/or "
             "detect (label from the victim's logits; D only for the score; about 2/3 of hybrid's cost)")
    tflite_batches: tuple[int, ...] = option((1,), flag="--tflite-batch", help="comma list of fixed TFLite batch sizes")
    threshold_rule: str | None = option(None, metavar="RULE",
                                        help="alpha rule key from the manifest, e.g. 'quantile@fpr=0.01' "
                                             "(default: the detector's default)")
    validate_images: int | None = option(2000, flag="--validate", none="all",
                                         help="test images for the parity check, or 'all'")
    victim: bool = option(True, help="skip the undefended victim graph F(E(x))")
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __post_init__(self):
        object.__setattr__(self, "formats", parse_enums(self.formats, Format, "format"))
        object.__setattr__(self, "detectors", parse_enums(self.detectors, Detector, "detector"))
        object.__setattr__(self, "contracts", parse_enums(self.contracts, InputContract, "input contract"))
        object.__setattr__(self, "modes", parse_enums(self.modes, Mode, "mode"))
        batches = tuple(dict.fromkeys(self.tflite_batches))
        if not batches or any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 1024 for b in batches):
            from dafar.errors import ConfigError

            raise ConfigError(f"tflite batch sizes must be integers in 1..1024, got {self.tflite_batches!r}")
        object.__setattr__(self, "tflite_batches", batches)
        if self.validate_images is not None and (not isinstance(self.validate_images, int) or self.validate_images < 1):
            from dafar.errors import ConfigError

            raise ConfigError(f"validate_images must be a positive integer or None (all), got {self.validate_images!r}")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the run folder and the manifest entries of the new files."""

    run_dir: Path
    entries: dict[str, dict]


def alpha_for(manifest: dict, detector: Detector | str, rule: str | None, run_dir=None) -> tuple[float, str]:
    """(alpha, rule key) for ``detector`` from the manifest, with errors naming what is missing."""
    key = Detector(detector).value
    th = get_field(manifest, f"thresholds.{key}", run_dir)
    rule = rule or th.get("default")
    rules = th.get("rules", {})
    if rule not in rules:
        raise ManifestError(f"the manifest has no threshold rule {rule!r} for the {key} detector "
                            f"(has: {', '.join(rules)})")
    alpha = rules[rule].get("alpha")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise ManifestError(f"threshold {key}/{rule} in the manifest has no finite alpha")
    return float(alpha), rule


def graph_module(net, graph: Graph | str, detector: Detector | str | None, contract: InputContract | str,
                 alpha: float | None, normalization: dict, mode: Mode | str = Mode.HYBRID):
    """The torch module an exported file is made from (eval mode)."""
    from dafar.train.mobile import fold_batchnorm
    from dafar.train.models import deploy_form

    from .fused import FusedDafar, VictimGraph

    net = fold_batchnorm(net)  # batch norm (the mobile network) folded into its convolutions
    net = deploy_form(net)  # the paper decoders' stride-1 transposed convolutions as convolutions
    if Graph(graph) is Graph.DAFAR:
        return FusedDafar(net, alpha, detector, contract, normalization["mean"], normalization["std"], mode).eval()
    return VictimGraph(net, contract, normalization["mean"], normalization["std"]).eval()


def source_onnx(net, graph: Graph | str, detector: Detector | str | None, alpha: float | None, normalization: dict,
                chw, batch: int, path: str | os.PathLike, mode: Mode | str = Mode.HYBRID) -> Path:
    """The static-batch, float-NCHW ONNX graph that a TFLite file is converted from (onnx2tf wants a
    static batch; the input contract's cast and layout change are added on the TF side, inside the
    same .tflite graph).  ``dafar quantize`` converts its int8 files from the same source."""
    import torch

    from .onnx_export import export_onnx

    mod = graph_module(net, graph, detector, InputContract.FLOAT_NCHW, alpha, normalization, mode)
    return export_onnx(mod, torch.zeros(batch, *chw), path, output_names(graph, mode), dynamic_batch=False)


def _torch_outputs(module, x: np.ndarray, names, batch_size: int = 500) -> dict[str, np.ndarray]:
    import torch

    outs: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            res = module(torch.from_numpy(np.array(x[i: i + batch_size])))  # copy: test arrays are read-only
            for n, r in zip(names, res):
                outs[n].append(r.numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


def _run(runner, x: np.ndarray, rel: str) -> dict[str, np.ndarray]:
    try:
        return runner.run(x)
    except InferenceError as exc:
        raise ExportError(f"{rel}: the exported file does not run: {exc}") from exc


def _check_fails_closed(runner, chw, what: str) -> None:
    """Feed images holding NaN: every one must come out rejected (the graph fails closed)."""
    from dafar.errors import DecisionMismatchError

    x = np.random.default_rng(0).random((2, *chw), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1] = np.nan
    if not np.asarray(_run(runner, x, what)["rejected"]).all():
        raise DecisionMismatchError(f"{what}: an image holding NaN was accepted; the graph must fail closed")


def _summary(r: dict) -> str:
    parts = []
    for k in ("label_agreement", "rejected_agreement"):
        if k in r:
            parts.append(f"{k.split('_')[0]} {100 * r[k]:.2f}%")
    if "score_rel_err_max" in r:
        parts.append(f"score rel err median {r['score_rel_err_median']:.1e} max {r['score_rel_err_max']:.1e}")
        parts.append(f"{r['outlier_images']} near-tie outliers")
    if "logits_abs_err_max" in r:
        parts.append(f"logits max abs err {r['logits_abs_err_max']:.1e}")
    return ", ".join(parts) + f" on {r['images']} images"


class _Job:
    """One graph (defence with a detector, or the victim) for one input contract."""

    def __init__(self, graph: Graph, detector: Detector | None, contract: InputContract, alpha, rule,
                 mode: Mode = Mode.HYBRID):
        self.graph, self.detector, self.contract, self.alpha, self.rule = graph, detector, contract, alpha, rule
        self.mode = mode if graph is Graph.DAFAR else None
        self.names = output_names(graph, mode)
        # hybrid files keep the names they always had; a detect graph says so in its name
        tag = "-detect" if self.mode is Mode.DETECT else ""
        self.stem = (f"dafar-{detector.value}{tag}-{contract.value}" if graph is Graph.DAFAR else f"victim-{contract.value}")


def _export_onnx(job: _Job, module, x, ref, common, staging: Path, run: RunFolder, cfg: ExportConfig, log) -> dict:
    import torch

    from dafar.runtime.backends import MIN_ONNXRUNTIME, OnnxRuntimeRunner

    from .onnx_export import OPSET, export_onnx, onnx_op_counts

    t0 = time.perf_counter()
    rel = f"export/{job.stem}.onnx"
    path = export_onnx(module, torch.from_numpy(np.array(x[:2])), staging / Path(rel).name, job.names, dynamic_batch=True)
    runner = OnnxRuntimeRunner(path)
    report = validate_model_outputs(ref, _run(runner, x, rel), cfg.tolerance, f"{rel} (ONNX Runtime)")
    if job.graph is Graph.DAFAR and job.contract is InputContract.FLOAT_NCHW:
        _check_fails_closed(runner, run.chw, rel)
        report["nan_input_rejected"] = True
    log(f"{rel}: {_summary(report)}")
    return {rel: {**common, "format": "onnx", "opset": OPSET, "batch": "dynamic",
                  "input": input_spec(job.contract, run.chw, "N"),
                  "outputs": output_specs(job.names, "N", run.num_classes),
                  "ops": onnx_op_counts(path), "min_runtime": {"onnxruntime": MIN_ONNXRUNTIME},
                  "validation": report, "seconds": round(time.perf_counter() - t0, 2)}}


def _start_conversions(jobs: list[_Job], net, staging: Path, run: RunFolder, cfg: ExportConfig, conversions) -> None:
    """Every TFLite file's conversion, started now in the background (its static-batch source ONNX
    built here, with torch, in this thread); :func:`_export_tflite` waits for each in turn."""
    from .tflite_export import convert_to_tflite

    def convert(src: Path, dst: Path, **kw) -> Path:
        try:
            return convert_to_tflite(src, dst, **kw)
        finally:
            src.unlink(missing_ok=True)

    for job in jobs:
        for batch in cfg.tflite_batches:
            src = source_onnx(net, job.graph, job.detector, job.alpha, run.normalization, run.chw, batch,
                              staging / f"{job.stem}-b{batch}.src.onnx", job.mode or Mode.HYBRID)
            conversions.submit((job.stem, batch), convert, src, staging / f"{job.stem}-b{batch}.tflite",
                               contract=job.contract.value, batch=batch, input_chw=run.chw, output_names=job.names)


def _export_tflite(job: _Job, conversions, x, ref, common, run: RunFolder, cfg: ExportConfig, log) -> dict:
    from dafar.runtime.backends import LiteRTRunner

    from .tflite_export import check_builtin_only, min_runtime_version

    out: dict = {}
    for batch in cfg.tflite_batches:
        t0 = time.perf_counter()
        rel = f"export/{job.stem}-b{batch}.tflite"
        path = conversions.result((job.stem, batch))  # started by _start_conversions
        ops = check_builtin_only(path)
        try:
            runner = LiteRTRunner(path)
            io = runner.signature()
        except InferenceError as exc:
            raise ExportError(f"{rel}: the converted file does not load in LiteRT: {exc}") from exc
        if list(io["inputs"]) != ["x"] or set(io["outputs"]) != set(job.names):
            raise OutputShapeError(f"{rel}: signature is {io}, expected x -> {list(job.names)}")
        report = validate_model_outputs(ref, _run(runner, x, rel), cfg.tolerance, f"{rel} (LiteRT)")
        if job.graph is Graph.DAFAR and job.contract is InputContract.FLOAT_NCHW:
            _check_fails_closed(runner, run.chw, rel)
            report["nan_input_rejected"] = True
        log(f"{rel}: {_summary(report)}")
        out[rel] = {**common, "format": "tflite", "batch": batch, "signature": "serving_default",
                    "input": input_spec(job.contract, run.chw, batch),
                    "outputs": [{"name": n, **io["outputs"][n]} for n in job.names],
                    "ops": ops, "min_runtime": {"tflite": min_runtime_version(path)},
                    "validation": report, "seconds": round(time.perf_counter() - t0, 2)}
    return out


def export(run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(), *, data_dir=None,
           log=print) -> ExportResult:
    """Export, validate and register every (graph, detector, contract, format) the config asks for."""
    from dafar.train.loading import load_dafar

    run = RunFolder.open(run_dir)  # every file's hash checked before anything is built on it
    net, _ = load_dafar(run.path, run.manifest)
    unpool = run.field("architecture.unpool")
    if Format.TFLITE in cfg.formats and unpool == "maxunpool":
        raise UnsupportedOpError(
            f"{run.path} was trained with --unpool {unpool}: MaxUnpool needs FlexMaxPoolWithArgmax on TFLite, which a "
            "stock LiteRT interpreter cannot run. Export it with --format onnx, or train with --unpool mask or upsample."
        )
    alphas = {d: alpha_for(run.manifest, d, cfg.threshold_rule, run.path) for d in cfg.detectors}
    test = run.test_set(data_dir, cfg.validate_images)
    log(f"validating on {len(test)} test images")

    jobs = []
    for contract in cfg.contracts:
        jobs += [_Job(Graph.DAFAR, d, contract, *alphas[d], mode) for mode in cfg.modes for d in cfg.detectors]
        if cfg.victim:
            jobs.append(_Job(Graph.VICTIM, None, contract, None, None))

    entries: dict[str, dict] = {}
    from .tflite_export import BackgroundConversions

    # (the conversions' `with` is the inner one: it waits for them before staging is cleaned up)
    with run.staging("export", log) as staging, BackgroundConversions() as conversions:
        if Format.TFLITE in cfg.formats:
            _start_conversions(jobs, net, staging, run, cfg, conversions)
        for job in jobs:
            module = graph_module(net, job.graph, job.detector, job.contract, job.alpha, run.normalization,
                                  job.mode or Mode.HYBRID)
            x = job.contract.from_pixels(test.images)
            ref = _torch_outputs(module, x, job.names)
            common = {"graph": job.graph.value, "detector": job.detector.value if job.detector else None,
                      "contract": job.contract.value, "alpha": job.alpha, "threshold_rule": job.rule,
                      "num_classes": run.num_classes, "normalization": run.normalization,
                      "tolerance": cfg.tolerance.to_dict()}
            if job.mode is not None:
                common["mode"] = job.mode.value
                if job.mode is Mode.DETECT:
                    # the signature documents what a detect graph leaves out
                    common["omitted_outputs"] = {"purified_logits": "detect mode: the label is the victim's F(E(x)); "
                                                                    "no second E/F pass on D(E(x))"}
            if Format.ONNX in cfg.formats:
                entries.update(_export_onnx(job, module, x, ref, common, staging, run, cfg, log))
            if Format.TFLITE in cfg.formats:
                entries.update(_export_tflite(job, conversions, x, ref, common, run, cfg, log))
        # every file passed: move into place, then record them in the manifest, with the class names
        # (one per line, in label order) beside the models, for an app that ships them
        classes = run.manifest.get("dataset", {}).get("classes") or [str(i) for i in range(run.num_classes)]
        (staging / "labels.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
        for rel in [*entries, LABELS]:
            run.place(staging / Path(rel).name, rel)
        run.register({LABELS: {"role": "labels"},
                      **{rel: {"role": "export", "format": e["format"], "graph": e["graph"]} for rel, e in entries.items()}},
                     tables={"exports": entries},
                     fields={"export_versions": package_versions("torch", "onnx", "onnxruntime", "onnxscript", "onnx2tf",
                                                                 "tensorflow", "ai-edge-litert")})
    return ExportResult(run.path, entries)
