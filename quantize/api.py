"""``dafar quantize``: int8 versions of the exported graphs for ONNX Runtime and LiteRT, each with
its own recalibrated alpha and a float-vs-int8 comparison.

For every float export of the run folder that the config selects (defence graphs and the victim
alone), in every asked format:

1. calibration images: ``calib_images`` training images (never validation or test), drawn with a
   fixed seed, so a rerun builds the same file;
2. the int8 file, with the layout of :mod:`dafar.quantize.layout` (default ``precise``);
3. alpha recalibrated on the int8 model's own scores over the clean validation split, with the
   rule the float model's alpha came from (all the manifest's rules are recomputed and recorded),
   written into the graph, and checked: the model's decisions must follow it exactly;
4. checks against the float model on the test set: top-1 agreement, accuracy change, reject
   agreement, score correlation, and a NaN image must come out rejected; a failure raises a
   :class:`~dafar.errors.QuantizationError` and nothing is written;
5. the per-tensor quantization error (SQNR, worst layers first) so a user can see why;
6. optionally the ``naive`` layout (quantize everything) evaluated the same way, never written,
   as the report's warning of what a default converter does to the detector.

Files are staged inside the run folder and moved into ``RUN/export/`` only when every model
passed; the manifest's ``exports`` table then holds them with ``precision: int8``.  Every model,
float and int8, is run through the device runtime's backends (:mod:`dafar.runtime.backends`).
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, ManifestError, QuantizationError
from dafar.manifest import atomic_write_bytes, classifier_alone_message
from dafar.options import option
from dafar.run import RunFolder
from dafar.schema import (
    Detector,
    ExportEntry,
    Format,
    Graph,
    InputContract,
    Mode,
    Precision,
    input_spec,
    output_specs,
    parse_enum,
    parse_enums,
)
from dafar.threshold import ThresholdRule, calibrate, false_positive_rate, rejects

from .layout import Layout

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "quantize_run", "Checks", "OnnxWeights", "ActivationType",
           "SCORES", "default_attack_specs", "calibration_images", "check_calibration"]

SCORES = "quantize_scores.npz"


class OnnxWeights(str, Enum):
    """Range of the int8 ONNX weights.  ``int7`` (-64..63, ONNX Runtime's ``reduce_range``) gives
    no 16-bit saturation on any CPU; ``int8`` (full range) is a little more precise on ARM and on x86
    CPUs with VNNI, but saturates ONNX Runtime's kernels on x86 CPUs without it (AVX2, AVX-512
    before VNNI) and loses accuracy there (:mod:`dafar.runtime.cpu`).  An int8 file is built once
    and run anywhere, so the safe range is the default.  LiteRT (XNNPACK) int8 showed no such loss."""

    INT7 = "int7"
    INT8 = "int8"

    @property
    def bits(self) -> int:
        return 7 if self is OnnxWeights.INT7 else 8


class ActivationType(str, Enum):
    """ONNX Runtime activation type: uint8 suits x86, int8 suits ARM."""

    UINT8 = "uint8"
    INT8 = "int8"


@dataclass(frozen=True)
class Checks:
    """What an int8 model must keep, measured against its float source on the test set."""

    min_label_agreement: float = option(
        0.99, help="fail when the int8 top-1 label (purified for the defence) agrees with float on fewer test images "
                   "(a 10-class model at 85% accuracy has more near-ties than one at 99%)")
    max_accuracy_drop: float = option(0.005, help="fail when victim or purified accuracy falls by more than this, absolute")
    min_decision_agreement: float = option(0.99, help="fail when clean reject decisions agree with float on fewer images")
    min_score_correlation: float = option(0.95, help="fail when the int8 score's Pearson correlation with float is lower")

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ConfigError(f"{k} must lie in [0, 1], got {v!r}")


@dataclass(frozen=True)
class QuantizeConfig:
    formats: tuple[Format, ...] = option((Format.ONNX, Format.TFLITE), flag="--format",
                                         help="comma list of model formats to quantize")
    detectors: tuple[Detector, ...] | None = option(None, flag="--detector", none="all",
                                                    help="comma list of detectors (default: every exported one)")
    contracts: tuple[InputContract, ...] | None = option(None, flag="--input", none="all",
                                                         help="comma list of input contracts (default: every exported one)")
    layout: Layout = option(Layout.PRECISE, metavar="{precise,mixed}",
                            help="precise: everything the score reads (E on the input path, D, C) computes in float with "
                                 "int8-stored weights (keeps the score, the same on every runtime); mixed: every conv/linear layer in int8, only the residual/score/threshold "
                                 "in float")
    calib_images: int = option(256, flag="--calib", metavar="N", help="calibration images from the training split")
    calib_seed: int = option(0, help="seed of the calibration images' draw")
    victim: bool = option(True, help="do not quantize the victim-only graphs")
    validate_images: int | None = option(None, flag="--validate", none="all",
                                         help="test images for the float-vs-int8 checks, or 'all'")
    activation_type: ActivationType = option(ActivationType.UINT8,
                                             help="ONNX Runtime activation type (uint8 for x86, int8 for ARM)")
    onnx_weights: OnnxWeights = option(
        OnnxWeights.INT7, help="int8 ONNX weight range: int7 (-64..63) is safe on every CPU; int8 (full range) is a "
                               "little more precise on ARM and VNNI CPUs but loses accuracy in ONNX Runtime on x86 "
                               "CPUs without VNNI (16-bit saturation)")
    tflite_batch: int = option(1, help="which fixed-batch TFLite export to quantize")
    compare_naive: bool = option(True, flag="--no-naive",
                                 help="skip evaluating the naive full-int8 layout for the report")
    attack_images: int = option(200, help="adversarial images per attack for the detection comparison (0 to skip)")
    attacks: tuple[str, ...] | None = option(
        None, none="default", metavar="SPECS", parse=lambda text: _attack_list(text),
        help="comma list of gray-box attacks for the detection comparison, e.g. fgsm@0.1,pgd@0.3,max_iter=20 "
             "(default: FGSM and PGD at the data set's usual budgets)")
    checks: Checks = field(default_factory=Checks)

    def __post_init__(self):
        object.__setattr__(self, "formats", parse_enums(self.formats, Format, "format"))
        if self.detectors is not None:
            object.__setattr__(self, "detectors", parse_enums(self.detectors, Detector, "detector"))
        if self.contracts is not None:
            object.__setattr__(self, "contracts", parse_enums(self.contracts, InputContract, "input contract"))
        object.__setattr__(self, "layout", parse_enum(self.layout, Layout, "layout"))
        if self.layout is Layout.NAIVE:
            raise ConfigError("the naive layout quantizes the detector's score and is only evaluated for comparison "
                              "(compare_naive); choose mixed or precise")
        if not isinstance(self.calib_images, int) or isinstance(self.calib_images, bool) or self.calib_images < 16:
            raise ConfigError(f"calib_images must be an integer >= 16 (too few images give unstable int8 ranges), "
                              f"got {self.calib_images!r}")
        object.__setattr__(self, "activation_type", parse_enum(self.activation_type, ActivationType, "activation type"))
        object.__setattr__(self, "onnx_weights", parse_enum(self.onnx_weights, OnnxWeights, "onnx weight range"))
        if self.validate_images is not None and (not isinstance(self.validate_images, int) or self.validate_images < 10):
            raise ConfigError(f"validate_images must be None (all) or an integer >= 10, got {self.validate_images!r}")
        if not isinstance(self.tflite_batch, int) or not 1 <= self.tflite_batch <= 1024:
            raise ConfigError(f"tflite_batch must be an integer in 1..1024, got {self.tflite_batch!r}")
        if not isinstance(self.attack_images, int) or isinstance(self.attack_images, bool) or self.attack_images < 0:
            raise ConfigError(f"attack_images must be an integer >= 0, got {self.attack_images!r}")
        if self.attacks is not None:
            from dafar.train.attacks import spec_from_string

            object.__setattr__(self, "attacks", tuple(self.attacks))
            for a in self.attacks:
                spec_from_string(a)  # a bad spec is refused now, not after an hour of quantizing


def _attack_list(text: str) -> tuple[str, ...]:
    from dafar.train.attacks import parse_attack_list

    return parse_attack_list(text)


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` wrote: the new manifest entries and the report."""

    run_dir: Path
    entries: dict[str, dict]
    report: Path | None


