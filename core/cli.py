"""The ``dafar`` command: parses arguments and calls the stages' entry functions, nothing else.

Each stage's options are derived from its config dataclass (:mod:`dafar.options`), so the
command line, the Python API and the reports' reproduce lines name the same options.  Each
subcommand imports its (heavy) stage inside its handler, so ``dafar --help`` and the device-side
subcommands work on a Raspberry Pi with only numpy and a runtime backend installed.
Exit codes: 0 ok, 1 other dafar error, 2 bad arguments/config/input, 3 data, 4 run folder,
5 training, 6 missing optional dependency, 7 export/conversion/quantization, 8 inference, 130 interrupted.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from dafar.errors import ConfigError, DafarError, MissingExtraError, RunFolderError, require_available
from dafar.options import add_options, config_kwargs
from dafar.schema import Mode
from dafar.version import __version__
from dafar.workflow import CHECK_IMAGES


def _count_or_all(text: str) -> int | None:
    """A positive image count, or 'all' (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return n

EXIT_MISSING_EXTRA = 6
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a pipeline's writer whose reader left


def _log(args):
    return (lambda *a: None) if getattr(args, "quiet", False) else print


# ---------------------------------------------------------------- train and the main job
def _add_train_args(p: argparse.ArgumentParser, skip=()) -> None:
    from dafar.train.config import PROFILES, TrainConfig

    p.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder to create, e.g. runs/mnist")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder with the data set (else $DAFAR_DATA_DIR; MNIST falls back to the vendored copy)")
    by_profile = {k: "set by --profile" for d in PROFILES.values() for k in d}
    add_options(p, TrainConfig, defaults=by_profile, group="training options", skip=skip)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-download", action="store_true", help="never try to download missing data")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _train_config(args):
    from dafar.train.config import TrainConfig

    kw = config_kwargs(TrainConfig, args)
    return TrainConfig.for_profile(kw.pop("dataset", "mnist"), kw.pop("profile", "quick"), **kw)


def cmd_train(args) -> int:
    from dafar.report import write_run_report
    from dafar.train import train

    result = train(_train_config(args), args.out, args.data_dir, resume=args.resume, overwrite=args.overwrite,
                   download=not args.no_download, quiet=args.quiet)
    write_run_report(result.run_dir)
    print("\n".join(result.summary_lines()))
    return 0


# from the victim (a run's data set too, below), or the classifier's own training
_ATTACH_FIXED = ("arch", "width", "train_victim", "classifier_only", "label_smoothing")
_OWN_VICTIM_FIELDS = ("victim_weights", "victim_mean", "victim_std")  # attach only: a classifier of one's own


def cmd_attach(args) -> int:
    from dafar.manifest import read_manifest
    from dafar.report import write_run_report
    from dafar.train import TrainConfig, attach
    from dafar.train.trainer import is_module_ref, resolve_victim_source

    kw = config_kwargs(TrainConfig, args, skip=_ATTACH_FIXED)
    if is_module_ref(args.victim):  # a classifier of one's own: the data set is the user's to name
        kw.update(arch="custom", attach_to=args.victim)
        cfg = TrainConfig.for_profile(kw.pop("dataset", "imagefolder"), kw.pop("profile", "quick"), **kw)
    else:
        if any(kw.get(k) is not None for k in _OWN_VICTIM_FIELDS):
            raise ConfigError("--weights, --mean and --std describe a classifier of your own "
                              "(--victim package.module:callable); a run folder's victim carries its own")
        man = read_manifest(resolve_victim_source(args.victim))
        ds = man.get("dataset", {}).get("name")
        for k in ("dataset", "image_size", "channels"):  # the victim's data set, read as it read it
            kw.pop(k, None)
        if man.get("architecture", {}).get("family"):  # so --feedback-at is checked against the victim's network
            kw["arch"] = man["architecture"]["family"]
        cfg = TrainConfig.for_profile(ds, kw.pop("profile", "quick"), **kw)
    result = attach(args.victim, args.out, cfg, data_dir=args.data_dir, resume=args.resume, overwrite=args.overwrite,
                    download=not args.no_download, quiet=args.quiet)
    write_run_report(result.run_dir)
    print("\n".join(result.summary_lines()))
    return 0


