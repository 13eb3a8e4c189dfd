"""``dafar export``: the fused defence (and the victim alone) to ONNX and TFLite, each file
validated against torch on real test images before it is added to the run folder.

Files land in ``RUN/export/``::

    dafar-<detector>-<contract>.onnx           dynamic batch
    dafar-<detector>-<contract>-b<N>.tflite    fixed batch N (1 by default), signature serving_default
    victim-<contract>.onnx / victim-<contract>-b<N>.tflite

and the manifest gains an ``exports`` table (format, detector, contract, alpha and its rule,
input/output specs, op counts, validation figures) plus their sha256 in ``files``.  Everything is
built in a staging folder inside the run folder and moved into place only after every file
passed its checks, so a failed or interrupted export leaves the run folder as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, ManifestError
from dafar.manifest import file_entry, get_field, load_manifest, write_manifest

from .fused import OUTPUT_NAMES, VICTIM_OUTPUT_NAMES, Detector, InputContract
from .validate import Tolerance

__all__ = ["Format", "ExportConfig", "export_run", "alpha_for", "test_images"]


class Format(str, Enum):
    ONNX = "onnx"
    TFLITE = "tflite"


def _enum_tuple(values, enum, name):
    out = []
    for v in values:
        try:
            out.append(enum(v))
        except ValueError:
            raise ConfigError(f"unknown {name} {v!r}; choose from: {', '.join(e.value for e in enum)}") from None
    if not out:
        raise ConfigError(f"at least one {name} is needed")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[Format, ...] = (Format.ONNX, Format.TFLITE)
    detectors: tuple[Detector, ...] = (Detector.L2,)
    contracts: tuple[InputContract, ...] = (InputContract.FLOAT_NCHW,)
    tflite_batches: tuple[int, ...] = (1,)
    threshold_rule: str | None = None  # a rule key of the manifest; None = the detector's default
    validate_images: int | None = 2000  # test images for the parity check; None = the whole test set
    victim: bool = True  # also export F(E(x)) alone
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __post_init__(self):
        object.__setattr__(self, "formats", _enum_tuple(self.formats, Format, "format"))
        object.__setattr__(self, "detectors", _enum_tuple(self.detectors, Detector, "detector"))
        object.__setattr__(self, "contracts", _enum_tuple(self.contracts, InputContract, "input contract"))
        batches = tuple(dict.fromkeys(self.tflite_batches))
        if not batches or any(not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 1024 for b in batches):
            raise ConfigError(f"tflite batch sizes must be integers in 1..1024, got {self.tflite_batches!r}")
        object.__setattr__(self, "tflite_batches", batches)
        if self.validate_images is not None and (not isinstance(self.validate_images, int) or self.validate_images < 1):
            raise ConfigError(f"validate_images must be a positive integer or None (all), got {self.validate_images!r}")


def alpha_for(manifest: dict, detector: Detector, rule: str | None, run_dir=None) -> tuple[float, str]:
    """(alpha, rule key) for ``detector`` from the manifest, with errors naming what is missing."""
    key = "autoencoder" if detector is Detector.AUTOENCODER else "l2"
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


def test_images(manifest: dict, data_dir=None, limit: int | None = None):
    """uint8 NCHW test images and labels of the run's data set."""
    from dafar.data import load_dataset

    ds = get_field(manifest, "dataset.name")
    src = manifest.get("dataset", {}).get("source", "")
    if data_dir is None and not src.startswith("vendored") and ds != "mnist":
        data_dir = src
    splits = load_dataset(ds, data_dir, val_size=2)
    test = splits.test.sample(limit)  # class-mixed: image-folder data sets are read class by class
    return test.images, test.labels


def _contract_input(u8: np.ndarray, contract: InputContract) -> np.ndarray:
    if contract is InputContract.UINT8_NHWC:
        return np.ascontiguousarray(u8.transpose(0, 2, 3, 1))
    return (u8.astype(np.float32) / 255.0)