# ---------------------------------------------------------------- data
def default_attack_specs(dataset: str) -> list:
    """The gray-box sets the float-vs-int8 detection comparison uses: the L-inf budgets that matter
    for each data set (MNIST 0.1-0.3; CIFAR-10 2/255-16/255, where 0.1 would be a visible smear)."""
    from dafar.train.attacks import spec_from_string

    eps = ("0.1", "0.2", "0.3") if dataset == "mnist" else tuple(f"{k / 255!r}" for k in (2, 8, 16))
    return [spec_from_string(f"{a}@{e}") for a in ("fgsm", "pgd") for e in eps]


def calibration_images(train_u8: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training images drawn with ``seed`` (every one, when the split holds fewer)."""
    n = min(n, len(train_u8))
    if n < 16:
        raise ConfigError(f"the training split holds {len(train_u8)} images; int8 calibration needs at least 16")
    idx = np.sort(np.random.default_rng([seed, 31]).choice(len(train_u8), n, replace=False))
    return train_u8[idx], idx


def check_calibration(x: np.ndarray, contract: InputContract | str, chw) -> None:
    """Calibration data must match the model input: clear errors for shape, dtype and range."""
    contract = InputContract(contract)
    want = tuple(contract.shape(chw, 0)[1:])
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ConfigError(f"calibration data of shape {x.shape} does not fit the {contract.value} input "
                          f"(N, {', '.join(map(str, want))})")
    if len(x) < 16:
        raise ConfigError(f"{len(x)} calibration images are too few; at least 16 are needed (256 recommended)")
    if x.dtype != contract.dtype:
        raise ConfigError(f"calibration data for a {contract.value} input must be {contract.dtype.name}, got {x.dtype}")
    if contract is InputContract.FLOAT_NCHW and (not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1):
        raise ConfigError("calibration data for a float input must be finite and lie in [0, 1]")


# ---------------------------------------------------------------- running models
def _runner(path: Path):
    """x -> outputs by name, for an .onnx or .tflite file (ONNX Runtime or LiteRT, two threads)."""
    from dafar.runtime.backends import open_model

    return open_model(path, threads=2).run


# ---------------------------------------------------------------- the stage
@dataclass
class _Images:
    """The images every model of one quantize call is calibrated and checked on."""

    calib_u8: np.ndarray
    calib_record: dict
    val_u8: np.ndarray
    test_u8: np.ndarray
    test_y: np.ndarray
    adversarial: list = field(default_factory=list)  # gray-box attack sets against the float victim


def _jobs(run: RunFolder, cfg: QuantizeConfig) -> list[tuple[Format, ExportEntry]]:
    """The float exports the config selects, each with the format to quantize it for."""
    exports = run.exports()
    if not any(e.precision is Precision.FLOAT32 for e in exports.values()):
        raise ManifestError(classifier_alone_message(run.manifest, run.path)
                            or f"{run.path} has no float exports to quantize: run `dafar export {run.path}` first")
    jobs = []
    for rel, e in exports.items():
        if e.precision is not Precision.FLOAT32 or e.format not in cfg.formats:
            continue
        if e.graph is Graph.VICTIM and not cfg.victim:
            continue
        if e.format is Format.TFLITE and e.batch != cfg.tflite_batch:
            continue
        if e.graph is Graph.DAFAR and cfg.detectors is not None and e.detector not in cfg.detectors:
            continue
        if cfg.contracts is not None and e.contract not in cfg.contracts:
            continue
        jobs.append((e.format, e))
    # every detector and contract asked for by name must be there: quantizing the rest and
    # exiting 0 would look like success (--detector autoencoder on an l2-only export did that)
    for name, wanted, have in (
            ("detector", cfg.detectors, {e.detector for _, e in jobs if e.graph is Graph.DAFAR}),
            ("input contract", cfg.contracts, {e.contract for _, e in jobs})):
        missing = [w.value for w in (wanted or ()) if w not in have]
        if missing:
            raise ManifestError(f"{run.path} has no float export for the {name} {', '.join(missing)} (formats "
                                f"{', '.join(f.value for f in cfg.formats)}, TFLite batch {cfg.tflite_batch}): "
                                f"export it first (dafar export {run.path} --{name.split()[-1].replace('contract', 'input')} "
                                f"{','.join(missing)})")
    if not jobs:
        raise ManifestError(
            f"{run.path} has no float export matching formats={[f.value for f in cfg.formats]}, "
            f"detectors={cfg.detectors and [d.value for d in cfg.detectors]}, "
            f"contracts={cfg.contracts and [c.value for c in cfg.contracts]}, tflite batch {cfg.tflite_batch}: "
            "export those first (dafar export)")
    return jobs


def _images(run: RunFolder, cfg: QuantizeConfig, jobs, data_dir, log) -> _Images:
    splits = run.splits(data_dir)
    calib_u8, calib_idx = calibration_images(splits.train.images, cfg.calib_images, cfg.calib_seed)
    test = splits.test.sample(cfg.validate_images)  # the same class-mixed subset the exporter validated on
    calib_record = {"images": int(len(calib_idx)), "seed": cfg.calib_seed, "source": "training split (never validation or test)",
                    "indices_sha256": hashlib.sha256(calib_idx.astype(np.int64).tobytes()).hexdigest()}
    imgs = _Images(calib_u8, calib_record, splits.val.images, test.images, test.labels.astype(np.int64))
    if cfg.attack_images and any(e.graph is Graph.DAFAR for _, e in jobs):
        from dafar.train.attacks import attack_sets, spec_from_string

        specs = ([spec_from_string(a) for a in cfg.attacks] if cfg.attacks is not None
                 else default_attack_specs(run.dataset))
        imgs.adversarial = attack_sets(run.path, specs, n=cfg.attack_images, data_dir=data_dir, log=log)
        run.reload()  # the attack sets are registered in the manifest
    return imgs


class _Sources:
    """Static-batch float-NCHW ONNX graphs rebuilt from the weights by the exporter's own code
    (what onnx2tf converts to int8 TFLite), one per (graph, detector, mode, batch)."""

    def __init__(self, run: RunFolder, staging: Path):
        from dafar.train.loading import load_dafar

        self.run, self.staging = run, staging
        self.net, _ = load_dafar(run.path, run.manifest)
        self._cache: dict[tuple, Path] = {}

    def get(self, e: ExportEntry, batch: int) -> Path:
        from dafar.export.api import source_onnx

        key = (e.graph, e.detector, e.mode, batch)
        if key not in self._cache:
            det = e.detector.value if e.detector else None
            mode = e.mode or Mode.HYBRID
            self._cache[key] = source_onnx(self.net, e.graph, e.detector, e.alpha, self.run.normalization, self.run.chw,
                                           batch, self.staging / f"src-{e.graph.value}-{det}-{mode.value}-{batch}.onnx",
                                           mode)
        return self._cache[key]


def _int8_rel(fmt: Format, e: ExportEntry, batch: int) -> str:
    stem = Path(e.rel).name
    if fmt is Format.ONNX:
        return f"export/{stem[:-len('.onnx')]}-int8.onnx"
    return f"export/{stem[:-len(f'-b{batch}.tflite')]}-int8-b{batch}.tflite"


def _layouts(e: ExportEntry, cfg: QuantizeConfig) -> list[Layout]:
    return [cfg.layout] + ([Layout.NAIVE] if cfg.compare_naive and e.graph is Graph.DAFAR else [])


def _layout_path(dst: Path, layout: Layout, cfg: QuantizeConfig) -> Path:
    return dst if layout is cfg.layout else dst.with_name(f"naive-{dst.name}")


def _start_conversions(jobs, cfg: QuantizeConfig, run: RunFolder, imgs: _Images, sources: _Sources, staging: Path,
                       conversions) -> None:
    """Every int8 TFLite file's conversion, started now in the background (each a child process;
    the source ONNX built here, with torch, in this thread); :func:`_convert` waits for each."""
    from .tflite_quant import quantize_tflite

    for fmt, e in jobs:
        if fmt is not Format.TFLITE:
            continue
        dst = staging / Path(_int8_rel(fmt, e, cfg.tflite_batch)).name
        calib_x = e.contract.from_pixels(imgs.calib_u8)
        check_calibration(calib_x, e.contract, run.chw)
        for layout in _layouts(e, cfg):
            conversions.submit((e.rel, layout), quantize_tflite, sources.get(e, cfg.tflite_batch),
                               _layout_path(dst, layout, cfg), contract=e.contract.value, batch=cfg.tflite_batch,
                               input_chw=run.chw, output_names=e.output_names, calib=calib_x, layout=layout,
                               work_dir=staging)


def _convert(fmt: Format, e: ExportEntry, out: Path, imgs: _Images, layout: Layout, cfg: QuantizeConfig,
             run: RunFolder, staging: Path, conversions) -> dict:
    from .onnx_quant import quantize_onnx

    if fmt is Format.TFLITE:
        return conversions.result((e.rel, layout))  # started (calibration checked) by _start_conversions
    calib_x = e.contract.from_pixels(imgs.calib_u8)  # the exported float graph itself, quantized here
    check_calibration(calib_x, e.contract, run.chw)
    return quantize_onnx(run.path / e.rel, out, calib_x, layout, cfg.activation_type.value, work_dir=staging,
                         weight_bits=cfg.onnx_weights.bits)


def _evaluate(e: ExportEntry, out: Path, layout: Layout, cfg: QuantizeConfig, run: RunFolder, imgs: _Images,
              f_test: dict, ref_run, scores: dict, rel: str) -> dict:
    """Recalibrate (defence graphs), then compare one int8 file with its float source."""
    x_val, x_test = e.contract.from_pixels(imgs.val_u8), e.contract.from_pixels(imgs.test_u8)
    # the naive layout is a comparison, not a product: a subset of the images is enough
    n_val, n_test = (len(x_val), len(x_test)) if layout is cfg.layout else (2000, 2000)
    q_run = _runner(out)
    alpha_q = thresholds = None
    record_val = {}
    if e.graph is Graph.DAFAR:
        # alpha first (validation scores), written into the graph, then the test set once
        q_val = q_run(x_val[:n_val])["score"]
        if not np.all(np.isfinite(q_val)):
            raise QuantizationError(f"{rel}: the int8 model gives non-finite scores on clean validation images")
        rules = run.manifest["thresholds"][e.detector.value]["rules"]
        alpha_q = _recalibrate(q_val, q_val, {e.threshold_rule: rules[e.threshold_rule]})[e.threshold_rule]["alpha"]
        record_val = {"int8_val_score_mean": float(q_val.mean())}
        if layout is not Layout.NAIVE:  # (naive: the comparison constant is int8 too; judged in numpy)
            _set_alpha(out, alpha_q)
            q_run = _runner(out)
    q_test = q_run(x_test[:n_test])
    if e.graph is Graph.DAFAR:
        thresholds = _recalibrate(q_val, q_test["score"], rules)  # every rule, with its test FPR
        scores[f"{Path(rel).name}|float"] = f_test["score"].astype(np.float32)
        scores[f"{Path(rel).name}|{layout.value}"] = q_test["score"].astype(np.float32)
    f_sub = {k: v[:n_test] for k, v in f_test.items()}
    rep = _compare(f_sub, q_test, imgs.test_y[:n_test], e.alpha, alpha_q)
    if layout is Layout.NAIVE:
        rep.pop("decision_follows_alpha", None)
    rep.update(record_val)
    if e.graph is Graph.DAFAR and e.contract is InputContract.FLOAT_NCHW:
        rep["nan_input_rejected"] = _nan_rejected(q_run, run.chw)
    if imgs.adversarial and e.graph is Graph.DAFAR:
        rep["adversarial"] = _adversarial(ref_run, q_run, imgs.adversarial, e.contract, e.alpha, alpha_q)
    rep["size_bytes"] = out.stat().st_size
    rep["float_size_bytes"] = (run.path / e.rel).stat().st_size
    rep["size_ratio"] = rep["size_bytes"] / rep["float_size_bytes"]
    return {"validation": rep, "alpha": alpha_q, "thresholds": thresholds}


def _quantize_one(fmt: Format, e: ExportEntry, cfg: QuantizeConfig, run: RunFolder, imgs: _Images, conversions,
                  staging: Path, host: dict, scores: dict) -> tuple[str, dict]:
    """Build, recalibrate, check one int8 file in ``staging``; returns its relative path and manifest entry."""
    from .onnx_quant import onnx_layer_errors
    from .tflite_quant import tflite_layer_errors

    t0 = time.perf_counter()
    rel = _int8_rel(fmt, e, cfg.tflite_batch)
    dst = staging / Path(rel).name
    built = {}
    for layout in _layouts(e, cfg):
        out = _layout_path(dst, layout, cfg)
        built[layout] = (out, _convert(fmt, e, out, imgs, layout, cfg, run, staging, conversions))
    ref_run = _runner(run.path / e.rel)
    f_test = ref_run(e.contract.from_pixels(imgs.test_u8))
    record = {layout: {"info": info, **_evaluate(e, out, layout, cfg, run, imgs, f_test, ref_run, scores, rel)}
              for layout, (out, info) in built.items()}
    main = record[cfg.layout]
    rep = main["validation"]
    if e.graph is Graph.DAFAR and e.contract is InputContract.FLOAT_NCHW and not rep.get("nan_input_rejected"):
        raise QuantizationError(f"{rel}: an image holding NaN was accepted; the int8 graph must fail closed")
    hint = ""
    if fmt is Format.ONNX and cfg.onnx_weights is OnnxWeights.INT8 and host["onnx_int8_saturation_risk"]:
        hint = (" (this x86 CPU has no VNNI: ONNX Runtime's int8 kernels saturate with full-range weights; "
                "use --onnx-weights int7, the default)")
    _check(rep, cfg.checks, rel, hint)
    # where the error comes from: the worst tensors on 64 validation images
    xs = e.contract.from_pixels(imgs.val_u8[:64])
    if fmt is Format.ONNX:
        layers = onnx_layer_errors(run.path / e.rel, dst, xs, staging)
    else:
        layers = tflite_layer_errors(run.path / e.rel, dst, xs)
    entry = {k: v for k, v in e.raw.items() if k not in ("validation", "ops", "seconds", "opset")}
    entry.update({
        "precision": "int8", "layout": cfg.layout.value, "source": e.rel, "alpha": main["alpha"],
        "alpha_float": e.alpha, "thresholds_int8": main["thresholds"],
        "calibration": imgs.calib_record, "quantization": {k: v for k, v in main["info"].items() if k not in ("ops", "min_runtime")},
        "validation": rep, "layer_errors": layers, "seconds": round(time.perf_counter() - t0, 2),
    })
    if fmt is Format.ONNX:
        from dafar.export.onnx_export import onnx_op_counts

        entry["ops"] = onnx_op_counts(dst)
        entry["input"] = input_spec(e.contract, run.chw, "N")
        entry["outputs"] = output_specs(e.output_names, "N", run.num_classes)
    else:
        from dafar.runtime.backends import LiteRTRunner

        entry["ops"] = main["info"].get("ops", {})
        entry["input"] = input_spec(e.contract, run.chw, cfg.tflite_batch)
        io = LiteRTRunner(dst).signature()  # what the int8 file itself declares (label int32)
        entry["outputs"] = [{"name": n, **io["outputs"][n]} for n in e.output_names]
        entry["min_runtime"] = main["info"].get("min_runtime", {})
    if Layout.NAIVE in record:
        entry["naive_comparison"] = {"validation": record[Layout.NAIVE]["validation"],
                                     "alpha": record[Layout.NAIVE]["alpha"],
                                     "float_nodes": record[Layout.NAIVE]["info"].get("float_nodes", 0)}
    return rel, entry


def _save_scores(run: RunFolder, scores: dict, test_y: np.ndarray, dst: Path | None = None) -> None:
    """Clean test scores, float and int8, for the report's plots (merged with an earlier call's),
    written to ``dst`` (a staging file) or straight into the run folder."""
    old = {}
    if (run.path / SCORES).is_file() and SCORES in run.manifest.get("files", {}):
        with np.load(run.path / SCORES, allow_pickle=False) as z:
            old = {k: z[k] for k in z.files}
    buf = io.BytesIO()
    # an earlier call's file holds test_labels too: merged, not passed twice (a second
    # `dafar quantize`, e.g. --format onnx after --format tflite, failed here)
    np.savez_compressed(buf, **{**old, **scores, "test_labels": test_y})
    atomic_write_bytes(dst or run.path / SCORES, buf.getvalue())


def quantize_run(run_dir: str | os.PathLike, cfg: QuantizeConfig = QuantizeConfig(), *, data_dir=None,
                 log=print) -> dict:
    """Quantize, recalibrate, check and register int8 models; returns the new manifest entries."""
    from tqdm.auto import tqdm

    run = RunFolder.open(run_dir)
    host = _host()  # read once: recorded in the manifest, and named in an int8 ONNX check's failure
    jobs = _jobs(run, cfg)
    imgs = _images(run, cfg, jobs, data_dir, log)
    entries: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}
    from dafar.export.tflite_export import BackgroundConversions

    # (the conversions' `with` is the inner one: it waits for them before staging is cleaned up)
    with run.staging("quantize", log) as staging, BackgroundConversions() as conversions:
        _start_conversions(jobs, cfg, run, imgs, _Sources(run, staging), staging, conversions)
        # ONNX files first: their quantization and checks run here while the TFLite conversions
        # run in the background; the manifest keeps the jobs' order
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][0] is Format.TFLITE)
        done: dict[int, tuple[str, dict]] = {}
        bar = tqdm(order, desc="quantize", unit="model", leave=False)
        for i in bar:
            fmt, e = jobs[i]
            bar.set_postfix_str(Path(_int8_rel(fmt, e, cfg.tflite_batch)).name)
            done[i] = _quantize_one(fmt, e, cfg, run, imgs, conversions, staging, host, scores)
            log(f"{done[i][0]}: {_summary(done[i][1]['validation'])}")
        entries.update(done[i] for i in range(len(jobs)))
        # every model passed: everything that can still fail is written to staging first, then
        # moved into place and registered (a failure between the two left files that did not
        # match the manifest)
        _save_scores(run, scores, imgs.test_y, staging / SCORES)
        for rel in entries:
            run.place(staging / Path(rel).name, rel)
        run.place(staging / SCORES, SCORES)
        run.register({SCORES: {"role": "scores"},
                      **{rel: {"role": "export", "format": e["format"], "graph": e["graph"], "precision": "int8"}
                         for rel, e in entries.items()}},
                     tables={"exports": entries},
                     fields={"quantize_config": {
                         "layout": cfg.layout.value, "calib_images": cfg.calib_images, "calib_seed": cfg.calib_seed,
                         "activation_type_onnx": cfg.activation_type.value, "onnx_weights": cfg.onnx_weights.value,
                         "checked_on": host, "checks": asdict(cfg.checks), "attack_images": cfg.attack_images}})
    return entries


def quantize(run_dir: str | os.PathLike, cfg: QuantizeConfig = QuantizeConfig(), *, data_dir=None,
             log=print) -> QuantizeResult:
    """``dafar quantize``: :func:`quantize_run`, then the float-vs-int8 report (``quantize_report.md``)."""
    from .report import write_quantize_report

    entries = quantize_run(run_dir, cfg, data_dir=data_dir, log=log)
    return QuantizeResult(Path(run_dir), entries, write_quantize_report(run_dir))


def _rule_params(rule: dict) -> dict:
    if rule["rule"] == ThresholdRule.MEAN_ZSTD.value:
        return {"z": rule["z"]}
    return {"target_fpr": rule["target_fpr"]}


def _recalibrate(val_scores: np.ndarray, test_scores: np.ndarray, float_rules: dict) -> dict:
    out = {}
    for key, rule in float_rules.items():
        th = calibrate(val_scores, rule["rule"], **_rule_params(rule))
        out[key] = {**th.to_dict(), "test_fpr": false_positive_rate(test_scores, th.alpha)}
    return out


def _compare(f: dict, q: dict, labels: np.ndarray, alpha_f: float | None, alpha_q: float | None) -> dict:
    """Float vs int8 on the same images."""
    r: dict = {"images": int(len(labels))}
    r["victim_label_agreement"] = float(np.mean(f["logits"].argmax(1) == q["logits"].argmax(1)))
    r["victim_acc_float"] = float(np.mean(f["logits"].argmax(1) == labels))
    r["victim_acc_int8"] = float(np.mean(q["logits"].argmax(1) == labels))
    if "score" in f:
        r["label_agreement"] = float(np.mean(f["label"] == q["label"]))
        r["purified_acc_float"] = float(np.mean(f["label"] == labels))
        r["purified_acc_int8"] = float(np.mean(q["label"] == labels))
        sf, sq = f["score"].astype(np.float64), q["score"].astype(np.float64)
        ok = np.isfinite(sf) & np.isfinite(sq)
        r["score_correlation"] = float(np.corrcoef(sf[ok], sq[ok])[0, 1])
        rel = np.abs(sq[ok] - sf[ok]) / np.maximum(np.abs(sf[ok]), 1e-9)
        r["score_rel_err_mean"] = float(rel.mean())
        r["score_rel_err_p99"] = float(np.quantile(rel, 0.99))
        r["score_ratio_median"] = float(np.median(sq[ok] / np.maximum(sf[ok], 1e-9)))
        rf, rq = rejects(sf, alpha_f), rejects(sq, alpha_q)
        r["decision_agreement"] = float(np.mean(rf == rq))
        r["fpr_float"] = float(np.mean(rf))
        r["fpr_int8"] = float(np.mean(rq))
        # the exported decision itself must follow the recalibrated alpha (patched correctly)
        r["decision_follows_alpha"] = bool(np.array_equal(np.asarray(q["rejected"]).astype(bool), rq))
    else:
        r["label_agreement"] = r["victim_label_agreement"]
    return r


def _host() -> dict:
    """The CPU the float-vs-int8 checks ran on: ONNX Runtime's int8 results depend on it."""
    import platform

    from dafar.runtime.cpu import int8_saturation_risk

    return {"machine": platform.machine(), "platform": platform.platform(),
            "onnx_int8_saturation_risk": int8_saturation_risk()}


