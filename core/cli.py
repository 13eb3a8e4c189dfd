"""The ``dafar`` command.

Each subcommand imports its (heavy) stage inside its handler, so ``dafar --help`` and the
device-side subcommands work on a Raspberry Pi with only numpy and a runtime backend installed.
Exit codes: 0 ok, 1 other dafar error, 2 bad arguments/config/input, 3 data, 4 run folder,
5 training, 6 missing optional dependency, 7 export/conversion, 130 interrupted.
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
                   help="skip the victim-only model")
    p.add_argument("--unpool", choices=["mask", "maxunpool"], default=None,
                   help="decoder unpooling: index-free mask (default, exportable to TFLite) or the paper's MaxUnpool")
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
        train_victim=args.train_victim, unpool=args.unpool, z=args.z, train_limit=args.train_limit,
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


def cmd_pipeline(args) -> int:
    """The main job: train, export every graph variant, write the report."""
    from dafar.export.api import ExportConfig, export_run
    from dafar.train.report import write_report
    from dafar.train.trainer import train

    cfg = _train_config(args)
    result = train(cfg, args.out, args.data_dir, resume=args.resume, overwrite=args.overwrite,
                   download=not args.no_download, quiet=args.quiet)
    _print_summary(result)
    exp = ExportConfig(detectors=("l2", "autoencoder") if cfg.detector else ("l2",),
                       contracts=("float-nchw", "uint8-nhwc"))
    export_run(result.run_dir, exp, data_dir=args.data_dir, log=(lambda *a: None) if args.quiet else print)
    print(f"report: {write_report(result.run_dir)}")
    return 0


def cmd_report(args) -> int:
    from dafar.train.report import write_report

    path = write_report(args.run)
    print(path)
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

    p = sub.add_parser("pipeline", help="the main job: train, export to ONNX and TFLite, write the report")
    _add_train_args(p)
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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="(re)write a run folder's report.md and plots")
    p.add_argument("run", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

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
