"""The ``dafar`` command.

Each subcommand imports its (heavy) stage inside its handler, so ``dafar --help`` and the
device-side subcommands work on a Raspberry Pi with only numpy and a runtime backend installed.
Exit codes: 0 ok, 1 other dafar error, 2 bad arguments/config/input, 3 data, 4 run folder,
5 training, 6 missing optional dependency, 7 export/conversion/quantization, 8 inference, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dafar import __version__
from dafar.errors import DafarError, MissingExtraError

EXIT_MISSING_EXTRA = 6


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist", help="data set (default: mnist)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the data set (else $DAFAR_DATA_DIR; MNIST falls back to the vendored copy)")
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder to create, e.g. runs/mnist")
    p.add_argument("--profile", choices=["quick", "paper"], default="quick",
                   help="quick: 1 epoch, no victim-only model; paper: the full schedule (default: quick)")
    p.add_argument("--epochs", type=int, default=None, help="joint (and victim-only) epochs; overrides the profile")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--detector-epochs", type=int, default=None, help="epochs for the anomaly autoencoder C")
    p.add_argument("--no-detector", action="store_true", help="do not train the anomaly autoencoder C")
    p.add_argument("--victim", dest="train_victim", action="store_true", default=None,
                   help="also train the victim-only model (default in the paper profile)")
    p.add_argument("--no-victim", dest="train_victim", action="store_false",
                   help="skip the victim-only model (allowed with --resume: finishes a long run without it)")
    p.add_argument("--unpool", choices=["mask", "maxunpool"], default=None,
                   help="decoder unpooling: index-free mask (default, exportable to TFLite) or the paper's MaxUnpool")
    p.add_argument("--augment", choices=["none", "shift", "crop-flip"], default=None,
                   help="training augmentation: shift (MNIST, +-2 px) or crop-flip (CIFAR-10); default from the profile")
    p.add_argument("--cutout", type=int, default=None, metavar="PIXELS",
                   help="also grey out one PIXELS x PIXELS square per training image (Cutout; default 0 = off)")
    p.add_argument("--recon-weight", type=float, default=None,
                   help="weight of ||x - D(E(x))||_2 against the cross-entropy in the joint loss")
    p.add_argument("--weight-decay", type=float, default=None, help="Adam L2 weight decay (default 0)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout on the classifier head's input while training (default 0; never in the exported graph)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (per-step decay, e.g. 0.999; default "
                        "off); the monitor and the saved model use the average")
    p.add_argument("--keep-best", action="store_true", default=None,
                   help="keep the epoch with the best validation accuracy instead of the last one")
    p.add_argument("--init-from", metavar="RUN_DIR", default=None,
                   help="start from a finished run's E, F, D weights (continue a schedule, or fine-tune a pretrained "
                        "model materialized with `dafar pretrained NAME --out DIR`)")
    p.add_argument("--z", type=float, default=None, help="threshold rule mean + z*std (default 3 MNIST, 2 CIFAR-10)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--val-size", type=int, default=None,
                   help="validation images carved from the training set for calibration (default 5000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-download", action="store_true", help="never try to download missing data")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _train_config(args):
    from dafar.train.config import TrainConfig

    overrides = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, detector_epochs=args.detector_epochs,
        train_victim=args.train_victim, unpool=args.unpool, augment=args.augment, cutout=args.cutout,
        recon_weight=args.recon_weight, z=args.z,
        weight_decay=args.weight_decay, dropout=args.dropout, ema=args.ema,
        keep_best=args.keep_best, init_from=args.init_from, train_limit=args.train_limit,
        test_limit=args.test_limit, val_size=args.val_size, seed=args.seed, device=args.device, threads=args.threads,
    )
    if args.no_detector:
        overrides["detector"] = False
    return TrainConfig.for_profile(args.dataset, args.profile, **overrides)


def _print_summary(result) -> None:
    m = result.metrics
    lines = [f"run folder: {result.run_dir}",
             f"victim test accuracy:    {100 * m['victim_test_acc']:.2f}%",
             f"purified test accuracy:  {100 * m['purified_test_acc']:.2f}%"]
    if "victim_only_test_acc" in m:
        lines.append(f"victim-only accuracy:    {100 * m['victim_only_test_acc']:.2f}%")
    for det in ("l2", "autoencoder"):
        if f"{det}_alpha" in m:
            lines.append(f"{det:12s} alpha={m[f'{det}_alpha']:.4f}  val FPR {100 * m[f'{det}_val_fpr']:.2f}%  "
                         f"test FPR {100 * m[f'{det}_test_fpr']:.2f}%")
    lines.append(f"total time: {m['timing']['total_seconds']:.0f} s on {m['timing']['device']}")
    print("\n".join(lines))


def cmd_train(args) -> int:
    from dafar.train.trainer import train

    cfg = _train_config(args)
    result = train(cfg, args.out, args.data_dir, resume=args.resume, overwrite=args.overwrite,
                   download=not args.no_download, quiet=args.quiet)
    from dafar.train.report import write_report

    write_report(result.run_dir)
    _print_summary(result)
    return 0


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_export(args) -> int:
    from dafar.export.api import ExportConfig, export_run

    from dafar.errors import ConfigError

    if args.pretrained:
        from dafar.pretrained import materialize

        if Path(args.run).exists():
            raise ConfigError(f"--pretrained writes a new run folder, but {args.run} exists; name a new one")
        print(f"run folder: {materialize(args.pretrained, args.run)} (pretrained {args.pretrained})")

    try:
        batches = tuple(int(b) for b in _csv(args.tflite_batch))
    except ValueError:
        raise ConfigError(f"--tflite-batch takes comma-separated integers, got {args.tflite_batch!r}") from None
    cfg = ExportConfig(
        formats=tuple(_csv(args.format)), detectors=tuple(_csv(args.detector)), contracts=tuple(_csv(args.input)),
        tflite_batches=batches, threshold_rule=args.threshold_rule,
        validate_images=None if args.validate == "all" else int(args.validate), victim=not args.no_victim,
    )
    entries = export_run(args.run, cfg, data_dir=args.data_dir, log=(lambda *a: None) if args.quiet else print)
    for rel, e in entries.items():
        print(f"wrote {rel} ({e['format']}, {e['contract']}, batch {e['batch']})")
    from dafar.train.report import write_report

    write_report(args.run)
    return 0


def cmd_quantize(args) -> int:
    from dafar.quantize.api import Checks, QuantizeConfig, quantize_run

    cfg = QuantizeConfig(
        formats=tuple(_csv(args.format)), detectors=tuple(_csv(args.detector)) if args.detector else None,
        contracts=tuple(_csv(args.input)) if args.input else None, layout=args.layout, calib_images=args.calib,
        calib_seed=args.calib_seed, victim=not args.no_victim,
        validate_images=None if args.validate == "all" else int(args.validate), activation_type=args.activation_type,
        onnx_weights=args.onnx_weights,
        tflite_batch=args.tflite_batch, compare_naive=not args.no_naive,
        checks=Checks(min_decision_agreement=args.min_decision_agreement, min_label_agreement=args.min_label_agreement,
                      max_accuracy_drop=args.max_accuracy_drop),
    )
    entries = quantize_run(args.run, cfg, data_dir=args.data_dir, attack_images=args.attack_images,
                           log=(lambda *a: None) if args.quiet else print)
    for rel, e in entries.items():
        v = e["validation"]
        extra = (f", alpha {e['alpha_float']:.4f} -> {e['alpha']:.4f}" if e.get("alpha") is not None else "")
        print(f"wrote {rel} ({e['format']} int8, {e['layout']}, {100 * v['size_ratio']:.0f}% of float{extra})")
    from dafar.quantize.report import write_quantize_report
    from dafar.train.report import write_report

    print(f"report: {write_quantize_report(args.run)}")
    write_report(args.run)
    return 0


def _load_image(path: str, chw, resize: bool):
    """An image file as uint8 HxWxC (PNG/JPEG/... via Pillow) or a .npy array (any accepted layout)."""
    import numpy as np

    from dafar.errors import InputValidationError

    p = Path(path)
    if not p.is_file():
        raise InputValidationError(f"{p}: no such file")
    if p.suffix.lower() == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputValidationError(f"{p}: not a readable .npy array ({exc})") from None
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise MissingExtraError("reading image files needs Pillow: pip install 'dafar[images]' (or pass .npy arrays)") from None
    c, h, w = chw
    try:
        with Image.open(p) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                if not resize:
                    raise InputValidationError(f"{p}: image is {im.size[0]}x{im.size[1]}, the model takes {w}x{h} "
                                               "(pass --resize to scale it)")
                im = im.resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputValidationError(f"{p}: not a readable image ({exc})") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


def cmd_predict(args) -> int:
    from dafar.runtime import Defence

    d = Defence(args.run, args.model, threads=args.threads, provider=args.provider, on_invalid=args.on_invalid)
    rows = []
    for f in args.images:
        a = _load_image(f, d.chw, args.resize)
        p = d.predict(a)
        for i, rec in enumerate(p.to_records()):
            rec["file"] = f if len(p) == 1 else f"{f}[{i}]"
            if 0 <= rec["label"] < len(d.classes):
                rec["class"] = d.classes[rec["label"]]
            rows.append(rec)
    if args.json:
        print(json.dumps({"model": d.model_rel, "alpha": d.alpha, "detector": d.detector, "precision": d.precision,
                          "predictions": rows}, indent=2))
    else:
        print(f"model {d.model_rel} ({d.precision}, detector {d.detector}, alpha {d.alpha})")
        for r in rows:
            score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
            print(f"{r['file']}: label {r['label']} ({r.get('class', '?')})  score {score}  {r['verdict'].upper()}")
    return 0


def _ints(value: str, flag: str) -> tuple[int, ...]:
    from dafar.errors import ConfigError

    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {value!r}") from None


def _count_or_all(value: str, flag: str) -> int | None:
    """'all' -> None, else a non-negative integer."""
    from dafar.errors import ConfigError

    if value == "all":
        return None
    if not value.isdigit():
        raise ConfigError(f"{flag} takes a non-negative integer or 'all', got {value!r}")
    return int(value)


def cmd_bench(args) -> int:
    from dafar.bench.harness import BenchConfig, run_bench
    from dafar.bench.report import write_bench_report

    cfg = BenchConfig(threads=_ints(args.threads, "--threads"), batches=_ints(args.batch, "--batch"), runs=args.runs,
                      warmup=args.warmup, min_seconds=args.min_seconds,
                      models=tuple(_csv(args.models)) if args.models else None,
                      accuracy_images=_count_or_all(args.accuracy_images, "--accuracy-images"),
                      memory=not args.no_memory, torch=not args.no_torch, gpu=not args.no_gpu, device_only=args.device_only)
    run_bench(args.run, cfg, data_dir=args.data_dir, log=(lambda *a: None) if args.quiet else print)
    print(f"report: {write_bench_report(args.run)}")
    return 0


def _budgets(value: str | None, option: str) -> tuple[float, ...] | None:
    """A comma list of L-inf budgets on the [0, 1] pixel scale, each a decimal (0.3) or k/255 (8/255)."""
    from dafar.errors import ConfigError

    if not value:
        return None
    out = []
    for item in _csv(value):
        try:
            num, _, den = item.partition("/")
            v = float(num) / (float(den) if den else 1.0)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{option}: {item!r} is not a budget (write 0.3 or 8/255)") from None
        if not 0 < v <= 1:
            raise ConfigError(f"{option}: {item} is outside (0, 1] (budgets are on the pixels/255 scale)")
        out.append(v)
    return tuple(out)


def cmd_eval(args) -> int:
    from dafar.bench.eval_report import write_eval_report
    from dafar.bench.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(images=args.images, slow_images=args.slow_images, eps=_budgets(args.eps, "--eps"),
                     adaptive_eps=_budgets(args.adaptive_eps, "--adaptive-eps"), peers=not args.no_peers,
                     adaptive=not args.no_adaptive, adaptive_images=args.adaptive_images,
                     adaptive_steps=args.adaptive_steps, adaptive_restarts=args.adaptive_restarts,
                     deployed=not args.no_deployed, seed=args.seed, peer_train_images=args.peer_train_images)
    run_eval(args.run, cfg, data_dir=args.data_dir, log=(lambda *a: None) if args.quiet else print)
    print(f"report: {write_eval_report(args.run)}")
    return 0


def cmd_reliability(args) -> int:
    from dafar.bench.reliability import run_reliability, write_reliability_report

    run_reliability(args.run, fuzz_cases=args.fuzz_cases, long_n=args.long_run, threads=args.threads,
                    concurrent_total=args.concurrent, log=(lambda *a: None) if args.quiet else print)
    cmd = (f"dafar reliability RUN_DIR --fuzz-cases {args.fuzz_cases} --long-run {args.long_run} --threads {args.threads} "
           f"--concurrent {args.concurrent}")
    print(f"report: {write_reliability_report(args.run, cmd)}")
    return 0


def cmd_pipeline(args) -> int:
    """The main job: train, export every graph variant, quantize to int8, benchmark, write the reports."""
    from dafar.bench.harness import BenchConfig, run_bench
    from dafar.bench.report import write_bench_report
    from dafar.export.api import ExportConfig, export_run
    from dafar.quantize.api import QuantizeConfig, quantize_run
    from dafar.quantize.report import write_quantize_report
    from dafar.train.report import write_report
    from dafar.train.trainer import train

    log = (lambda *a: None) if args.quiet else print
    if args.pretrained:
        from dafar.manifest import load_manifest
        from dafar.pretrained import materialize

        run = materialize(args.pretrained, args.out, overwrite=args.overwrite)
        print(f"run folder: {run} (pretrained {args.pretrained}, no training)")
        dets = ("l2", "autoencoder") if load_manifest(run, verify=False)["architecture"]["detector"] else ("l2",)
    else:
        cfg = _train_config(args)
        result = train(cfg, args.out, args.data_dir, resume=args.resume, overwrite=args.overwrite,
                       download=not args.no_download, quiet=args.quiet)
        _print_summary(result)
        run = result.run_dir
        dets = ("l2", "autoencoder") if cfg.detector else ("l2",)
    print("== export", flush=True)
    export_run(run, ExportConfig(detectors=dets, contracts=("float-nchw", "uint8-nhwc")), data_dir=args.data_dir, log=log)
    if not args.skip_quantize:
        print("== quantize", flush=True)
        quantize_run(run, QuantizeConfig(), data_dir=args.data_dir, log=log)
        write_quantize_report(run)
    if not args.skip_bench:
        print("== bench", flush=True)
        run_bench(run, BenchConfig(threads=(1, 2)), data_dir=args.data_dir, log=log)
        write_bench_report(run)
    print(f"report: {write_report(run)}")
    return 0


def cmd_report(args) -> int:
    from dafar.train.report import write_report

    path = write_report(args.run)
    print(path)
    return 0


def cmd_pretrained(args) -> int:
    from dafar.pretrained import available, materialize, summary_lines

    if args.list or not args.name:
        names = available()
        for name in names:
            print("\n".join(summary_lines(name)))
        if not names:
            print("no pretrained models in this installation")
        return 0
    if not args.out:
        from dafar.errors import ConfigError

        raise ConfigError("--out RUN_DIR is required to materialize a pretrained model")
    run = materialize(args.name, args.out, overwrite=args.overwrite)
    print("\n".join(summary_lines(args.name)))
    print(f"run folder: {run} (every file's sha256 verified); next: dafar export {run}")
    return 0


def cmd_summary(args) -> int:
    from dafar.bench.summary import render_markdown, summarize

    d = summarize(args.run)
    text = json.dumps(d, indent=2, sort_keys=True) + "\n" if args.json else render_markdown(d)
    if args.collect:
        from dafar.bench.summary import collect

        files = collect(args.run, args.collect)
        print(f"collected {len(files)} files into {args.collect}", file=sys.stderr)
    if args.out:
        from dafar.manifest import atomic_write_text

        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


def cmd_info(args) -> int:
    from dafar.manifest import load_manifest

    m = load_manifest(args.run, verify=not args.no_verify)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    arch = m.get("architecture", {})
    met = m.get("metrics", {})
    print(f"run:        {Path(args.run).resolve()}")
    print(f"data set:   {m.get('dataset', {}).get('name')}  ({m.get('dataset', {}).get('source')})")
    print(f"model:      {arch.get('name')}  unpool={arch.get('unpool')}  params={arch.get('params')}")
    print(f"input:      {m.get('input', {}).get('layout')} {m.get('input', {}).get('shape')} float32 in [0, 1]")
    for det, th in m.get("thresholds", {}).items():
        d = th["rules"][th["default"]]
        print(f"threshold:  {det:12s} {th['default']:20s} alpha={d['alpha']:.4f} test FPR {100 * d['test_fpr']:.2f}%")
    if met:
        print(f"accuracy:   victim {100 * met.get('victim_test_acc', float('nan')):.2f}%  "
              f"purified {100 * met.get('purified_test_acc', float('nan')):.2f}%")
    print(f"files:      {len(m.get('files', {}))} " + ("verified (sha256)" if not args.no_verify else "not verified"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dafar",
        description="DAFAR adversarial-example defence for edge devices: train, export, quantize, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"dafar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train E, F, D (and C), calibrate alpha, write a run folder")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pipeline", help="the main job: train, export, quantize to int8, benchmark, write the reports")
    _add_train_args(p)
    p.add_argument("--pretrained", metavar="NAME", default=None,
                   help="start from a pretrained model shipped with dafar (e.g. mnist) instead of training")
    p.add_argument("--skip-quantize", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="fuse victim, feedback loop and detector into ONNX/TFLite graphs, validated")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx,tflite", help="comma list of onnx, tflite (default: both)")
    p.add_argument("--detector", default="l2", help="comma list of l2, autoencoder (default: l2)")
    p.add_argument("--input", default="float-nchw",
                   help="comma list of input contracts: float-nchw (float32 in [0, 1]) and/or uint8-nhwc (raw pixels)")
    p.add_argument("--tflite-batch", default="1", help="comma list of fixed TFLite batch sizes (default: 1)")
    p.add_argument("--threshold-rule", default=None,
                   help="alpha rule key from the manifest, e.g. 'quantile@fpr=0.01' (default: the detector's default)")
    p.add_argument("--validate", default="2000", help="test images for the parity check, or 'all' (default 2000)")
    p.add_argument("--data-dir", default=None, help="data folder for the validation images (default: the run's)")
    p.add_argument("--no-victim", action="store_true", help="skip the victim-only graph F(E(x))")
    p.add_argument("--pretrained", metavar="NAME", default=None,
                   help="first write RUN_DIR from a pretrained model shipped with dafar (see dafar pretrained --list)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pretrained", help="list the shipped pretrained models, or copy one into a run folder")
    p.add_argument("name", nargs="?", metavar="NAME", help="pretrained model, e.g. mnist")
    p.add_argument("--out", metavar="RUN_DIR", default=None, help="run folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--list", action="store_true", help="list the pretrained models with their numbers")
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("quantize", help="int8 models for ONNX Runtime and LiteRT, detector kept, alpha recalibrated")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx,tflite", help="comma list of onnx, tflite (default: both)")
    p.add_argument("--detector", default=None, help="comma list of l2, autoencoder (default: every exported one)")
    p.add_argument("--input", default=None, help="comma list of input contracts (default: every exported one)")
    p.add_argument("--layout", default="precise", choices=["precise", "mixed"],
                   help="precise: E on the input path and D compute in float with int8-stored weights (default; keeps "
                        "the score); mixed: every conv/linear layer in int8, only the residual/score/threshold in float")
    p.add_argument("--calib", type=int, default=256, metavar="N", help="calibration images from the training split (default 256)")
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--activation-type", default="uint8", choices=["uint8", "int8"],
                   help="ONNX Runtime activation type (uint8 for x86, int8 for ARM; default uint8)")
    p.add_argument("--onnx-weights", default="int7", choices=["int7", "int8"],
                   help="int8 ONNX weight range: int7 (-64..63, default) is safe on every CPU; int8 "
                        "(full range) is a little more precise on ARM and VNNI CPUs but loses accuracy in ONNX "
                        "Runtime on x86 CPUs without VNNI (16-bit saturation)")
    p.add_argument("--tflite-batch", type=int, default=1, help="which fixed-batch TFLite export to quantize (default 1)")
    p.add_argument("--validate", default="all", help="test images for the float-vs-int8 checks, or 'all' (default)")
    p.add_argument("--attack-images", type=int, default=200,
                   help="adversarial images per attack for the detection comparison (0 to skip; default 200)")
    p.add_argument("--min-decision-agreement", type=float, default=0.99,
                   help="fail when clean reject decisions agree with float on fewer images (default 0.99)")
    p.add_argument("--min-label-agreement", type=float, default=0.99,
                   help="fail when the int8 top-1 label (purified for the defence) agrees with float on fewer test "
                        "images (default 0.99; a 10-class model at 85%% accuracy has more near-ties than one at 99%%)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.005,
                   help="fail when victim or purified accuracy falls by more than this, absolute (default 0.005)")
    p.add_argument("--no-naive", action="store_true", help="skip evaluating the naive full-int8 layout for the report")
    p.add_argument("--no-victim", action="store_true", help="do not quantize the victim-only graphs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("predict", help="classify image files with an exported model (on-device runtime)")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (Pillow) or .npy arrays")
    p.add_argument("--model", default=None, help="model file of the run folder (default: the int8/float TFLite defence)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime execution provider")
    p.add_argument("--on-invalid", default="raise", choices=["raise", "reject"],
                   help="an invalid image: fail (default) or report it rejected")
    p.add_argument("--resize", action="store_true", help="scale images to the model's input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="latency, memory, cost and accuracy of every model file (bench_report.md)")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts (default 1,2)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes for dynamic-batch models (default 1)")
    p.add_argument("--runs", type=int, default=200, help="timed runs per measurement (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed warm-up runs (default 20)")
    p.add_argument("--min-seconds", type=float, default=0.0, help="time each measurement for at least this long")
    p.add_argument("--models", default=None, help="comma list of model files (default: all)")
    p.add_argument("--accuracy-images", default="all", help="test images for the accuracy rows, 'all' or 0 to skip")
    p.add_argument("--device-only", action="store_true",
                   help="only the runtime (numpy + backend): for a Pi or phone with the run folder copied over")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-torch", action="store_true", help="skip the torch eager reference rows")
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA rows")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="adversarial evaluation: gray-box attacks, peers, adaptive attacks (eval_report.md)",
                       description="Adversarial evaluation. Attack sets, trained peers and adaptive results are "
                                   "cached in the run folder: rerunning an interrupted evaluation resumes it.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--images", type=int, default=300, help="images per FGSM/PGD/noise set (default 300)")
    p.add_argument("--slow-images", type=int, default=100, help="images per CW-L2/JSMA set (default 100)")
    p.add_argument("--eps", default=None,
                   help="comma list of L-inf budgets in (0, 1], e.g. 0.1,0.3 or 2/255,8/255 (default: the data set's)")
    p.add_argument("--adaptive-eps", default=None,
                   help="budgets of the adaptive attack, same form (default MNIST 0.05-1, CIFAR-10 2/255-1)")
    p.add_argument("--adaptive-images", type=int, default=100)
    p.add_argument("--adaptive-steps", type=int, default=100)
    p.add_argument("--adaptive-restarts", type=int, default=2)
    p.add_argument("--peer-train-images", type=int, default=20000)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-adaptive", action="store_true")
    p.add_argument("--no-deployed", action="store_true", help="skip evaluating the exported files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reliability", help="fuzzing, tampered files, long runs, concurrency, CLI errors (reliability_report.md)")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--fuzz-cases", type=int, default=10000, help="hypothesis cases per model (default 10000)")
    p.add_argument("--long-run", type=int, default=100000, help="inferences per backend in one process (default 100000)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=10000, help="inferences shared by the threads (default 10000)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reliability)

    p = sub.add_parser("report", help="(re)write a run folder's report.md and plots")
    p.add_argument("run", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summary", help="one table of a run's headline numbers, from every stage's records")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the output to FILE")
    p.add_argument("--collect", metavar="DIR",
                   help="also copy the run's reports, their plots and JSON records into DIR, with summary.md")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("info", help="show a run folder's manifest and verify its file hashes")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "validate", None) not in (None, "all") and not str(args.validate).isdigit():
        parser.error(f"--validate takes a positive integer or 'all', got {args.validate!r}")
    try:
        return int(args.func(args) or 0)
    except MissingExtraError as exc:
        print(f"dafar: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except DafarError as exc:
        print(f"dafar {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dafar {args.command}: interrupted; completed checkpoints are kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