def _check(r: dict, checks: Checks, what: str, hint: str = "") -> None:
    fails = []
    if r["label_agreement"] < checks.min_label_agreement:
        fails.append(f"top-1 agreement with float {100 * r['label_agreement']:.2f}% < {100 * checks.min_label_agreement:.2f}%")
    for k in ("victim", "purified"):
        if f"{k}_acc_float" in r and r[f"{k}_acc_float"] - r[f"{k}_acc_int8"] > checks.max_accuracy_drop:
            fails.append(f"{k} accuracy fell from {100 * r[f'{k}_acc_float']:.2f}% to {100 * r[f'{k}_acc_int8']:.2f}% "
                         f"(> {100 * checks.max_accuracy_drop:.2f} points)")
    if "decision_agreement" in r:
        if r["decision_agreement"] < checks.min_decision_agreement:
            fails.append(f"reject decisions agree with float on {100 * r['decision_agreement']:.2f}% of clean test "
                         f"images < {100 * checks.min_decision_agreement:.2f}%")
        if not (r["score_correlation"] >= checks.min_score_correlation):
            fails.append(f"score correlation with float {r['score_correlation']:.4f} < {checks.min_score_correlation}")
        if not r["decision_follows_alpha"]:
            fails.append("the model's reject output does not follow the recalibrated alpha written into it")
    if fails:
        raise QuantizationError(f"{what}: " + "; ".join(fails) + hint)