def cmd_pipeline(args) -> int:
    from dafar.workflow import pipeline

    res = pipeline(args.out, None if args.pretrained else _train_config(args), pretrained=args.pretrained,
                   data_dir=args.data_dir, resume=args.resume, overwrite=args.overwrite,
                   download=not args.no_download, quantize=not args.skip_quantize, bench=not args.skip_bench,
                   full=args.full, mode=args.mode, quiet=args.quiet, check_images=args.check_images, log=print)
    print(f"report: {res.report}")
    return 0


# ---------------------------------------------------------------- export, quantize
def cmd_export(args) -> int:
    from dafar.export import ExportConfig, export
    from dafar.report import write_run_report

    if args.pretrained:
        from dafar.pretrained import materialize

        if Path(args.run).exists():
            raise ConfigError(f"--pretrained writes a new run folder, but {args.run} exists; name a new one")
        print(f"run folder: {materialize(args.pretrained, args.run)} (pretrained {args.pretrained})")
    res = export(args.run, ExportConfig(**config_kwargs(ExportConfig, args)), data_dir=args.data_dir, log=_log(args))
    for rel, e in res.entries.items():
        print(f"wrote {rel} ({e['format']}, {e['contract']}, batch {e['batch']})")
    write_run_report(args.run)
    return 0


def cmd_quantize(args) -> int:
    from dafar.quantize import QuantizeConfig, quantize
    from dafar.report import write_run_report

    res = quantize(args.run, QuantizeConfig(**config_kwargs(QuantizeConfig, args)), data_dir=args.data_dir,
                   log=_log(args))
    for rel, e in res.entries.items():
        v = e["validation"]
        extra = (f", alpha {e['alpha_float']:.4f} -> {e['alpha']:.4f}" if e.get("alpha") is not None else "")
        print(f"wrote {rel} ({e['format']} int8, {e['layout']}, {100 * v['size_ratio']:.0f}% of float{extra})")
    print(f"report: {res.report}")
    write_run_report(args.run)
    return 0


# ---------------------------------------------------------------- the device side
def _check_npy_header(p: Path) -> None:
    """Refuse a .npy whose header declares more data than the file holds, or more than
    ``$DAFAR_MAX_ARRAY_BYTES`` (default 1 GiB), before numpy allocates it (a header claiming
    terabytes made np.load fail with an allocation traceback)."""
    import os

    import numpy as np

    from dafar.errors import InputValidationError

    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
            shape, _, dtype = read(f, max_header_size=10_000)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise InputValidationError(f"{p}: not a readable .npy array ({exc})") from None
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    limit = int(os.environ.get("DAFAR_MAX_ARRAY_BYTES", 1 << 30))
    if need > limit:
        raise InputValidationError(f"{p}: declares a {'x'.join(map(str, shape))} {dtype} array ({need / 2**20:.0f} MiB), "
                                   f"above the limit of {limit / 2**20:.0f} MiB; set DAFAR_MAX_ARRAY_BYTES to raise it")
    if offset + need > p.stat().st_size:
        raise InputValidationError(f"{p}: its header declares {need} bytes of data but the file holds "
                                   f"{p.stat().st_size - offset} (truncated or a forged header)")


def _load_image(path: str, chw, resize: bool):
    """An image file as uint8 HxWxC, decoded, converted and (with ``resize``) scaled exactly as an
    image folder's training images were (:func:`dafar.imagefolder.read_image`), or a .npy array
    (any layout the runtime accepts)."""
    import numpy as np

    from dafar.errors import DataError, InputValidationError
    from dafar.imagefolder import read_image

    p = Path(path)
    if not p.is_file():
        raise InputValidationError(f"{p}: no such file")
    if p.suffix.lower() == ".npy":
        _check_npy_header(p)
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputValidationError(f"{p}: not a readable .npy array ({exc})") from None
    c, h, w = chw
    try:
        from PIL import Image

        with Image.open(p) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1:  # said, not silently chosen
            print(f"dafar predict: note: {p} is animated ({frames} frames); classifying its first frame",
                  file=sys.stderr)
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_image just below
        pass
    try:
        arr = read_image(p, c, (h, w) if resize else None)
    except MissingExtraError:
        raise MissingExtraError("reading image files needs Pillow: pip install 'dafar[images]' (or pass .npy arrays)") from None
    except DataError as exc:
        raise InputValidationError(str(exc)) from None
    if arr.shape[:2] != (h, w):
        raise InputValidationError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}, the model takes {w}x{h} "
                                   "(pass --resize to scale it, bilinear)")
    return arr