def _torch_outputs(module, x: np.ndarray, names, batch_size: int = 500) -> dict[str, np.ndarray]:
    import torch

    outs: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            res = module(torch.from_numpy(np.array(x[i: i + batch_size])))  # copy: test arrays are read-only
            for n, r in zip(names, res):
                outs[n].append(r.numpy())
    return {n: np.concatenate(v) for n, v in outs.items()}


def _input_spec(contract: InputContract, chw, batch) -> dict:
    c, h, w = chw
    if contract is InputContract.UINT8_NHWC:
        return {"name": "x", "shape": [batch, h, w, c], "dtype": "uint8", "layout": "NHWC", "range": [0, 255]}
    return {"name": "x", "shape": [batch, c, h, w], "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0]}


def _output_specs(names, batch, num_classes) -> list[dict]:
    spec = {"label": ([batch], "int64"), "score": ([batch], "float32"), "rejected": ([batch], "bool"),
            "logits": ([batch, num_classes], "float32"), "purified_logits": ([batch, num_classes], "float32")}
    return [{"name": n, "shape": spec[n][0], "dtype": spec[n][1]} for n in names]


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx2tf", "tensorflow", "ai-edge-litert"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def export_run(run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(), *, data_dir=None,
               log=print) -> dict:
    """Export, validate and register every (graph, detector, contract, format) the config asks for."""
    from dafar.train.loading import load_dafar

    from .fused import FusedDafar, VictimGraph
    from .onnx_export import export_onnx, onnx_op_counts, ort_session, run_onnx
    from .validate import compare_outputs

    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)  # every file's hash checked before anything is built on it
    net, _ = load_dafar(run_dir, manifest)
    chw = tuple(get_field(manifest, "input.shape", run_dir))
    norm = get_field(manifest, "input.normalization", run_dir)
    num_classes = int(get_field(manifest, "architecture.num_classes", run_dir))
    unpool = get_field(manifest, "architecture.unpool", run_dir)
    if Format.TFLITE in cfg.formats and unpool != "mask":
        from dafar.errors import UnsupportedOpError

        raise UnsupportedOpError(
            f"{run_dir} was trained with --unpool {unpool}: MaxUnpool needs FlexMaxPoolWithArgmax on TFLite, which a "
            "stock LiteRT interpreter cannot run. Export it with --format onnx, or train with --unpool mask."
        )
    alphas = {d: alpha_for(manifest, d, cfg.threshold_rule, run_dir) for d in cfg.detectors}
    u8, labels = test_images(manifest, data_dir, cfg.validate_images)
    log(f"validating on {len(u8)} test images")

    jobs = []  # (graph kind, detector or None, contract)
    for contract in cfg.contracts:
        for det in cfg.detectors:
            jobs.append(("dafar", det, contract))
        if cfg.victim:
            jobs.append(("victim", None, contract))

    from dafar.manifest import clean_stale_staging

    for left in clean_stale_staging(run_dir):  # an earlier run of a stage was killed mid-way
        log(f"removed {left} (left by an interrupted run)")
    staging = Path(tempfile.mkdtemp(prefix=".staging-export-", dir=run_dir))
    entries: dict[str, dict] = {}
    try:
        for kind, det, contract in jobs:
            if kind == "dafar":
                alpha, rule = alphas[det]
                module = FusedDafar(net, alpha, det, contract, norm["mean"], norm["std"]).eval()
                names, stem = OUTPUT_NAMES, f"dafar-{det.value}-{contract.value}"
            else:
                module = VictimGraph(net, contract, norm["mean"], norm["std"]).eval()
                names, stem, alpha, rule = VICTIM_OUTPUT_NAMES, f"victim-{contract.value}", None, None
            x = _contract_input(u8, contract)
            ref = _torch_outputs(module, x, names)
            common = {"graph": kind, "detector": det.value if det else None, "contract": contract.value,
                      "alpha": alpha, "threshold_rule": rule, "num_classes": num_classes,
                      "normalization": norm, "tolerance": cfg.tolerance.to_dict()}
            import torch

            sample = torch.from_numpy(np.array(x[:2]))
            if Format.ONNX in cfg.formats:
                t0 = time.perf_counter()
                rel = f"export/{stem}.onnx"
                path = export_onnx(module, sample, staging / Path(rel).name, names, dynamic_batch=True)
                sess = ort_session(path)
                report = compare_outputs(ref, run_onnx(sess, x), cfg.tolerance, f"{rel} (ONNX Runtime)")
                if kind == "dafar" and contract is InputContract.FLOAT_NCHW:
                    _check_fails_closed(lambda a: run_onnx(sess, a), chw, rel)
                    report["nan_input_rejected"] = True
                entries[rel] = {**common, "format": "onnx", "opset": 18, "batch": "dynamic",
                                "input": _input_spec(contract, chw, "N"), "outputs": _output_specs(names, "N", num_classes),
                                "ops": onnx_op_counts(path), "validation": report,
                                "seconds": round(time.perf_counter() - t0, 2)}
                log(f"{rel}: {_summary(report)}")
            if Format.TFLITE in cfg.formats:
                from .tflite_export import check_builtin_only, convert_to_tflite, run_tflite, signature_io, tflite_interpreter

                for batch in cfg.tflite_batches:
                    t0 = time.perf_counter()
                    rel = f"export/{stem}-b{batch}.tflite"
                    # onnx2tf wants a static batch and the float-NCHW graph; the contract's cast and
                    # layout change are added on the TF side, inside the same .tflite graph.
                    src_mod = (FusedDafar(net, alpha, det, InputContract.FLOAT_NCHW, norm["mean"], norm["std"])
                               if kind == "dafar" else VictimGraph(net, InputContract.FLOAT_NCHW, norm["mean"], norm["std"])).eval()
                    src = export_onnx(src_mod, torch.zeros(batch, *chw), staging / f"{stem}-b{batch}.src.onnx",
                                      names, dynamic_batch=False)
                    out = convert_to_tflite(src, staging / Path(rel).name, contract=contract.value, batch=batch,
                                            input_chw=chw, output_names=names)
                    src.unlink()
                    ops = check_builtin_only(out)
                    interp = tflite_interpreter(out)
                    io = signature_io(interp)
                    if list(io["inputs"]) != ["x"] or set(io["outputs"]) != set(names):
                        from dafar.errors import OutputShapeError

                        raise OutputShapeError(f"{rel}: signature is {io}, expected x -> {list(names)}")
                    report = compare_outputs(ref, run_tflite(interp, x), cfg.tolerance, f"{rel} (LiteRT)")
                    if kind == "dafar" and contract is InputContract.FLOAT_NCHW:
                        _check_fails_closed(lambda a: run_tflite(interp, a), chw, rel)
                        report["nan_input_rejected"] = True
                    entries[rel] = {**common, "format": "tflite", "batch": batch, "signature": "serving_default",
                                    "input": _input_spec(contract, chw, batch),
                                    "outputs": [{"name": n, **io["outputs"][n]} for n in names],
                                    "ops": ops, "validation": report, "seconds": round(time.perf_counter() - t0, 2)}
                    log(f"{rel}: {_summary(report)}")
        # every file passed: move into place, then record them in the manifest
        dest = run_dir / "export"
        dest.mkdir(exist_ok=True)
        for rel in entries:
            os.replace(staging / Path(rel).name, run_dir / rel)
        manifest = load_manifest(run_dir, verify=False)
        files = dict(manifest.get("files", {}))
        exports = dict(manifest.get("exports", {}))
        for rel, entry in entries.items():
            files[rel] = file_entry(run_dir, rel, "export", format=entry["format"], graph=entry["graph"])
            exports[rel] = entry
        manifest["files"] = files
        manifest["exports"] = exports
        manifest["export_versions"] = _versions()
        write_manifest(run_dir, manifest)
        return entries
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_fails_closed(run, chw, what: str) -> None:
    """Feed images holding NaN: every one must come out rejected (the graph fails closed)."""
    from dafar.errors import DecisionMismatchError

    x = np.random.default_rng(0).random((2, *chw), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1] = np.nan
    rejected = np.asarray(run(x)["rejected"])
    if not rejected.all():
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
