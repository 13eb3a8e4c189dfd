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
passed; the manifest's ``exports`` table then holds them with ``precision: int8``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, ManifestError, QuantizationError
from dafar.manifest import file_entry, get_field, load_manifest, read_manifest, write_manifest
from dafar.threshold import ThresholdRule, calibrate, false_positive_rate, rejects

from .layout import Layout

__all__ = ["QuantizeConfig", "quantize_run", "Checks", "OnnxWeights", "SCORES"]

SCORES = "quantize_scores.npz"


def _enum_tuple(values, enum, name):
    from dafar.export.api import _enum_tuple as et

    return et(values, enum, name)


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


@dataclass(frozen=True)
class Checks:
    """What an int8 model must keep, measured against its float source on the test set."""

    min_label_agreement: float = 0.99  # top-1 (purified label for the defence, victim label otherwise)
    max_accuracy_drop: float = 0.005  # victim and purified accuracy, absolute
    min_decision_agreement: float = 0.99  # reject decisions, float alpha vs recalibrated int8 alpha
    min_score_correlation: float = 0.95  # Pearson, int8 score vs float score

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ConfigError(f"{k} must lie in [0, 1], got {v!r}")


@dataclass(frozen=True)
class QuantizeConfig:
    formats: tuple = ("onnx", "tflite")
    detectors: tuple | None = None  # None: every detector with a float export
    contracts: tuple | None = None  # None: every input contract with a float export
    layout: Layout = Layout.PRECISE
    calib_images: int = 256
    calib_seed: int = 0
    victim: bool = True  # also quantize the victim-only graphs (for the benchmark)
    validate_images: int | None = None  # test images for the checks; None = all
    activation_type: str = "uint8"  # ONNX Runtime activations (uint8 suits x86; int8 suits ARM)
    onnx_weights: OnnxWeights = OnnxWeights.INT7  # see OnnxWeights: the range that is safe on every CPU
    tflite_batch: int = 1
    compare_naive: bool = True  # evaluate the naive full-int8 layout for the report (never written)
    checks: Checks = Checks()

    def __post_init__(self):
        from dafar.export.api import Format
        from dafar.export.fused import Detector, InputContract

        object.__setattr__(self, "formats", _enum_tuple(self.formats, Format, "format"))
        if self.detectors is not None:
            object.__setattr__(self, "detectors", _enum_tuple(self.detectors, Detector, "detector"))
        if self.contracts is not None:
            object.__setattr__(self, "contracts", _enum_tuple(self.contracts, InputContract, "input contract"))
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            raise ConfigError(f"unknown layout {self.layout!r}; choose from: {', '.join(l.value for l in Layout)}") from None
        if self.layout is Layout.NAIVE:
            raise ConfigError("the naive layout quantizes the detector's score and is only evaluated for comparison "
                              "(compare_naive); choose mixed or precise")
        if not isinstance(self.calib_images, int) or isinstance(self.calib_images, bool) or self.calib_images < 16:
            raise ConfigError(f"calib_images must be an integer >= 16 (too few images give unstable int8 ranges), "
                              f"got {self.calib_images!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise ConfigError(f"activation_type must be uint8 or int8, got {self.activation_type!r}")
        try:
            object.__setattr__(self, "onnx_weights", OnnxWeights(self.onnx_weights))
        except ValueError:
            raise ConfigError(f"onnx_weights must be int7 or int8, got {self.onnx_weights!r}") from None
        if self.validate_images is not None and (not isinstance(self.validate_images, int) or self.validate_images < 10):
            raise ConfigError(f"validate_images must be None (all) or an integer >= 10, got {self.validate_images!r}")
        if not isinstance(self.tflite_batch, int) or not 1 <= self.tflite_batch <= 1024:
            raise ConfigError(f"tflite_batch must be an integer in 1..1024, got {self.tflite_batch!r}")


# ---------------------------------------------------------------- data
def _splits(manifest: dict, data_dir):
    from dafar.data import load_dataset

    ds = get_field(manifest, "dataset.name")
    src = manifest.get("dataset", {}).get("source", "")
    if data_dir is None and ds != "mnist" and not src.startswith("vendored"):
        data_dir = src
    vs = manifest["dataset"]["val_split"]
    return load_dataset(ds, data_dir, val_size=int(vs["size"]), seed=int(vs["seed"]))


def default_attack_specs(dataset: str) -> list:
    """The gray-box sets the float-vs-int8 detection comparison uses: the L-inf budgets that matter
    for each data set (MNIST 0.1-0.3; CIFAR-10 2/255-16/255, where 0.1 would be a visible smear)."""
    from dafar.bench.attacks import spec_from_string

    eps = ("0.1", "0.2", "0.3") if dataset == "mnist" else tuple(f"{k / 255!r}" for k in (2, 8, 16))
    return [spec_from_string(f"{a}@{e}") for a in ("fgsm", "pgd") for e in eps]


def calibration_images(train_u8: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n > len(train_u8):
        raise ConfigError(f"asked for {n} calibration images, the training split has {len(train_u8)}")
    idx = np.sort(np.random.default_rng([seed, 31]).choice(len(train_u8), n, replace=False))
    return train_u8[idx], idx


def check_calibration(x: np.ndarray, contract: str, chw) -> None:
    """Calibration data must match the model input: clear errors for shape, dtype and range."""
    c, h, w = chw
    want = (h, w, c) if contract == "uint8-nhwc" else (c, h, w)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ConfigError(f"calibration data of shape {x.shape} does not fit the {contract} input (N, {', '.join(map(str, want))})")
    if len(x) < 16:
        raise ConfigError(f"{len(x)} calibration images are too few; at least 16 are needed (256 recommended)")
    if contract == "uint8-nhwc" and x.dtype != np.uint8:
        raise ConfigError(f"calibration data for a uint8 input must be uint8, got {x.dtype}")
    if contract != "uint8-nhwc":
        if x.dtype != np.float32:
            raise ConfigError(f"calibration data for a float input must be float32, got {x.dtype}")
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise ConfigError("calibration data for a float input must be finite and lie in [0, 1]")


def _contract_input(u8_nchw: np.ndarray, contract: str) -> np.ndarray:
    if contract == "uint8-nhwc":
        return np.ascontiguousarray(u8_nchw.transpose(0, 2, 3, 1))
    return u8_nchw.astype(np.float32) / 255.0


# ---------------------------------------------------------------- running models
def _runner(path: Path):
    """x -> outputs by name, for an .onnx or .tflite file (ONNX Runtime or LiteRT, two threads)."""
    if path.suffix == ".onnx":
        from dafar.export.onnx_export import ort_session, run_onnx

        sess = ort_session(path, threads=2)
        return lambda x: run_onnx(sess, x)
    from dafar.export.tflite_export import run_tflite, tflite_interpreter

    interp = tflite_interpreter(path, threads=2)
    return lambda x: run_tflite(interp, x)


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


# ---------------------------------------------------------------- the stage
def quantize_run(run_dir: str | os.PathLike, cfg: QuantizeConfig = QuantizeConfig(), *, data_dir=None,
                 log=print, attack_images: int = 200, attack_specs: list | None = None) -> dict:
    """Quantize, recalibrate, check and register int8 models; returns the new manifest entries."""
    import torch
    from tqdm.auto import tqdm

    from dafar.export.api import Format, _input_spec, _output_specs
    from dafar.export.fused import OUTPUT_NAMES, VICTIM_OUTPUT_NAMES, FusedDafar, InputContract, VictimGraph
    from dafar.export.onnx_export import export_onnx
    from dafar.train.loading import load_dafar

    from .onnx_quant import onnx_layer_errors, quantize_onnx
    from .tflite_quant import quantize_tflite, tflite_layer_errors

    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    host = _host()  # read once: recorded in the manifest, and named in an int8 ONNX check's failure
    exports = manifest.get("exports", {})
    floats = {rel: e for rel, e in exports.items() if e.get("precision", "float32") == "float32"}
    if not floats:
        raise ManifestError(f"{run_dir} has no float exports to quantize: run `dafar export {run_dir}` first")
    jobs = []  # (format, graph, detector, contract, float rel)
    for rel, e in floats.items():
        fmt = Format(e["format"])
        if fmt not in cfg.formats:
            continue
        if e["graph"] == "victim" and not cfg.victim:
            continue
        if e["format"] == "tflite" and e.get("batch") != cfg.tflite_batch:
            continue
        if e["graph"] == "dafar" and cfg.detectors is not None and e["detector"] not in [d.value for d in cfg.detectors]:
            continue
        if cfg.contracts is not None and e["contract"] not in [c.value for c in cfg.contracts]:
            continue
        jobs.append((fmt, e["graph"], e.get("detector"), e["contract"], rel))
    if not jobs:
        raise ManifestError(
            f"{run_dir} has no float export matching formats={[f.value for f in cfg.formats]}, "
            f"detectors={cfg.detectors and [d.value for d in cfg.detectors]}, contracts={cfg.contracts and [c.value for c in cfg.contracts]}"
            f", tflite batch {cfg.tflite_batch}: export those first (dafar export)")
    chw = tuple(get_field(manifest, "input.shape", run_dir))
    norm = get_field(manifest, "input.normalization", run_dir)
    num_classes = int(get_field(manifest, "architecture.num_classes", run_dir))
    net, _ = load_dafar(run_dir, manifest)

    splits = _splits(manifest, data_dir)
    calib_u8, calib_idx = calibration_images(splits.train.images, cfg.calib_images, cfg.calib_seed)
    test = splits.test.sample(cfg.validate_images)  # the same class-mixed subset the exporter validated on
    val_u8, test_u8, test_y = splits.val.images, test.images, test.labels.astype(np.int64)
    calib_record = {"images": cfg.calib_images, "seed": cfg.calib_seed, "source": "training split (never validation or test)",
                    "indices_sha256": hashlib.sha256(calib_idx.astype(np.int64).tobytes()).hexdigest()}

    # adversarial images for the detection comparison (gray-box, against the float victim)
    adv_sets = []
    if attack_images and any(g == "dafar" for _, g, *_ in jobs):
        from dafar.bench.attacks import attack_sets, spec_from_string

        specs = attack_specs if attack_specs is not None else default_attack_specs(get_field(manifest, "dataset.name", run_dir))
        specs = [s if not isinstance(s, str) else spec_from_string(s) for s in specs]
        adv_sets = attack_sets(run_dir, specs, n=attack_images, data_dir=data_dir, log=log)
        manifest = load_manifest(run_dir)

    from dafar.manifest import clean_stale_staging

    for left in clean_stale_staging(run_dir):  # an earlier run of a stage was killed mid-way
        log(f"removed {left} (left by an interrupted run)")
    staging = Path(tempfile.mkdtemp(prefix=".staging-quantize-", dir=run_dir))
    entries: dict[str, dict] = {}
    scores: dict[str, np.ndarray] = {}  # clean test scores, float and int8, for the report's plots
    try:
        src_cache: dict[tuple, Path] = {}

        def float_source(graph, det, batch):
            """Static-batch float-NCHW ONNX of the graph, from the weights (what onnx2tf converts)."""
            key = (graph, det, batch)
            if key not in src_cache:
                if graph == "dafar":
                    fe = next(e for e in floats.values() if e["graph"] == "dafar" and e["detector"] == det)
                    mod = FusedDafar(net, fe["alpha"], det, "float-nchw", norm["mean"], norm["std"]).eval()
                    names = OUTPUT_NAMES
                else:
                    mod = VictimGraph(net, "float-nchw", norm["mean"], norm["std"]).eval()
                    names = VICTIM_OUTPUT_NAMES
                p = staging / f"src-{graph}-{det}-{batch}.onnx"
                export_onnx(mod, torch.zeros(batch, *chw), p, names, dynamic_batch=False)
                src_cache[key] = p
            return src_cache[key]

        bar = tqdm(jobs, desc="quantize", unit="model", leave=False)
        for fmt, graph, det, contract, frel in bar:
            t0 = time.perf_counter()
            fe = floats[frel]
            stem = Path(frel).name
            if fmt is Format.ONNX:
                rel = f"export/{stem[:-len('.onnx')]}-int8.onnx"
            else:
                rel = f"export/{stem[:-len(f'-b{cfg.tflite_batch}.tflite')]}-int8-b{cfg.tflite_batch}.tflite"
            bar.set_postfix_str(Path(rel).name)
            dst = staging / Path(rel).name
            calib_x = _contract_input(calib_u8, contract)
            check_calibration(calib_x, contract, chw)
            names = OUTPUT_NAMES if graph == "dafar" else VICTIM_OUTPUT_NAMES
            layouts = [cfg.layout] + ([Layout.NAIVE] if cfg.compare_naive and graph == "dafar" else [])
            result: dict = {}
            for layout in layouts:
                out = dst if layout is cfg.layout else staging / f"naive-{dst.name}"
                if fmt is Format.ONNX:  # the exported float graph itself
                    info = quantize_onnx(run_dir / frel, out, calib_x, layout, cfg.activation_type, work_dir=staging,
                                         weight_bits=cfg.onnx_weights.bits)
                else:
                    src = float_source(graph, det, cfg.tflite_batch)
                    info = quantize_tflite(src, out, contract=contract, batch=cfg.tflite_batch, input_chw=chw,
                                           output_names=names, calib=calib_x, layout=layout, work_dir=staging)
                result[layout] = (out, info)

            ref_run = _runner(run_dir / frel)
            x_val, x_test = _contract_input(val_u8, contract), _contract_input(test_u8, contract)
            f_test = ref_run(x_test)
            record: dict = {}
            for layout, (out, info) in result.items():
                # the naive layout is a comparison, not a product: a subset of the images is enough
                n_val, n_test = (len(x_val), len(x_test)) if layout is cfg.layout else (2000, 2000)
                q_run = _runner(out)
                alpha_q = thresholds = None
                record_val = {}
                if graph == "dafar":
                    # alpha first (validation scores), written into the graph, then the test set once
                    key = "autoencoder" if det == "autoencoder" else "l2"
                    q_val = q_run(x_val[:n_val])["score"]
                    if not np.all(np.isfinite(q_val)):
                        raise QuantizationError(f"{rel}: the int8 model gives non-finite scores on clean validation images")
                    rules = manifest["thresholds"][key]["rules"]
                    alpha_q = _recalibrate(q_val, q_val, {fe["threshold_rule"]: rules[fe["threshold_rule"]]})[
                        fe["threshold_rule"]]["alpha"]
                    record_val = {"int8_val_score_mean": float(q_val.mean())}
                    if layout is not Layout.NAIVE:  # (naive: the comparison constant is int8 too; judged in numpy)
                        _set_alpha(out, alpha_q)
                        q_run = _runner(out)
                q_test = q_run(x_test[:n_test])
                if graph == "dafar":
                    thresholds = _recalibrate(q_val, q_test["score"], rules)  # every rule, with its test FPR
                    scores[f"{Path(rel).name}|float"] = f_test["score"].astype(np.float32)
                    scores[f"{Path(rel).name}|{layout.value}"] = q_test["score"].astype(np.float32)
                f_sub = {k: v[:n_test] for k, v in f_test.items()}
                rep = _compare(f_sub, q_test, test_y[:n_test], fe.get("alpha"), alpha_q)
                if layout is Layout.NAIVE:
                    rep.pop("decision_follows_alpha", None)
                rep.update(record_val)
                if graph == "dafar" and contract == "float-nchw":
                    rep["nan_input_rejected"] = _nan_rejected(q_run, chw)
                if adv_sets and graph == "dafar":
                    rep["adversarial"] = _adversarial(ref_run, q_run, adv_sets, contract, fe["alpha"], alpha_q)
                rep["size_bytes"] = out.stat().st_size
                rep["float_size_bytes"] = (run_dir / frel).stat().st_size
                rep["size_ratio"] = rep["size_bytes"] / rep["float_size_bytes"]
                record[layout] = {"info": info, "validation": rep, "alpha": alpha_q, "thresholds": thresholds}
            main = record[cfg.layout]
            rep = main["validation"]
            if graph == "dafar" and contract == "float-nchw" and not rep.get("nan_input_rejected"):
                raise QuantizationError(f"{rel}: an image holding NaN was accepted; the int8 graph must fail closed")
            hint = ""
            if fmt is Format.ONNX and cfg.onnx_weights is OnnxWeights.INT8 and host["onnx_int8_saturation_risk"]:
                hint = (" (this x86 CPU has no VNNI: ONNX Runtime's int8 kernels saturate with full-range weights; "
                        "use --onnx-weights int7, the default)")
            _check(rep, cfg.checks, rel, hint)
            # where the error comes from: the worst tensors on 64 validation images
            xs = _contract_input(val_u8[:64], contract)
            if fmt is Format.ONNX:
                layers = onnx_layer_errors(run_dir / frel, dst, xs, staging)
            else:
                layers = tflite_layer_errors(run_dir / frel, dst, xs)
            entry = {k: v for k, v in fe.items() if k not in ("validation", "ops", "seconds", "opset")}
            entry.update({
                "precision": "int8", "layout": cfg.layout.value, "source": frel, "alpha": main["alpha"],
                "alpha_float": fe.get("alpha"), "thresholds_int8": main["thresholds"],
                "calibration": calib_record, "quantization": {k: v for k, v in main["info"].items() if k != "ops"},
                "validation": rep, "layer_errors": layers, "seconds": round(time.perf_counter() - t0, 2),
            })
            if fmt is Format.ONNX:
                from dafar.export.onnx_export import onnx_op_counts

                entry["ops"] = onnx_op_counts(dst)
                entry["input"] = _input_spec(InputContract(contract), chw, "N")
                entry["outputs"] = _output_specs(names, "N", num_classes)
            else:
                entry["ops"] = main["info"].get("ops", {})
                entry["input"] = _input_spec(InputContract(contract), chw, cfg.tflite_batch)
            if Layout.NAIVE in record:
                entry["naive_comparison"] = {"validation": record[Layout.NAIVE]["validation"],
                                             "alpha": record[Layout.NAIVE]["alpha"],
                                             "float_nodes": record[Layout.NAIVE]["info"].get("float_nodes", 0)}
            entries[rel] = entry
            log(f"{rel}: {_summary(rep)}")
        # every model passed: move into place and register
        (run_dir / "export").mkdir(exist_ok=True)
        for rel in entries:
            os.replace(staging / Path(rel).name, run_dir / rel)
        import io

        from dafar.manifest import atomic_write_bytes

        man = read_manifest(run_dir)
        old = {}
        if (run_dir / SCORES).is_file() and SCORES in man.get("files", {}):
            with np.load(run_dir / SCORES, allow_pickle=False) as z:
                old = {k: z[k] for k in z.files}
        buf = io.BytesIO()
        np.savez_compressed(buf, **{**old, **scores}, test_labels=test_y)
        atomic_write_bytes(run_dir / SCORES, buf.getvalue())
        files, table = dict(man.get("files", {})), dict(man.get("exports", {}))
        files[SCORES] = file_entry(run_dir, SCORES, "scores")
        for rel, entry in entries.items():
            files[rel] = file_entry(run_dir, rel, "export", format=entry["format"], graph=entry["graph"], precision="int8")
            table[rel] = entry
        man["files"], man["exports"] = files, table
        man["quantize_config"] = {"layout": cfg.layout.value, "calib_images": cfg.calib_images, "calib_seed": cfg.calib_seed,
                                  "activation_type_onnx": cfg.activation_type, "onnx_weights": cfg.onnx_weights.value,
                                  "checked_on": host, "checks": asdict(cfg.checks),
                                  "attack_images": attack_images}
        write_manifest(run_dir, man)
        return entries
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _set_alpha(path: Path, alpha: float) -> None:
    from .graphs import set_alpha_onnx, set_alpha_tflite

    (set_alpha_onnx if path.suffix == ".onnx" else set_alpha_tflite)(path, alpha)


def _adversarial(ref_run, q_run, sets, contract: str, alpha_f: float, alpha_q: float) -> dict:
    """Detection on adversarial images, float vs int8 (images rounded to pixels for uint8 inputs)."""
    out = {}
    for s in sets:
        x = s.x_adv
        if contract == "uint8-nhwc":
            x = np.rint(x * 255.0).astype(np.uint8).transpose(0, 2, 3, 1).copy()
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