def cmd_predict(args) -> int:
    from dafar.runtime import Defence

    d = Defence(args.run, args.model, backend=args.backend, threads=args.threads, provider=args.provider,
                on_invalid=args.on_invalid)
    # a model trained on resized images gets every image resized the same way
    resize = args.resize or bool((d.manifest.get("dataset", {}).get("preprocess") or {}).get("resize"))
    rows = []
    for f in args.images:
        a = _load_image(f, d.chw, resize)
        p = d.predict(a)
        for i, rec in enumerate(p.to_records()):
            rec["file"] = f if len(p) == 1 else f"{f}[{i}]"
            if 0 <= rec["label"] < len(d.classes):
                rec["class"] = d.classes[rec["label"]]
            rows.append(rec)
    if args.json:
        print(json.dumps({"model": d.model_rel, "alpha": d.alpha, "detector": d.detector, "mode": d.mode,
                          "precision": d.precision, "predictions": rows}, indent=2))
    else:
        mode = f", {d.mode} mode" if d.mode else ""
        print(f"model {d.model_rel} ({d.precision}, detector {d.detector}{mode}, alpha {d.alpha})")
        for r in rows:
            score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
            print(f"{r['file']}: label {r['label']} ({r.get('class', '?')})  score {score}  {r['verdict'].upper()}")
    return 0


# ---------------------------------------------------------------- measuring
def cmd_bench(args) -> int:
    from dafar.bench import BenchConfig, bench

    res = bench(args.run, BenchConfig(**config_kwargs(BenchConfig, args)), data_dir=args.data_dir, log=_log(args))
    print(f"report: {res.report}")
    return 0


def cmd_pareto(args) -> int:
    from dafar.bench import ParetoConfig, pareto

    res = pareto(args.run_dirs, args.out, ParetoConfig(**config_kwargs(ParetoConfig, args)), log=_log(args))
    for key, v in res.summary["verdicts"].items():
        print(f"{Path(key.split('|')[0]).name} {key.split('|')[1]}: "
              + ("meets the target" if v["meets"] else "misses: " + "; ".join(v["why_not"])))
    print(f"report: {res.report}")
    return 0


def cmd_eval(args) -> int:
    from dafar.bench import EvalConfig, evaluate

    res = evaluate(args.run, EvalConfig(**config_kwargs(EvalConfig, args)), data_dir=args.data_dir, log=_log(args))
    print(f"report: {res.report}")
    return 0


def cmd_reliability(args) -> int:
    from dafar.bench import ReliabilityConfig, check_reliability

    res = check_reliability(args.run, ReliabilityConfig(**config_kwargs(ReliabilityConfig, args)), log=_log(args))
    print(f"report: {res.report}")
    return 0


def cmd_report(args) -> int:
    from dafar.report import write_run_report

    print(write_run_report(args.run))
    return 0


def cmd_summary(args) -> int:
    from dafar.bench.summary import collect, render_markdown, summarize

    d = summarize(args.run)
    text = json.dumps(d, indent=2, sort_keys=True) + "\n" if args.json else render_markdown(d)
    if args.collect:
        files = collect(args.run, args.collect)
        print(f"collected {len(files)} files into {args.collect}", file=sys.stderr)
    if args.out:
        from dafar.manifest import atomic_write_text

        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


# ---------------------------------------------------------------- run folders
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
        raise ConfigError("--out RUN_DIR is required to materialize a pretrained model")
    run = materialize(args.name, args.out, overwrite=args.overwrite)
    print("\n".join(summary_lines(args.name)))
    print(f"run folder: {run} (every file's sha256 verified); next: dafar export {run}")
    return 0


def cmd_info(args) -> int:
    from dafar.manifest import classifier_alone_message, load_manifest

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
    alone = classifier_alone_message(m, args.run)
    if met and alone:
        print(f"accuracy:   victim {100 * met.get('victim_test_acc', float('nan')):.2f}%")
        print(f"defence:    none yet: {alone.split(': ', 1)[1]}")
    elif met:
        print(f"accuracy:   victim {100 * met.get('victim_test_acc', float('nan')):.2f}%  "
              f"purified {100 * met.get('purified_test_acc', float('nan')):.2f}%")
    print(f"files:      {len(m.get('files', {}))} " + ("verified (sha256)" if not args.no_verify else "not verified"))
    return 0


# ---------------------------------------------------------------- the parser
def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR")