def _nan_rejected(run, chw) -> bool:
    x = np.random.default_rng(0).random((2, *chw), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1] = np.inf
    return bool(np.asarray(run(x)["rejected"]).all())



def _set_alpha(path: Path, alpha: float) -> None:
    from .graphs import set_alpha_onnx, set_alpha_tflite

    (set_alpha_onnx if path.suffix == ".onnx" else set_alpha_tflite)(path, alpha)


def _adversarial(ref_run, q_run, sets, contract: InputContract, alpha_f: float, alpha_q: float) -> dict:
    """Detection on adversarial images, float vs int8 (images rounded to pixels for uint8 inputs)."""
    out = {}
    for s in sets:
        x = contract.from_unit(s.x_adv)
        f, q = ref_run(x), q_run(x)
        rf, rq = rejects(f["score"], alpha_f), rejects(q["score"], alpha_q)
        out[s.spec.key] = {"images": int(len(x)), "detection_float": float(rf.mean()), "detection_int8": float(rq.mean()),
                           "decision_agreement": float(np.mean(rf == rq)),
                           "purified_acc_float": float(np.mean(f["label"] == s.labels)),
                           "purified_acc_int8": float(np.mean(q["label"] == s.labels))}
    return out


def _summary(r: dict) -> str:
    parts = [f"top-1 agree {100 * r['label_agreement']:.2f}%"]
    if "decision_agreement" in r:
        parts.append(f"decisions agree {100 * r['decision_agreement']:.2f}%")
        parts.append(f"score corr {r['score_correlation']:.4f}")
        parts.append(f"FPR {100 * r['fpr_float']:.2f}% -> {100 * r['fpr_int8']:.2f}%")
    parts.append(f"size {100 * r['size_ratio']:.0f}% of float")
    return ", ".join(parts)