def build_parser() -> argparse.ArgumentParser:
    from dafar.bench.perf.harness import BenchConfig
    from dafar.bench.perf.pareto import ParetoConfig
    from dafar.bench.reliability.checks import ReliabilityConfig
    from dafar.bench.security.evaluate import EvalConfig
    from dafar.export.api import ExportConfig
    from dafar.quantize.api import QuantizeConfig

    parser = argparse.ArgumentParser(
        prog="dafar",
        description="DAFAR adversarial-example defence for edge devices: train, export, quantize, benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"dafar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("train", help="train E, F, D (and C), calibrate alpha, write a run folder")
    _add_train_args(p, skip=_OWN_VICTIM_FIELDS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("attach", help="plug-in mode: train DAFAR's decoder (and C) on a trained classifier, which "
                                      "stays unchanged")
    p.add_argument("--victim", metavar="SOURCE", required=True,
                   help="the classifier: a run folder, a pretrained model's name (dafar pretrained --list), or your "
                        "own torch module as package.module:callable (with --weights, --mean, --std, --feedback-at "
                        "and the data set)")
    _add_train_args(p, skip=_ATTACH_FIXED)
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("pipeline", help="the main job: train, export, quantize to int8, benchmark, write the reports")
    _add_train_args(p, skip=(*_OWN_VICTIM_FIELDS, "classifier_only"))  # the pipeline builds a whole defence
    p.add_argument("--pretrained", metavar="NAME", default=None,
                   help="start from a pretrained model shipped with dafar (e.g. mnist) instead of training")
    p.add_argument("--skip-quantize", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--full", action="store_true",
                   help="export and quantize every detector and input contract (default: the L2 detector on uint8 "
                        "camera pixels, the variant a device runs by default)")
    p.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.HYBRID.value,
                   help="defence graph mode: hybrid (label from the purified logits, the paper's) or detect (the "
                        "victim's label, D only for the score: about 2/3 of hybrid's cost); --full exports both")
    p.add_argument("--check-images", type=_count_or_all, default=CHECK_IMAGES, metavar="N",
                   help=f"test images for the int8 and accuracy checks, or 'all' (default {CHECK_IMAGES}; with it the "
                        "int8 detection check uses 100 images per attack and skips the naive layout)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("export", help="fuse victim, feedback loop and detector into ONNX/TFLite graphs, validated")
    _run_arg(p)
    add_options(p, ExportConfig)
    p.add_argument("--data-dir", default=None, help="data folder for the validation images (default: the run's)")
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
    _run_arg(p)
    add_options(p, QuantizeConfig)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("predict", help="classify image files with an exported model (on-device runtime)")
    _run_arg(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files (Pillow) or .npy arrays")
    p.add_argument("--model", default=None, help="model file of the run folder (default: the int8/float TFLite defence)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="auto", choices=["auto", "litert", "litert-compiled", "onnxruntime"],
                   help="auto: from the file (LiteRT's Interpreter for .tflite); litert-compiled: LiteRT's CompiledModel API")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime execution provider")
    p.add_argument("--on-invalid", default="raise", choices=["raise", "reject"],
                   help="an invalid image: fail (default) or report it rejected")
    p.add_argument("--resize", action="store_true", help="scale images to the model's input size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="latency, memory, cost and accuracy of every model file (bench_report.md)")
    _run_arg(p)
    add_options(p, BenchConfig)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("pareto", help="cost against detection across run folders (configurations): table and plot",
                       description="Time every fixed-batch TFLite defence graph of each run folder against its own "
                                   "victim (LiteRT, interleaved), and tabulate MACs, parameters, file size, test FPR "
                                   "and the gray-box ROC AUC of each run's `dafar eval`: pareto.md, pareto.json, "
                                   "pareto.png in --out.")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders, one per configuration")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for pareto.md, pareto.json and pareto.png")
    add_options(p, ParetoConfig)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pareto)

    p = sub.add_parser("eval", help="adversarial evaluation: gray-box attacks, peers, adaptive attacks (eval_report.md)",
                       description="Adversarial evaluation. Attack sets, trained peers and adaptive results are "
                                   "cached in the run folder: rerunning an interrupted evaluation resumes it.")
    _run_arg(p)
    add_options(p, EvalConfig)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reliability", help="fuzzing, tampered files, long runs, concurrency, CLI errors (reliability_report.md)")
    _run_arg(p)
    add_options(p, ReliabilityConfig)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reliability)

    p = sub.add_parser("report", help="(re)write a run folder's report.md and plots")
    _run_arg(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summary", help="one table of a run's headline numbers, from every stage's records")
    _run_arg(p)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the output to FILE")
    p.add_argument("--collect", metavar="DIR",
                   help="also copy the run's reports, their plots and JSON records into DIR, with summary.md")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("info", help="show a run folder's manifest and verify its file hashes")
    _run_arg(p)
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version (0) or bad arguments (2), message printed
        return int(exc.code or 0)
    try:
        _check_extra(args.command)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is seen below
        return rc
    except BrokenPipeError:  # the reader left (dafar info --json | head): stop quietly, as cat does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except OSError:
            pass
        return EXIT_BROKEN_PIPE
    except MissingExtraError as exc:
        print(f"dafar: {exc}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except DafarError as exc:
        print(f"dafar {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"dafar {args.command}: interrupted; finished steps are kept (a rerun continues or starts over)",
              file=sys.stderr)
        return 130
    except ImportError as exc:  # a heavy dependency imported below a stage's own check
        extra = _EXTRA_OF.get((getattr(exc, "name", None) or "").split(".")[0])
        if extra is None:
            return _unexpected(args, exc)
        extra = _COMMAND_EXTRA.get(args.command, extra)  # what the whole subcommand needs, not just this module
        print(f"dafar {args.command}: '{exc.name}' is needed but is not installed: pip install 'dafar[{extra}]'",
              file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except OSError as exc:  # the file system said no: permissions, a full disk, a read-only folder
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        why = exc.strerror or type(exc).__name__
        errs = exc.args[0] if exc.args and isinstance(exc.args[0], list) else None
        if errs and isinstance(errs[0], tuple) and len(errs[0]) == 3:  # shutil.Error: [(src, dst, why), ...]
            where, why = f" {errs[0][1]}", f"{errs[0][2]}" + (f" (and {len(errs) - 1} more files)" if len(errs) > 1 else "")
            import re

            code = next((int(c) for c in re.findall(r"\[Errno (\d+)\]", why)), None)
            exc.errno = exc.errno or code
        hint = {errno.EACCES: " (check the folder's permissions)", errno.EPERM: " (check the folder's permissions)",
                errno.EROFS: " (a read-only file system: write the run elsewhere)",
                errno.ENOSPC: " (the disk is full: free space and rerun; finished steps are kept)",
                errno.EFBIG: " (a file-size limit, ulimit -f, or a full file system: raise it and rerun)"}.get(exc.errno, "")
        print(f"dafar {args.command}: error: cannot use{where}: {why}{hint}", file=sys.stderr)
        return RunFolderError.exit_code
    except Exception as exc:  # noqa: BLE001 - the boundary: a short line here, the traceback in a log
        return _unexpected(args, exc)


# the extra that provides each heavy module (what `pip install 'dafar[...]'` adds)
_EXTRA_OF = {"torch": "train", "safetensors": "train", "tqdm": "train", "matplotlib": "train", "PIL": "images",
             "onnx": "export", "onnxscript": "export", "onnx2tf": "export", "tensorflow": "export", "tf_keras": "export",
             "onnxruntime": "onnx-runtime", "ai_edge_litert": "litert", "art": "eval", "sklearn": "eval",
             "scipy": "eval", "hypothesis": "test"}  # (dafar reliability's fuzzing)


# quantize needs eval: its default detection check attacks the int8 model with ART (--attack-images 0 skips it)
_COMMAND_EXTRA = {"export": "export", "quantize": "eval", "eval": "eval", "pipeline": "all"}


# what each heavy subcommand imports, checked before it starts (so a device install, which has
# neither, is told which extra to add before any data is looked for or downloaded)
_COMMAND_MODULES = {"train": ("torch",), "attach": ("torch",), "export": ("torch", "onnx"),
                    "quantize": ("torch", "onnx"), "eval": ("torch", "art"), "pipeline": ("torch", "onnx", "art")}


def _check_extra(command: str) -> None:
    for mod in _COMMAND_MODULES.get(command, ()):
        require_available(mod, _COMMAND_EXTRA.get(command, _EXTRA_OF.get(mod, "all")), f"dafar {command}")


def _unexpected(args, exc: BaseException) -> int:
    """A failure dafar did not anticipate: one line on stderr, the traceback in a log file."""
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        fd, log = tempfile.mkstemp(prefix=f"dafar-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"dafar {args.command} {' '.join(sys.argv[1:])}\n\n{text}")
        where = f"; the traceback is in {log}"
    except OSError:  # nowhere to write it: print it after all
        where = "\n" + text
    print(f"dafar {args.command}: unexpected error: {type(exc).__name__}: {exc}{where} (please report it)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
