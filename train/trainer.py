"""Train DAFAR: joint E+F+D (paper Eq. 7), then C on clean residuals (Eq. 8), the victim-only
model for the accuracy comparison, threshold calibration on the validation split, and the run
folder every later stage reads.

Determinism: the model is initialised from ``seed``; each epoch's shuffling and augmentation
come from generators seeded by ``(seed, phase, epoch)``, so a run resumed from an epoch
checkpoint takes exactly the same steps as an uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as Fn

from dafar.data import Splits, load_dataset, sample_index
from dafar.errors import ConfigError, NonFiniteLossError, RunFolderError, TrainingError
from dafar.manifest import MANIFEST_NAME, atomic_write_json
from dafar.run import RunFolder, replaceable_run_folder, run_lock
from dafar.schema import Detector
from dafar.threshold import ThresholdRule, calibrate, false_positive_rate
from dafar.version import __version__

from .adversarial import perturb, robust_accuracy
from .config import FEEDBACK_POSITIONS, Augment, Device, Optimizer, TrainConfig
from .cost import subnet_costs
from .models import (ArchSpec, DafarNet, Normalize, Victim, build_dafar, build_victim, decoder_output_for, l2_per_sample,
                     custom_spec, paper_spec, resplit_victim, spec_from_record)
from .weights import load_checkpoint, load_into, read_checkpoint, save_checkpoint, save_state

__all__ = ["train", "attach", "TrainResult", "to_model_scale", "NORMALIZATION", "evaluate_arrays", "param_count",
           "resolve_victim_source"]

# Pixels u8 -> x01 = u8 / 255 in [0, 1] (the exported graphs' input contract) -> model scale
# x = (x01 - mean) / std.  MNIST and CIFAR-10 use 0.5 / 0.5 on every channel: [-1, 1], matching
# the paper decoder's Tanh output.
NORMALIZATION = {"mean": 0.5, "std": 0.5}
PHASES = ("joint", "detector", "victim", "decoder", "classifier")  # (append only: the index seeds each epoch's draw)


def to_model_scale(u8, norm: torch.nn.Module | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 NCHW pixels (a tensor, or a numpy array such as a memory-mapped cache) -> float32 on
    the model scale, with ``norm`` (a :class:`~dafar.train.models.Normalize`; default 0.5 / 0.5)."""
    if not isinstance(u8, torch.Tensor):  # read-only memory-mapped rows are copied (uint8: cheap)
        u8 = np.ascontiguousarray(u8) if u8.flags.writeable else np.array(u8)
    t = u8 if isinstance(u8, torch.Tensor) else torch.from_numpy(u8)
    x = t.to(device).float().div_(255.0) if device is not None else t.float().div_(255.0)
    if norm is None:
        return x.sub_(NORMALIZATION["mean"]).div_(NORMALIZATION["std"])
    return norm(x)


def param_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but torch sees no CUDA device")
    if cfg.device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device.value)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _epoch_rng(seed: int, phase: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, PHASES.index(phase), epoch])


def _augment(x: torch.Tensor, gen: torch.Generator, mode: Augment, cutout: int = 0) -> torch.Tensor:
    """``crop-flip``: random crop with 4-pixel padding and a horizontal flip; ``shift``: random
    translation by up to 2 pixels, no flip.  Padding is black (-1 on the model scale).  ``cutout``
    > 0 then greys out one ``cutout`` x ``cutout`` square per image (DeVries & Taylor 2017)."""
    if mode is not Augment.NONE:
        x = _crop_flip(x, gen, mode)
    if cutout:
        x = _cutout(x, gen, cutout)
    return x


def _cutout(x: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """Set one ``size`` x ``size`` square per image to 0 on the model scale (mid grey).  The square's
    centre is uniform over the image, so it may hang over the border and cover less, as in DeVries
    & Taylor's Cutout: the model sees whole images too.  The target of the reconstruction loss is
    the cut image, so D is never asked to invent the missing patch."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    lo_y, lo_x = (cy - size // 2).view(n, 1, 1), (cx - size // 2).view(n, 1, 1)
    hole = (rows >= lo_y) & (rows < lo_y + size) & (cols >= lo_x) & (cols < lo_x + size)  # (n, h, w)
    return x.masked_fill(hole.unsqueeze(1), 0.0)


def _crop_flip(x: torch.Tensor, gen: torch.Generator, mode: Augment) -> torch.Tensor:
    pad = 4 if mode is Augment.CROP_FLIP else 2
    n, _, h, w = x.shape
    padded = Fn.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = (torch.rand(n, generator=gen) < 0.5) if mode is Augment.CROP_FLIP else torch.zeros(n, dtype=torch.bool)
    out = torch.empty_like(x)
    for i in range(n):  # per-sample crops; cheap next to the convolutions
        crop = padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@dataclass
class _Data:
    """The images as uint8 NCHW numpy arrays (possibly memory-mapped from the decoded cache of a
    data set larger than memory: a batch reads only its rows), labels int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _tensors(splits: Splits, cfg: TrainConfig) -> _Data:
    # limits take a seeded class-mixed subset, never the first N (image folders are class-sorted)
    tr = splits.train.sample(cfg.train_limit, cfg.seed)
    te = splits.test.sample(cfg.test_limit, cfg.seed)
    return _Data(tr.images, tr.labels.astype(np.int64), splits.val.images, splits.val.labels.astype(np.int64),
                 te.images, te.labels.astype(np.int64))


class _Logger:
    """Per-epoch JSON lines in ``train_log.jsonl`` plus a human line on stderr."""

    def __init__(self, path: Path, quiet: bool):
        self.path, self.quiet = path, quiet

    def log(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if not self.quiet:
            keys = [k for k in ("loss", "ce", "recon", "train_acc", "val_acc", "val_robust_acc", "val_recon",
                                      "val_loss") if k in rec]
            body = " ".join(f"{k}={rec[k]:.4f}" for k in keys)
            print(f"[{rec['phase']}] epoch {rec['epoch'] + 1}/{rec['epochs']} {body} ({rec['seconds']:.0f}s)",
                  file=sys.stderr, flush=True)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [perm[i: i + batch_size] for i in range(0, n, batch_size)]


# Config fields a phase does not depend on: changing them keeps that phase's checkpoint usable
# (e.g. a run resumed with --no-victim keeps its 30 joint epochs; C's epochs do not touch the joint phase).
_DETECTOR_FIELDS = {"detector", "detector_epochs", "detector_lr", "detector_train_size"}
_PHASE_IGNORES = {"joint": _DETECTOR_FIELDS | {"train_victim"},
                  "decoder": _DETECTOR_FIELDS | {"train_victim", "dropout"},
                  "detector": {"train_victim"},
                  "victim": _DETECTOR_FIELDS | {"train_victim", "unpool", "recon_weight", "decoder_optimizer",
                                                "decoder_lr"},
                  "classifier": _DETECTOR_FIELDS | {"train_victim", "unpool", "recon_weight", "decoder_width",
                                                    "decoder_optimizer", "decoder_lr"}}


# Fields added after checkpoints were first written: a checkpoint without one was made with its default.
_ADDED_FIELDS = {f: TrainConfig.__dataclass_fields__[f].default
                 for f in ("dropout", "init_from", "ema", "keep_best", "cutout", "arch", "attach_to", "image_size",
                           "channels", "skip_bad_images", "width", "feedback_at", "victim_weights", "victim_mean",
                           "victim_std", "decoder_width", "optimizer", "classifier_only", "label_smoothing",
                           "decoder_optimizer", "decoder_lr", "new_decoder")}


def _same_schedule(saved: dict | None, now: dict) -> bool:
    if not isinstance(saved, dict) or saved.get("phase") != now["phase"] or not isinstance(saved.get("schedule"), dict):
        return False
    drop = _PHASE_IGNORES.get(now["phase"], set())

    def keep(d):
        return {k: v for k, v in d.items() if k not in drop}

    return keep({**_ADDED_FIELDS, **saved["schedule"]}) == keep(now["schedule"])


def _logged_seconds(log: Path, phase: str, epochs: int) -> list[float]:
    """Per-epoch seconds of a phase's first ``epochs`` epochs from train_log.jsonl (checkpoints
    written before they recorded their own); an epoch logged twice counts its last record."""
    found: dict[int, float] = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("phase") == phase and isinstance(r.get("epoch"), int) and r["epoch"] < epochs:
                found[r["epoch"]] = float(r.get("seconds", 0.0))
    return [found.get(e, 0.0) for e in range(epochs)]


def _fit(phase: str, model: torch.nn.Module, params, n_train: int, epochs: int, lr: float, cfg: TrainConfig,
         step: Callable[[np.ndarray, torch.Generator], tuple[torch.Tensor, dict]],
         validate: Callable[[], dict], ckpt: Path, logger: _Logger, resume: bool, quiet: bool,
         weight_decay: float = 0.0, earlier: dict | None = None, ema: float = 0.0,
         keep_best: bool = False, best_key: str = "val_acc", guard: float = 0.0,
         optimizer: Optimizer | None = None, decoder: tuple[list, Optimizer, float] | None = None) -> list[float]:
    """The shared epoch loop: Adam, AdamW or SGD (``optimizer``, else the config's) + one-cycle, per-epoch checkpoint, NaN guard, resume.
    ``decoder`` = (parameters, optimizer, peak lr): D's parameters (not in ``params``) stepped by an
    optimizer and one-cycle schedule of their own.
    Returns every epoch's seconds, those of earlier (resumed-from) calls included; ``earlier[phase]``
    gets the part earlier calls spent.  With ``ema`` the weights are averaged (:class:`_Ema`); with
    ``keep_best`` the checkpoint also keeps the weights of the best ``val_acc`` epoch.  The
    checkpoint's ``info["final"]`` names the weights the phase ends with (see :func:`_load_model_only`).
    ``best_key`` names the monitor value the best epoch is chosen by (adversarial training: the PGD
    accuracy); with ``guard`` > 0 a fall of more than ``guard`` since the previous epoch stops the
    phase (the best epoch's weights are kept, and a resumed run does not train on past it)."""
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = epochs * steps_per_epoch
    opt, sched = _optimizer(params, optimizer or cfg.optimizer, lr, weight_decay, total)
    if decoder is not None:  # D's parameters under an optimizer and schedule of their own
        d_opt, d_sched = _optimizer(decoder[0], decoder[1], decoder[2], weight_decay, total)
        opt, sched = _Optimizers(opt, d_opt), _Schedules(sched, d_sched)
    key = {"phase": phase, "schedule": cfg.schedule_key()}
    start = 0
    epoch_seconds: list[float] = []
    averager = _Ema(model, list(params) + list(decoder[0] if decoder else []), ema) if ema else None
    best: dict = {"val_acc": -1.0, "epoch": None, "state": None}
    prev = None  # the previous epoch's monitored value (the guard's reference)
    final = "best" if keep_best else "ema" if averager else "model"
    if ckpt.with_suffix(".json").exists():
        if not resume:
            raise RunFolderError(f"{ckpt.parent} holds an unfinished run; pass --resume to continue it or --overwrite")
        extra: dict = {}
        info = load_checkpoint(ckpt, model, opt, sched, extra)
        if not _same_schedule(info.get("key"), key):
            raise TrainingError(f"checkpoint {ckpt}.json was made with another configuration; cannot resume it")
        start = int(info["epochs_done"])
        if averager is not None:
            averager.load(extra, int(info.get("ema_steps", 0)))
        if keep_best and info.get("best_epoch") is not None:
            best = {"val_acc": float(info["best_val_acc"]), "epoch": int(info["best_epoch"]),
                    "state": {k[5:]: v for k, v in extra.items() if k.startswith("best.")}}
        if info.get("stopped_after") is not None:  # the guard stopped this phase: it is finished
            start = epochs
        prev = info.get("guard_prev")
        # the seconds of the epochs earlier calls trained (a run resumed over days reports them all)
        epoch_seconds = list(info.get("epoch_seconds") or _logged_seconds(logger.path, phase, start))
    if earlier is not None:
        earlier[phase] = float(sum(epoch_seconds))
    for epoch in range(start, epochs):
        model.train()
        t0 = time.perf_counter()
        rng = _epoch_rng(cfg.seed, phase, epoch)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        sums: dict[str, float] = {}
        count = 0
        batches = _batches(n_train, cfg.batch_size, rng)
        bar = tqdm(batches, desc=f"{phase} {epoch + 1}/{epochs}", unit="batch", leave=False, disable=quiet,
                   mininterval=1.0)
        for i, idx in enumerate(bar):
            loss, stats = step(idx, gen)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{phase} epoch {epoch + 1} step {i + 1}: loss is {loss.item()}; stopping. "
                    f"The last good checkpoint ({ckpt.name}, {start if epoch == start else epoch} epochs) is kept; "
                    "lower --lr and resume, or start over"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if averager is not None:
                averager.update()
            k = len(idx)
            count += k
            for name, v in stats.items():
                sums[name] = sums.get(name, 0.0) + float(v) * k
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        rec = {"phase": phase, "epoch": epoch, "epochs": epochs, "lr_end": sched.get_last_lr()[0]}
        rec.update({name: v / count for name, v in sums.items()})
        with averager.applied() if averager is not None else contextlib.nullcontext():
            rec.update(validate())  # the monitor judges the weights the phase would end with
            if keep_best and rec[best_key] > best["val_acc"]:
                best = {"val_acc": rec[best_key], "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        # Wong et al.'s rule: a fall of more than `guard` since the previous epoch (catastrophic
        # overfitting takes PGD accuracy to ~0 within an epoch; slower swings while the learning
        # rate is high are noise the best-epoch choice already absorbs)
        stop = guard > 0 and prev is not None and rec[best_key] < prev - guard
        if stop:
            rec["stopped"] = (f"{best_key} fell from {prev:.4f} (epoch {epoch}) to {rec[best_key]:.4f} (epoch "
                              f"{epoch + 1}): more than the guard {guard}; keeping epoch {best['epoch'] + 1}")
        prev = rec[best_key] if guard > 0 else None
        if averager is not None:
            rec["val_of"] = "ema"
        if keep_best:
            rec["best_epoch"] = best["epoch"]
        seconds = time.perf_counter() - t0
        rec["seconds"] = seconds
        epoch_seconds.append(seconds)
        info = {"key": key, "epochs_done": epoch + 1, "epoch_seconds": epoch_seconds, "final": final}
        extra = {}
        if averager is not None:
            info["ema_steps"] = averager.steps
            extra.update(averager.tensors())
        if keep_best:
            info.update(best_epoch=best["epoch"], best_val_acc=best["val_acc"], best_key=best_key)
            extra.update({f"best.{k}": v for k, v in best["state"].items()})
        if guard > 0:
            info["guard_prev"] = prev
        if stop:
            info["stopped_after"] = epoch + 1
        save_checkpoint(ckpt, model, opt, sched, info, extra)
        logger.log(rec)
        if stop:
            if not quiet:
                print(f"{phase}: {rec['stopped']}", flush=True)
            break
    return epoch_seconds


def _optimizer(params, kind: Optimizer, lr: float, weight_decay: float, total: int):
    if kind is Optimizer.SGD:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    elif kind is Optimizer.ADAMW:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if total >= 4:
        # one-cycle (warm-up over a quarter of the steps, then cosine decay; Adam's beta1 or SGD's
        # momentum cycled between 0.85 and 0.95):
        # the fewest epochs to a given accuracy on this CPU budget among the schedules we tried
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=max(0.25, 2.0 / total))
    else:  # too few steps for a cycle (smoke runs): constant learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


class _Optimizers:
    """Two optimizers stepped as one.  Its state dict has one optimizer's layout, the second's
    parameter ids shifted past the first's, so a checkpoint stores it like any other."""

    def __init__(self, a: torch.optim.Optimizer, b: torch.optim.Optimizer):
        self.a, self.b = a, b
        self.n = sum(len(g["params"]) for g in a.param_groups)  # the first's parameter ids: 0 .. n-1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.a.zero_grad(set_to_none=set_to_none)
        self.b.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.a.step()
        self.b.step()

    def state_dict(self) -> dict:
        sa, sb, n = self.a.state_dict(), self.b.state_dict(), self.n
        groups = sa["param_groups"] + [{**g, "params": [i + n for i in g["params"]]} for g in sb["param_groups"]]
        return {"state": {**sa["state"], **{int(i) + n: v for i, v in sb["state"].items()}}, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        n, k = self.n, len(self.a.param_groups)
        if len(sd["param_groups"]) != k + len(self.b.param_groups):
            raise TrainingError("the checkpoint's optimizer has another number of parameter groups; cannot resume it")
        state = {int(i): v for i, v in sd["state"].items()}
        self.a.load_state_dict({"state": {i: v for i, v in state.items() if i < n},
                                "param_groups": sd["param_groups"][:k]})
        self.b.load_state_dict({"state": {i - n: v for i, v in state.items() if i >= n},
                                "param_groups": [{**g, "params": [i - n for i in g["params"]]}
                                                 for g in sd["param_groups"][k:]]})


class _Schedules:
    """The two optimizers' learning-rate schedules, stepped as one; their states side by side."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def step(self) -> None:
        self.a.step()
        self.b.step()

    def get_last_lr(self) -> list[float]:
        return self.a.get_last_lr() + self.b.get_last_lr()

    def state_dict(self) -> dict:
        return {"first": self.a.state_dict(), "second": self.b.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.a.load_state_dict(sd["first"])
        self.b.load_state_dict(sd["second"])


def _kept(info: dict, cfg: TrainConfig) -> dict:
    out = {"weights": {"model": "last epoch", "ema": "weight average after the last epoch",
                       "best": "best validation epoch"}[info.get("final", "model")],
           "epochs_done": info.get("epochs_done")}
    if cfg.ema:
        out["ema_decay"] = cfg.ema
    if info.get("best_epoch") is not None:
        key = info.get("best_key", "val_acc")
        out.update(best_epoch=int(info["best_epoch"]) + 1, best_by=key)
        out["best_monitor_val_acc" if key == "val_acc" else f"best_monitor_{key}"] = info.get("best_val_acc")
    if info.get("stopped_after") is not None:
        out["stopped_by_guard_after_epoch"] = int(info["stopped_after"])
    return out


class _Ema:
    """Exponential moving average of ``params`` of ``model`` (Polyak averaging), updated after every
    optimizer step.  The decay warms up as min(decay, (1 + t) / (10 + t)) so the average follows
    the weights closely for the first steps (TensorFlow's ExponentialMovingAverage rule)."""

    def __init__(self, model: torch.nn.Module, params, decay: float):
        ids = {id(p) for p in params}
        self.decay, self.steps = float(decay), 0
        named = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
        self.names = [n for n, _ in named]
        self.live = [p for _, p in named]  # the parameters are updated in place, never replaced
        self.shadow = {n: p.detach().clone() for n, p in named}

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self.live], 1.0 - d)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": v for n, v in self.shadow.items()}

    def load(self, tensors: dict, steps: int) -> None:
        missing = [n for n in self.names if f"ema.{n}" not in tensors]
        if missing:
            raise TrainingError(f"the checkpoint has no weight average for {missing[:3]}; cannot resume it with ema")
        self.shadow = {n: tensors[f"ema.{n}"].to(self.shadow[n]) for n in self.names}
        self.steps = steps

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own weights again after it."""
        saved = [p.detach().clone() for p in self.live]
        with torch.no_grad():
            for p, v in zip(self.live, self.shadow.values()):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.live, saved):
                    p.copy_(v)


@torch.no_grad()
def evaluate_arrays(model: DafarNet, x_u8, device: torch.device, batch_size: int,
                    victim: Victim | None = None, purify: bool = True, with_ae: bool = True) -> dict[str, np.ndarray]:
    """Victim logits and L2 scores for uint8 NCHW images (an array or a tensor), plus the purified
    logits (``purify``) and the C scores (``with_ae``, when the model has C)."""
    model.eval()
    out: dict[str, list] = {"logits": [], "purified_logits": [], "l2": [], "ae": [], "victim_only_logits": []}
    for i in range(0, len(x_u8), batch_size):
        # .to(memory_format=...), not .contiguous(...): for one channel a plain tensor already counts as
        # channels-last and .contiguous keeps its strides, and other strides pick other convolution
        # kernels (the published scores were computed with these)
        x = to_model_scale(x_u8[i: i + batch_size], model.norm, device).to(memory_format=torch.channels_last)
        logits, recon = model(x)
        out["logits"].append(logits)
        out["l2"].append(model.l2_score(x, recon))
        if purify:
            out["purified_logits"].append(model.purified_logits(recon))
        if with_ae and model.C is not None:
            out["ae"].append(model.ae_score(x, recon))
        if victim is not None:
            victim.eval()
            out["victim_only_logits"].append(victim(x))
    return {k: torch.cat(v).float().cpu().numpy() for k, v in out.items() if v}


@torch.no_grad()
def _classifier_logits(net: DafarNet, x_u8, device: torch.device, batch_size: int) -> np.ndarray:
    """F(E(x)) for uint8 NCHW images (a classifier-only run: no decoder to evaluate)."""
    net.eval()
    out = [net.F(net.E(to_model_scale(x_u8[i: i + batch_size], net.norm, device)
                       .to(memory_format=torch.channels_last)).z) for i in range(0, len(x_u8), batch_size)]
    return torch.cat(out).float().cpu().numpy()


def _accuracy(logits: np.ndarray, y) -> float:
    return float(np.mean(logits.argmax(1) == np.asarray(y)))


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    manifest: dict
    metrics: dict

    def summary_lines(self) -> list[str]:
        """The headline numbers, as ``dafar train`` prints them."""
        m = self.metrics
        lines = [f"run folder: {self.run_dir}",
                 f"victim test accuracy:    {100 * m['victim_test_acc']:.2f}%"]
        if "purified_test_acc" in m:
            lines.append(f"purified test accuracy:  {100 * m['purified_test_acc']:.2f}%")
        if "victim_only_test_acc" in m:
            lines.append(f"victim-only accuracy:    {100 * m['victim_only_test_acc']:.2f}%")
        for det in Detector:
            d = det.value
            if f"{d}_alpha" in m:
                lines.append(f"{d:12s} alpha={m[f'{d}_alpha']:.4f}  val FPR {100 * m[f'{d}_val_fpr']:.2f}%  "
                             f"test FPR {100 * m[f'{d}_test_fpr']:.2f}%")
        lines.append(f"total time: {m['timing']['total_seconds']:.0f} s on {m['timing']['device']}")
        if m["timing"].get("mode") == "classifier":
            from dafar.manifest import attach_command

            lines.append(f"a classifier alone: attach DAFAR with `{attach_command(self.manifest, self.run_dir)}`")
        return lines


@contextlib.contextmanager
def _train_lock(out: Path, replace: bool):
    """The run folder's lock for a training run (see :func:`dafar.run.run_lock`); a folder being
    replaced is checked for another holder before it is deleted."""
    if replace and out.is_dir():
        with run_lock(out, "train"):
            pass  # refused here when another stage holds it: nothing deleted
    _prepare_run_dir(out, replace)
    with run_lock(out, "train"):
        yield


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse an ``--out`` that this call may not use, before any work; True when it is a run
    folder that ``overwrite`` replaces."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        replaceable_run_folder(out)  # raises, naming what --out is instead
    if out.exists() and any(out.iterdir()):
        finished = (out / MANIFEST_NAME).exists()
        if overwrite:
            return replaceable_run_folder(out)  # only a run folder, never a user's other files
        elif finished and not resume:
            raise RunFolderError(f"{out} already holds a finished run; pass --overwrite or choose another --out")
        elif finished and resume:
            raise RunFolderError(f"{out} already holds a finished run; there is nothing to resume")
        elif not resume and (out / "checkpoints").exists():
            raise RunFolderError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite")
        elif not resume:
            raise RunFolderError(f"{out} is not empty and is not a dafar run; choose another --out")
    elif resume:
        raise RunFolderError(f"nothing to resume in {out}: it holds no checkpoints")
    return False


def _prepare_run_dir(out: Path, replace: bool) -> None:
    if replace:
        shutil.rmtree(out)
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "weights").mkdir(exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create run folder {out}: {exc}") from exc


def _versions() -> dict:
    import safetensors

    return {
        "dafar": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
    }


def _normalization(splits: Splits) -> dict:
    """Per-channel mean and std of images in [0, 1] that the model scale is computed with: measured
    on the training split of an image folder; the paper's 0.5 / 0.5 for MNIST and CIFAR-10 (their
    published weights were trained on it)."""
    if splits.normalization is not None:
        return {"mean": list(splits.normalization["mean"]), "std": list(splits.normalization["std"])}
    c = splits.input_shape[0]
    return {"mean": [NORMALIZATION["mean"]] * c, "std": [NORMALIZATION["std"]] * c}


def _resumed_config(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The saved configuration of the run being resumed, checked against the one given."""
    saved = out / "config.json"
    if not saved.exists():
        raise RunFolderError(f"nothing to resume in {out}: {saved.name} is missing")
    try:
        cfg_saved = TrainConfig.from_dict(json.loads(saved.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise RunFolderError(f"{saved} is unreadable: {exc}") from exc
    # Whether to train the victim-only comparison model may change on resume (it is the last
    # phase and nothing else depends on it): a long run can be finished without it and the
    # comparison trained later in a copy of the folder.  Every other difference is refused.
    a, b = cfg_saved.schedule_key(), cfg.schedule_key()
    a.pop("train_victim"), b.pop("train_victim")
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise TrainingError(
            f"--resume: the options given differ from the run's saved configuration ({saved}) in {diff}; "
            "resume with the same options, or start a new run"
        )
    return cfg_saved.replace(device=cfg.device, threads=cfg.threads, train_victim=cfg.train_victim)


@dataclass
class _Session:
    """What every training phase of one call shares."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    data: _Data
    logger: _Logger
    resume: bool
    quiet: bool
    parent: dict | None
    earlier: dict  # seconds spent by earlier calls of a resumed run, per phase
    spec: ArchSpec
    normalization: dict  # {"mean": [...], "std": [...]} per channel, of images in [0, 1]
    attach: dict | None = None  # plug-in mode: the run whose frozen E and F the decoder is attached to
    memfmt: torch.memory_format = torch.channels_last  # ~20% faster convolutions on CPU (oneDNN), neutral on CUDA

    def __post_init__(self):
        # Per-epoch monitoring uses 2,000 validation images (the log's val_acc/val_recon); the threshold
        # is calibrated on the whole validation split after training.  The subset is a seeded random
        # draw, not the first 2,000: the validation indices are sorted and an image-folder data set
        # (CIFAR-10 here) lists its images class by class, so the first 2,000 were four classes only
        # (airplane to cat), a monitor ~3 points below the whole split's accuracy.
        self.norm = Normalize(self.normalization["mean"], self.normalization["std"])  # on the CPU, where batches are built
        mon = sample_index(len(self.data.val_y), 2000, self.cfg.seed)
        self.mon_x, self.mon_y = self.data.val_x[mon], self.data.val_y[mon]  # gathered once, read every epoch

    @property
    def n_train(self) -> int:
        return len(self.data.train_y)

    @property
    def ckdir(self) -> Path:
        return self.out / "checkpoints"

    def batch(self, idx: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_scale(self.data.train_x[idx], self.norm)
        x = _augment(x, gen, self.cfg.augment, self.cfg.cutout)
        return x.to(self.device, memory_format=self.memfmt), torch.from_numpy(self.data.train_y[idx]).to(self.device)

    def best_rule(self) -> dict:
        """How a phase that trains the victim chooses its final epoch: adversarial training keeps the
        epoch with the best PGD monitor accuracy and stops on the overfitting guard (Wong et al.;
        Rice et al. 2020: the best robust epoch beats the last); otherwise --keep-best decides."""
        adv = self.cfg.adv_settings()
        if adv is None:
            return {"keep_best": self.cfg.keep_best}
        return {"keep_best": True, "best_key": "val_robust_acc", "guard": adv.guard}

    def robust_monitor(self, model, classify) -> dict:
        """PGD-10 accuracy on the first 500 monitor images at the training budget (adversarial
        training only): what the guard watches."""
        adv = self.cfg.adv_settings()
        if adv is None:
            return {}
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():  # the monitors run under no_grad; the attack needs gradients
                return {"val_robust_acc": self._robust_acc(classify, adv)}
        finally:
            model.train(was)

    def _robust_acc(self, classify, adv) -> float:
        x = to_model_scale(self.mon_x[:500], self.norm).to(self.device, memory_format=self.memfmt)
        y = torch.from_numpy(self.mon_y[:500].astype(np.int64)).to(self.device)
        return robust_accuracy(classify, x, y, self.norm, adv.eps, steps=10,
                               gen=torch.Generator().manual_seed(self.cfg.seed + 17))

    def fit(self, phase: str, model, params, n: int, epochs: int, lr: float, step, validate, **kw) -> list[float]:
        return _fit(phase, model, params, n, epochs, lr, self.cfg, step, validate, self.ckdir / phase, self.logger,
                    self.resume, self.quiet, earlier=self.earlier, **kw)


def _joint_phase(s: _Session) -> tuple[DafarNet, list[float], dict]:
    """E + F + D jointly, loss = mean(||x - D(E(x))||_2 + CE)  (paper Eq. 7)."""
    cfg = s.cfg
    _seed_everything(cfg.seed)
    net = build_dafar(s.spec, cfg.unpool, with_detector=cfg.detector, dropout=cfg.dropout, normalization=s.normalization)
    if s.parent is not None:  # a resumed checkpoint below overrides these with its own weights
        _load_classifier(net, s.parent["dir"], s.parent["spec"], s.spec)
        if s.parent["has_decoder"]:  # else (a classifier trained alone) D starts from its initialisation
            load_into(net.D, s.parent["dir"] / "weights/D.safetensors")
    net = net.to(s.device, memory_format=s.memfmt)

    adv = cfg.adv_settings()

    def classify(xm):
        return net.F(net.E(xm).z)

    def joint_step(idx, gen):
        x, y = s.batch(idx, gen)
        if adv is None:
            logits, recon = net(x)
        else:  # CE on the attacked batch, the reconstruction on the clean one (D learns clean images)
            x_adv = perturb(classify, x, y, s.norm, adv.eps, adv.steps, adv.step_size, gen)
            recon = net.D(net.E(x))
            logits = classify(x_adv)
        recon_l2 = l2_per_sample(x - recon).mean()
        ce = Fn.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        loss = cfg.recon_weight * recon_l2 + ce
        acc = (logits.argmax(1) == y).float().mean()
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "recon": recon_l2.detach(), "train_acc": acc}

    def joint_val():
        ev = evaluate_arrays(net, s.mon_x, s.device, cfg.eval_batch_size, purify=False, with_ae=False)
        return {"val_acc": _accuracy(ev["logits"], s.mon_y), "val_recon": float(ev["l2"].mean()),
                **s.robust_monitor(net, classify)}

    params, split = _joint_params(net), None
    if cfg.decoder_optimizer is not None or cfg.decoder_lr is not None:  # D on its own optimizer
        d_ids = {id(p) for p in net.D.parameters()}
        split = ([p for p in params if id(p) in d_ids], cfg.decoder_optimizer or cfg.optimizer,
                 cfg.decoder_lr or cfg.lr)
        params = [p for p in params if id(p) not in d_ids]
    seconds = s.fit("joint", net, params, s.n_train, cfg.epochs, cfg.lr, joint_step, joint_val,
                    weight_decay=cfg.weight_decay, ema=cfg.ema, decoder=split, **s.best_rule())
    # the checkpoint holds the final joint weights whether or not this call trained any epoch
    kept = _kept(_load_model_only(s.ckdir / "joint", net), cfg)
    return net, seconds, kept


def _decoder_phase(s: _Session) -> tuple[DafarNet, list[float], dict]:
    """Plug-in mode: the victim's E and F, loaded from the run being attached to and frozen (never
    updated, so its logits are the classifier's, bit for bit); only D learns to rebuild the input
    from E's features, loss = mean ||x - D(E(x))||_2."""
    cfg, src = s.cfg, s.attach
    _seed_everything(cfg.seed)
    net = build_dafar(s.spec, cfg.unpool, with_detector=cfg.detector, normalization=s.normalization)
    if src.get("graph") is not None:  # a classifier of one's own: its state dict, split between E and F
        state = src["state"]
        for sub in (net.E, net.F):
            want = sub.state_dict()
            sub.load_state_dict({k: state[k[len("net."):]] for k in want}, strict=True)
    else:
        _load_classifier(net, src["dir"], src["spec"], s.spec)
    if s.parent is not None:  # --init-from: a previous plug-in run's D as the start
        load_into(net.D, s.parent["dir"] / "weights/D.safetensors")
    net = net.to(s.device, memory_format=s.memfmt)
    for p in list(net.E.parameters()) + list(net.F.parameters()):
        p.requires_grad_(False)

    def decoder_step(idx, gen):
        x, _ = s.batch(idx, gen)
        net.E.eval()  # frozen: no training-mode behaviour either
        with torch.no_grad():
            feats = net.E(x)
        recon = net.D(feats)
        loss = l2_per_sample(x - recon).mean()
        return loss, {"loss": loss.detach(), "recon": loss.detach()}

    def decoder_val():
        ev = evaluate_arrays(net, s.mon_x, s.device, cfg.eval_batch_size, purify=True, with_ae=False)
        return {"val_acc": _accuracy(ev["logits"], s.mon_y), "val_purified_acc": _accuracy(ev["purified_logits"], s.mon_y),
                "val_recon": float(ev["l2"].mean())}

    seconds = s.fit("decoder", net, list(net.D.parameters()), s.n_train, cfg.epochs, cfg.decoder_lr or cfg.lr,
                    decoder_step, decoder_val, weight_decay=cfg.weight_decay, ema=cfg.ema, keep_best=False,
                    optimizer=cfg.decoder_optimizer)
    kept = _kept(_load_model_only(s.ckdir / "decoder", net), cfg)
    for p in list(net.E.parameters()) + list(net.F.parameters()):
        p.requires_grad_(True)
    return net, seconds, kept


def _load_classifier(net: DafarNet, run_dir: Path, src_spec, spec) -> None:
    """E and F of ``net`` from a run folder's weights, split at ``src_spec``'s feedback position;
    at another position the tensors move between E and F unchanged (F(E(x)) is the same function)."""
    if src_spec.feedback_at == spec.feedback_at:
        for name in ("E", "F"):
            load_into(getattr(net, name), run_dir / f"weights/{name}.safetensors")
        return
    whole = build_victim(src_spec)
    for name in ("E", "F"):  # verified against the victim's own split first
        load_into(getattr(whole, name), run_dir / f"weights/{name}.safetensors")
    e_state, f_state = resplit_victim(whole.E.state_dict(), whole.F.state_dict(), src_spec, spec)
    net.E.load_state_dict(e_state, strict=True)
    net.F.load_state_dict(f_state, strict=True)


def _joint_params(net: DafarNet) -> list:
    return [p for n, p in net.named_parameters() if not n.startswith("C.")]


def _detector_phase(s: _Session, net: DafarNet) -> list[float]:
    """C on clean residuals of the training images (paper Eq. 8), E, F, D frozen."""
    cfg, device = s.cfg, s.device
    n_res = s.n_train if cfg.detector_train_size is None else min(cfg.detector_train_size, s.n_train)
    # the residuals are held in memory (float32): at most ~2 GiB of them (large images: fewer)
    n_res = max(min(n_res, (2 << 30) // (4 * s.spec.input_numel)), min(n_res, cfg.batch_size))
    pick = np.sort(np.random.default_rng([cfg.seed, 99]).choice(s.n_train, n_res, replace=False))
    res = _residuals(net, s.data.train_x[pick], device, cfg.eval_batch_size)
    res_val = _residuals(net, s.mon_x, device, cfg.eval_batch_size)  # C's val loss, for the log
    joint = _joint_params(net)
    for p in joint:
        p.requires_grad_(False)

    def det_step(idx, gen):
        d = res[idx].to(device)
        loss = l2_per_sample(d - net.C(d)).mean()
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def det_val():
        net.eval()
        vals = [l2_per_sample(res_val[i: i + 4096].to(device) - net.C(res_val[i: i + 4096].to(device)))
                for i in range(0, len(res_val), 4096)]
        return {"val_loss": float(torch.cat(vals).mean())}

    # C always trains with Adam at --detector-lr: --optimizer/--lr/--weight-decay are the classifier's
    seconds = s.fit("detector", net, list(net.C.parameters()), n_res, cfg.detector_epochs, cfg.detector_lr,
                    det_step, det_val, optimizer=Optimizer.ADAM)
    _load_model_only(s.ckdir / "detector", net)
    for p in joint:
        p.requires_grad_(True)
    return seconds


def _victim_phase(s: _Session, phase: str = "victim") -> tuple[Victim, list[float], dict]:
    """The victim alone, F(E(x)) with CE only: the victim-only comparison model (same schedule as
    the joint phase), or with ``phase="classifier"`` the whole of a ``--classifier-only`` run."""
    cfg, device = s.cfg, s.device
    _seed_everything(cfg.seed)
    victim = build_victim(s.spec, dropout=cfg.dropout)
    if s.parent is not None:
        load_into(victim, s.parent["dir"] / "weights/victim_only.safetensors")
    victim = victim.to(device, memory_format=s.memfmt)

    adv = cfg.adv_settings()

    def victim_step(idx, gen):
        x, y = s.batch(idx, gen)
        if adv is not None:
            x = perturb(victim, x, y, s.norm, adv.eps, adv.steps, adv.step_size, gen)
        logits = victim(x)
        ce = Fn.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return ce, {"loss": ce.detach(), "train_acc": (logits.argmax(1) == y).float().mean()}

    @torch.no_grad()
    def victim_val():
        victim.eval()
        n_mon = len(s.mon_y)
        hits = sum(int((victim(to_model_scale(s.mon_x[i: i + 1000], s.norm).to(device)).argmax(1).cpu().numpy()
                        == s.mon_y[i: i + 1000]).sum()) for i in range(0, n_mon, 1000))
        return {"val_acc": hits / n_mon, **s.robust_monitor(victim, victim)}

    seconds = s.fit(phase, victim, list(victim.parameters()), s.n_train, cfg.epochs, cfg.lr, victim_step,
                    victim_val, weight_decay=cfg.weight_decay, ema=cfg.ema, **s.best_rule())
    kept = _kept(_load_model_only(s.ckdir / phase, victim), cfg)
    return victim, seconds, kept


def _save_scores(path: Path, ev_val: dict, ev_test: dict, test_y: np.ndarray) -> None:
    """Clean validation and test scores of both detectors, and the test predictions (reports, recalibration)."""
    keys = [Detector(d).score_key for d in Detector]
    np.savez_compressed(path, **{f"val_{k}": v for k, v in ev_val.items() if k in keys},
                        **{f"test_{k}": v for k, v in ev_test.items() if k in keys},
                        test_labels=test_y, test_pred=ev_test["logits"].argmax(1),
                        test_purified_pred=ev_test["purified_logits"].argmax(1))


def _folder_record(cfg: TrainConfig, splits: Splits) -> dict:
    """An image folder's preprocessing, as every later stage (and ``dafar predict``) repeats it."""
    if splits.preprocess is None:
        return {}
    pre = dict(splits.preprocess)
    skipped = pre.pop("skipped_images")
    ignored = pre.pop("ignored_non_image_files")
    return {"preprocess": {**pre, "skip_bad_images": cfg.skip_bad_images, "val_size_requested": cfg.val_size},
            "skipped_images": {"count": len(skipped), "files": skipped}, "ignored_non_image_files": ignored}


def _manifest_body(cfg: TrainConfig, splits: Splits, data: _Data, net: DafarNet, normalization: dict, thresholds: dict,
                   metrics: dict, timing: dict) -> dict:
    """Everything the manifest says about a freshly trained run, but its file table."""
    spec = net.spec
    ds = splits.name.value
    adv = cfg.adv_settings()
    return {
        "kind": "dafar-run",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {
            "name": ds,
            "classes": list(splits.classes),
            "source": splits.source,
            "fingerprint_sha256": splits.fingerprint,
            "sizes": {"train": len(data.train_y), "val": len(data.val_y), "test": len(data.test_y)},
            "val_split": {"from": "train", "size": len(data.val_y), "seed": cfg.seed},
            "note": "CIFAR-10 (JPEG q75) when read from the re-encoded image-folder copy" if ds == "cifar10" else "",
            **_folder_record(cfg, splits),
        },
        "input": {
            "shape": list(spec.input_shape),
            "layout": "NCHW",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "from_uint8": "x01 = pixels / 255",
            "normalization": {"mean": list(normalization["mean"]), "std": list(normalization["std"]),
                              "formula": "x = (x01 - mean) / std" + (", in [-1, 1]" if spec.decoder_out == "tanh" else "")},
        },
        "architecture": {
            "name": spec.name,
            "family": spec.family,
            **({"width": spec.width_mult} if spec.family == "mobile" else {}),
            "feedback_at": spec.feedback_at,  # where E ends and D takes its input
            "decoder_width": spec.decoder_width,  # D's channel multiplier (1 = the paper's decoder)
            # a classifier of one's own: its traced graph (torch.nn layers only; loading it runs no code)
            **({"victim_graph": json.loads(spec.victim_graph), "feature_shape": list(spec.feature_shape)}
               if spec.family == "custom" else {}),
            "decoder_output": spec.decoder_out,
            "unpool": cfg.unpool.value,
            "unpool_tie_rule": {"mask": "every window position equal to the window maximum receives it",
                                "maxunpool": "maxunpool indices (first maximum)",
                                "upsample": "no mask: every window position receives the value"}[cfg.unpool.value],
            "num_classes": spec.num_classes,
            "detector": cfg.detector and not cfg.classifier_only,
            # a classifier alone (--classifier-only): E and F, no decoder yet (dafar attach --victim RUN)
            **({"decoder": None} if cfg.classifier_only else {}),
            "params": {k: param_count(getattr(net, k)) for k in ("E", "F", "D", "C")},
            "costs": subnet_costs(net),  # MACs and parameters per subnetwork, for one image
            "victim_params": param_count(net.E) + param_count(net.F),
        },
        "score": {Detector.L2.value: "||x - D(E(x))||_2 on the model scale [-1, 1]",
                  Detector.AUTOENCODER.value: "||d - C(d)||_2 with d = x - D(E(x)), model scale"},
        "thresholds": thresholds,
        "training": {"config": cfg.to_dict(), **timing,
                     **({"adversarial": adv.to_dict()} if adv is not None else {})},
        "metrics": {k: v for k, v in metrics.items() if k != "timing"},
        "versions": _versions(),
    }


def train(cfg: TrainConfig, out: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
          resume: bool = False, overwrite: bool = False, download: bool = True, quiet: bool = False,
          _victim_module: torch.nn.Module | None = None) -> TrainResult:
    """Train a DAFAR model per ``cfg`` into the run folder ``out``; returns its manifest."""
    out = Path(out)
    if resume:
        cfg = _resumed_config(cfg, out)
    parent = _parent_run(cfg) if cfg.init_from else None  # refused before the run folder is touched
    attach = _attach_source(cfg, _victim_module) if cfg.attach_to else None
    replace = _check_run_dir(out, resume, overwrite)
    t_start = time.perf_counter()
    # the data first: a missing or bad data set leaves no run folder behind
    splits = load_dataset(cfg.dataset, data_dir, download=download, val_size=cfg.val_size, seed=cfg.seed,
                          image_size=cfg.image_size, channels=cfg.channels, skip_bad_images=cfg.skip_bad_images)
    # the network next, sized from the data: a layer or shape that does not fit is refused before
    # the run folder is touched
    normalization = attach["normalization"] if attach else _normalization(splits)  # E was trained on its own
    dec_out = decoder_output_for(normalization["mean"], normalization["std"])
    if attach and attach.get("graph") is not None:  # a classifier of one's own: sized (and checked) on this data
        if len(normalization["mean"]) != splits.input_shape[0]:
            raise ConfigError(f"the classifier's normalization has {len(normalization['mean'])} channels, the images "
                              f"have {splits.input_shape[0]} (--mean/--std give one value per channel)")
        spec = custom_spec(attach["graph"], splits.input_shape, len(splits.classes), dec_out, cfg.feedback_at,
                           cfg.decoder_width)
    else:
        spec = paper_spec(cfg.arch_name.value, splits.input_shape, len(splits.classes), dec_out, cfg.width,
                          cfg.feedback_at, cfg.decoder_width)
    if attach and attach.get("graph") is None:
        attach["record"]["same_data"] = attach["fingerprint"] == splits.fingerprint
        # the decoder may attach at another layer than the victim's own E/F split (its weights are
        # re-split, unchanged: resplit_victim); everything else must be the victim's network
        if dataclasses.replace(attach["spec"], feedback="", decoder_width=1.0) != \
                dataclasses.replace(spec, feedback="", decoder_width=1.0):
            raise ConfigError(f"--victim {attach['dir']}: its network ({attach['spec'].family}, input "
                              f"{list(attach['spec'].input_shape)}, {attach['spec'].num_classes} classes) does not fit this "
                              f"data ({list(spec.input_shape)}, {spec.num_classes} classes)")
    # the run folder is this process's until the run is written: a second stage (or a second
    # `train --overwrite`) on it is refused instead of deleting what this one writes
    with _train_lock(out, replace):
        atomic_write_json(out / "config.json", cfg.to_dict())
        if not resume:
            (out / "train_log.jsonl").unlink(missing_ok=True)

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = _resolve_device(cfg)
        torch.use_deterministic_algorithms(True, warn_only=True)
        data = _tensors(splits, cfg)
        if parent is not None:
            parent["record"]["same_data"] = parent.pop("fingerprint") == splits.fingerprint
        s = _Session(cfg, out, device, data, _Logger(out / "train_log.jsonl", quiet), resume, quiet, parent, {}, spec,
                     normalization, attach)

        victim = None
        if cfg.classifier_only:  # E and F alone; D (and C) are attached later (dafar attach --victim RUN)
            classifier, first_seconds, first_kept = _victim_phase(s, "classifier")
            seconds, kept = {"classifier": first_seconds}, {"classifier": first_kept}
            net = build_dafar(spec, cfg.unpool, with_detector=False, normalization=normalization)
            for name in ("E", "F"):
                getattr(net, name).load_state_dict(getattr(classifier, name).state_dict(), strict=True)
            net = net.to(device, memory_format=s.memfmt)
            net.D = None  # never trained: not saved, not described
        else:
            first = "decoder" if attach else "joint"
            net, first_seconds, first_kept = (_decoder_phase if attach else _joint_phase)(s)
            seconds, kept = {first: first_seconds}, {first: first_kept}
            if cfg.detector:
                seconds["detector"] = _detector_phase(s, net)
            if cfg.train_victim:
                victim, seconds["victim"], kept["victim"] = _victim_phase(s)

        # ---- evaluation and thresholds
        t_eval = time.perf_counter()
        if cfg.classifier_only:
            ev_val = {"logits": _classifier_logits(net, data.val_x, device, cfg.eval_batch_size)}
            ev_test = {"logits": _classifier_logits(net, data.test_x, device, cfg.eval_batch_size)}
            thresholds: dict = {}
        else:
            ev_val = evaluate_arrays(net, data.val_x, device, cfg.eval_batch_size, purify=False)
            ev_test = evaluate_arrays(net, data.test_x, device, cfg.eval_batch_size, victim)
            thresholds = _thresholds(cfg, ev_val, ev_test, splits.name.value)
        metrics = _metrics(cfg, ev_val, ev_test, data, thresholds)
        if cfg.adv_settings() is not None:
            metrics["robust"] = _robust_metrics(s, net, victim)
        eval_seconds = time.perf_counter() - t_eval

        # ---- write weights, scores, metrics and the manifest (manifest last: it marks the run complete)
        net = net.to("cpu", memory_format=torch.contiguous_format)
        meta = {"arch": spec.name, "unpool": cfg.unpool.value, "format": "dafar-weights-v1"}
        files: dict[str, dict] = {}
        for name in ("E", "F", "D", "C"):
            mod = getattr(net, name)
            if mod is not None:
                save_state(out / f"weights/{name}.safetensors", mod.state_dict(), {**meta, "module": name})
                files[f"weights/{name}.safetensors"] = {"role": "weights", "module": name}
        if victim is not None:
            victim = victim.to("cpu", memory_format=torch.contiguous_format)
            save_state(out / "weights/victim_only.safetensors", victim.state_dict(), {**meta, "module": "victim_only"})
            files["weights/victim_only.safetensors"] = {"role": "weights", "module": "victim_only"}
        if not cfg.classifier_only:  # a classifier alone has no scores
            _save_scores(out / "scores.npz", ev_val, ev_test, data.test_y)
        timing = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "seconds_per_epoch": dict(seconds),
            "eval_seconds": eval_seconds,
            # every call of a resumed run: this call's wall time plus the epochs earlier calls trained
            "total_seconds": time.perf_counter() - t_start + sum(s.earlier.values()),
            "seconds_in_earlier_calls": s.earlier,
            "resumed": resume,
            # which weights each phase ended with (the last epoch's, the average's, the best epoch's)
            "kept_weights": kept,
        }
        if parent is not None:
            timing["init_from"] = parent["record"]
        timing["mode"] = "classifier" if cfg.classifier_only else "plug-in" if attach else "joint"
        if attach is not None:
            timing["attached_to"] = attach["record"]
        metrics["timing"] = timing
        atomic_write_json(out / "metrics.json", metrics)
        files.update({**({} if cfg.classifier_only else {"scores.npz": {"role": "scores"}}),
                      "metrics.json": {"role": "metrics"}, "config.json": {"role": "config"},
                      "train_log.jsonl": {"role": "log"}})
        run = RunFolder.create(out, _manifest_body(cfg, splits, data, net, normalization, thresholds, metrics, timing), files)
        return TrainResult(out, run.manifest, metrics)


def attach(victim: str | os.PathLike, out: str | os.PathLike, config: TrainConfig | None = None, *,
           data_dir: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
           download: bool = True, quiet: bool = False) -> TrainResult:
    """Plug-in mode: attach DAFAR's decoder D (and C) to the trained classifier of ``victim`` (a
    run folder, or a pretrained model's name such as ``"mnist"``) without changing it: its E and F
    are frozen, so the defended model's victim logits are the classifier's, bit for bit; only D
    and C train, and alpha is calibrated as in joint training.  ``config`` gives the schedule
    (default: the quick profile of the victim's data set); its data set, architecture and unpool
    come from the victim."""
    from dafar.manifest import read_manifest

    if isinstance(victim, torch.nn.Module) or is_module_ref(victim):
        if config is None:
            raise ConfigError("attaching to a classifier of your own needs a TrainConfig naming the data set, "
                              "feedback_at and victim_mean/victim_std")
        ref = victim if isinstance(victim, str) else f"python:{type(victim).__module__}.{type(victim).__qualname__}"
        cfg = config.replace(attach_to=ref, arch="custom", train_victim=False)
        return train(cfg, out, data_dir, resume=resume, overwrite=overwrite, download=download, quiet=quiet,
                     _victim_module=victim if isinstance(victim, torch.nn.Module) else None)
    src = resolve_victim_source(str(victim))
    man = read_manifest(src)
    ds = man.get("dataset", {}).get("name")
    spec = spec_from_record(man)
    base = config if config is not None else TrainConfig.for_profile(ds, "quick")
    if base.dataset.value != ds:
        base = TrainConfig.for_profile(ds, base.profile)
    # an image folder is read exactly as the victim read it (size and channels from its training)
    vc = (man.get("training") or {}).get("config") or {}
    folder = {k: vc.get(k) for k in ("image_size", "channels")} if ds == "imagefolder" else \
        {"image_size": None, "channels": None}
    # the decoder is new, so its unpooling is this run's choice (config.unpool); without a config,
    # the victim's own (E and F do not depend on it)
    unpool = config.unpool if config is not None else man["architecture"]["unpool"]
    cfg = base.replace(attach_to=str(victim), arch=spec.family, unpool=unpool, train_victim=False,
                       width=spec.width_mult, feedback_at=base.feedback_at or spec.feedback or None, **folder)
    return train(cfg, out, data_dir, resume=resume, overwrite=overwrite, download=download, quiet=quiet)


def _parent_run(cfg: TrainConfig) -> dict:
    """Check the run ``cfg.init_from`` can start this one (finished, files verified, same
    architecture) before any training, and describe it for the manifest."""
    from dafar.manifest import load_manifest, manifest_digest

    pdir = Path(cfg.init_from)
    if not (pdir / MANIFEST_NAME).is_file():
        raise RunFolderError(f"--init-from {pdir}: not a finished run folder (no {MANIFEST_NAME})")
    man = load_manifest(pdir)  # verifies every listed file's sha256
    arch = man.get("architecture", {})
    try:
        pspec = spec_from_record(man)
        family = pspec.family
    except (ConfigError, KeyError, TypeError) as exc:
        raise ConfigError(f"--init-from {pdir}: its architecture cannot be read ({exc})") from None
    classifier = (man.get("training") or {}).get("mode") == "classifier"  # E and F only: D starts fresh
    if classifier and cfg.attach_to is not None:
        raise ConfigError(f"--init-from {pdir}: a classifier trained alone has no decoder to continue; attach to it "
                          f"with --victim {pdir} instead")
    if classifier and cfg.new_decoder:
        raise ConfigError(f"--init-from {pdir}: a classifier trained alone has no decoder; --new-decoder does not "
                          f"apply (its D starts from scratch anyway)")
    fresh = classifier or cfg.new_decoder  # E and F from the parent, D from its initialisation
    if not fresh and pspec.decoder_width != cfg.decoder_width:  # D's weights would not fit
        raise ConfigError(f"--init-from {pdir}: its decoder has width {pspec.decoder_width:g}, this run trains "
                          f"width {cfg.decoder_width:g} (pass --new-decoder to keep only its E and F)")
    if family != cfg.arch_name.value or (not cfg.new_decoder and arch.get("unpool") != cfg.unpool.value):
        raise ConfigError(f"--init-from {pdir}: its model is {family}/{arch.get('unpool')}, "
                          f"this run trains {cfg.arch_name.value}/{cfg.unpool.value}")
    want = cfg.feedback_at or FEEDBACK_POSITIONS.get(family, (pspec.feedback_at,))[-1]
    if not fresh and pspec.feedback_at != want:
        raise ConfigError(f"--init-from {pdir}: its decoder reads E at {pspec.feedback_at}, this run feeds back at "
                          f"{want} (pass --new-decoder to keep only its E and F)")
    names = ["weights/E.safetensors", "weights/F.safetensors"] + ([] if fresh else ["weights/D.safetensors"])
    if cfg.train_victim:
        names.append("weights/victim_only.safetensors")
    missing = [n for n in names if n not in man.get("files", {})]
    if missing:
        hint = " (pass --no-victim, or start from a run that trained one)" if "weights/victim_only.safetensors" in missing else ""
        raise ConfigError(f"--init-from {pdir}: the run has no {', '.join(missing)}{hint}")
    tr = man.get("training", {})
    pcfg = tr.get("config", {})
    earlier = tr.get("init_from") or {}
    record = {
        "run": str(pdir),
        "manifest_sha256": manifest_digest(man),
        "epochs": pcfg.get("epochs"),
        # the whole chain: a parent that itself continued another run counts those epochs (and seconds) too
        "epochs_total": int(pcfg.get("epochs") or 0) + int(earlier.get("epochs_total") or 0),
        "total_seconds": float(tr.get("total_seconds") or 0.0) + float(earlier.get("total_seconds") or 0.0),
        "config": pcfg,
        "victim_test_acc": man.get("metrics", {}).get("victim_test_acc"),
    }
    if classifier:
        record["mode"] = "classifier"
    elif cfg.new_decoder:  # the parent's D (its width and position) is not carried over
        record["decoder"] = {"kept": False, "width": pspec.decoder_width, "feedback_at": pspec.feedback_at}
    return {"dir": pdir, "record": record, "fingerprint": man.get("dataset", {}).get("fingerprint_sha256"),
            "spec": pspec, "has_decoder": not fresh}


def is_module_ref(source) -> bool:
    """``package.module:callable`` (a classifier of one's own), not a folder or a published name."""
    if not isinstance(source, str) or ":" not in source or (Path(source) / MANIFEST_NAME).is_file():
        return False
    mod, _, attr = source.partition(":")
    return all(p.isidentifier() for p in mod.split(".") + attr.split("."))


def _user_victim(cfg: TrainConfig, module: torch.nn.Module | None) -> dict:
    """A classifier of one's own: imported (only here, on the user's request), traced into a
    stored graph, its weights and normalization checked."""
    from dafar.manifest import sha256_file

    from .graph import load_user_module, trace_victim

    if cfg.victim_mean is None or cfg.victim_std is None:
        raise ConfigError("a classifier of your own needs the normalization it was trained with: --mean and --std "
                          "(per channel, on pixels / 255; e.g. --mean 0.5 --std 0.5, or ImageNet's "
                          "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)")
    if len(cfg.victim_mean) != len(cfg.victim_std):
        raise ConfigError(f"--mean has {len(cfg.victim_mean)} values, --std {len(cfg.victim_std)}")
    if not cfg.feedback_at:
        raise ConfigError("a classifier of your own needs --feedback-at LAYER (where E ends and D takes its input)")
    if module is None:
        if cfg.victim_weights is None:
            raise ConfigError(f"--victim {cfg.attach_to}: pass its trained weights with --weights FILE.safetensors")
        module = load_user_module(cfg.attach_to, cfg.victim_weights)
    elif cfg.victim_weights is not None:
        from .weights import load_into

        load_into(module, cfg.victim_weights)
    module = module.eval()
    graph = trace_victim(module)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    rebuilt = graph.build()
    missing = sorted(set(rebuilt.state_dict()) - set(state))
    if missing:
        raise ConfigError(f"the traced classifier needs {missing[0]}, which its state dict lacks")
    weights_sha = sha256_file(cfg.victim_weights) if cfg.victim_weights else None
    record = {"source": str(cfg.attach_to), "run": None, "manifest_sha256": None,
              "weights_sha256": {"victim": weights_sha}, "victim_test_acc": None, "graph_layers": len(graph.layer_names())}
    norm = {"mean": [float(v) for v in cfg.victim_mean], "std": [float(v) for v in cfg.victim_std]}
    return {"dir": None, "record": record, "spec": None, "graph": graph, "state": state, "normalization": norm,
            "fingerprint": None}


def resolve_victim_source(source: str) -> Path:
    """A run folder path, or the name of a pretrained model shipped with dafar."""
    from dafar.pretrained import PRETRAINED_DIR, available

    p = Path(source)
    if (p / MANIFEST_NAME).is_file():
        return p
    if source in available():
        return PRETRAINED_DIR / source
    raise RunFolderError(f"--victim {source}: neither a finished run folder (no {MANIFEST_NAME}) nor a pretrained "
                         f"model ({', '.join(available()) or 'none installed'})")


def _attach_source(cfg: TrainConfig, module: torch.nn.Module | None = None) -> dict:
    """The run whose victim (E, F) a plug-in decoder attaches to: verified, described for the
    manifest (its digest and the weights' hashes: the victim this defence was built for)."""
    from dafar.manifest import load_manifest, manifest_digest

    if module is not None or cfg.arch_name.value == "custom" or is_module_ref(cfg.attach_to):
        return _user_victim(cfg, module)

    src = resolve_victim_source(cfg.attach_to)
    man = load_manifest(src)  # every listed file's sha256
    if man.get("dataset", {}).get("name") != cfg.dataset.value:
        raise ConfigError(f"--victim {src} was trained on {man.get('dataset', {}).get('name')}, not {cfg.dataset.value}")
    try:
        spec = spec_from_record(man)
    except (ConfigError, KeyError, TypeError) as exc:
        raise ConfigError(f"--victim {src}: its architecture cannot be read ({exc})") from None
    if spec.family != cfg.arch_name.value:  # (the unpooling is the new decoder's own: E and F ignore it)
        raise ConfigError(f"--victim {src}: its network is {spec.family}, this run attaches a "
                          f"{cfg.arch_name.value} decoder")
    missing = [n for n in ("weights/E.safetensors", "weights/F.safetensors") if n not in man.get("files", {})]
    if missing:
        raise ConfigError(f"--victim {src}: the run has no {', '.join(missing)}")
    files = man["files"]
    tr = man.get("training", {})
    record = {"source": str(cfg.attach_to), "run": str(src), "manifest_sha256": manifest_digest(man),
              "weights_sha256": {k: files[f"weights/{k}.safetensors"]["sha256"] for k in ("E", "F")},
              "victim_test_acc": man.get("metrics", {}).get("victim_test_acc"),
              # how the classifier was trained (a --classifier-only run: the first half of this model's cost)
              "mode": tr.get("mode"), "epochs": (tr.get("config") or {}).get("epochs"),
              "total_seconds": tr.get("total_seconds"), "config": tr.get("config")}
    return {"dir": src, "record": record, "spec": spec, "normalization": man["input"]["normalization"],
            "fingerprint": man.get("dataset", {}).get("fingerprint_sha256")}


def _load_model_only(ckpt: Path, model: torch.nn.Module) -> dict:
    """Load the weights a finished phase ends with from its checkpoint (skipping optimizer state):
    the last step's, the weight average's (``ema``), or the best epoch's (``best``), as the
    checkpoint's ``info["final"]`` says.  Returns that ``info``."""
    meta, st = read_checkpoint(ckpt)
    info = meta.get("info", {})
    final = info.get("final", "model")
    state = {k[6:]: v for k, v in st.items() if k.startswith("model.")}
    overlay = {k[len(final) + 1:]: v for k, v in st.items() if k.startswith(f"{final}.")} if final != "model" else {}
    if final != "model" and not overlay:
        raise TrainingError(f"checkpoint {ckpt} should end with its {final!r} weights but holds none")
    model.load_state_dict({**state, **overlay}, strict=True)
    return info


@torch.no_grad()
def _residuals(net: DafarNet, x_u8, device: torch.device, bs: int) -> torch.Tensor:
    net.eval()
    outs = []
    for i in range(0, len(x_u8), bs):
        x = to_model_scale(x_u8[i: i + bs], net.norm, device)
        _, recon = net(x)
        outs.append((x - recon).cpu())
    return torch.cat(outs).contiguous()


def _thresholds(cfg: TrainConfig, ev_val: dict, ev_test: dict, dataset: str) -> dict:
    out = {}
    for det in Detector:
        key = det.score_key
        if key not in ev_val:
            continue
        rules = {}
        th = calibrate(ev_val[key], ThresholdRule.MEAN_ZSTD, z=cfg.z)
        rules[f"mean+zstd@z={cfg.z:g}"] = {**th.to_dict(), "test_fpr": false_positive_rate(ev_test[key], th.alpha)}
        fprs = cfg.target_fprs + ((cfg.default_fpr,) if cfg.default_fpr not in (None, *cfg.target_fprs) else ())
        for f in fprs:
            th = calibrate(ev_val[key], ThresholdRule.QUANTILE, target_fpr=f)
            rules[f"quantile@fpr={f:g}"] = {**th.to_dict(), "test_fpr": false_positive_rate(ev_test[key], th.alpha)}
        default = f"quantile@fpr={cfg.default_fpr:g}" if cfg.default_fpr is not None else f"mean+zstd@z={cfg.z:g}"
        out[det.value] = {"default": default, "calibrated_on": "validation split (clean, from train)", "rules": rules}
    return out


def _metrics(cfg: TrainConfig, ev_val: dict, ev_test: dict, data: _Data, thresholds: dict) -> dict:
    y = data.test_y
    m = {
        "dataset": cfg.dataset.value,
        "test_images": int(len(y)),
        "victim_test_acc": _accuracy(ev_test["logits"], y),
        "victim_val_acc": _accuracy(ev_val["logits"], data.val_y),
    }
    if "l2" in ev_test:  # (a classifier-only run has no decoder)
        m.update(purified_test_acc=_accuracy(ev_test["purified_logits"], y),
                 test_recon_l2_mean=float(ev_test["l2"].mean()), val_recon_l2_mean=float(ev_val["l2"].mean()))
    if "victim_only_logits" in ev_test:
        m["victim_only_test_acc"] = _accuracy(ev_test["victim_only_logits"], y)
        m["victim_minus_victim_only_points"] = 100 * (m["victim_test_acc"] - m["victim_only_test_acc"])
    for name, th in thresholds.items():
        default = th["rules"][th["default"]]
        m[f"{name}_alpha"] = default["alpha"]
        m[f"{name}_val_fpr"] = default["calib_fpr"]
        m[f"{name}_test_fpr"] = default["test_fpr"]
        s = ev_test[Detector(name).score_key]
        accepted = s <= default["alpha"]
        # accuracy of the whole defence on clean data: accepted and correctly classified from the reconstruction
        m[f"{name}_clean_defended_acc"] = float(np.mean(accepted & (ev_test["purified_logits"].argmax(1) == y)))
    return m


def _robust_metrics(s: _Session, net: DafarNet, victim: Victim | None, n: int = 1000, steps: int = 20) -> dict:
    """A first look at what adversarial training bought: the classifier's accuracy under a plain
    PGD (``steps`` steps, one random start) at the training budget on the first ``n`` test images.
    Not the evaluation: ``dafar eval`` attacks the whole defence with restarts and BPDA."""
    adv = s.cfg.adv_settings()
    x = to_model_scale(s.data.test_x[:n], s.norm).to(s.device, memory_format=s.memfmt)
    y = torch.from_numpy(s.data.test_y[:n].astype(np.int64)).to(s.device)
    gen = torch.Generator().manual_seed(s.cfg.seed + 23)
    net.eval()
    out = {"eps": adv.eps, "attack": f"PGD-{steps}, 1 random start, step 2.5 eps/{steps}", "images": int(len(y)),
           "victim_pgd_acc": robust_accuracy(lambda xm: net.F(net.E(xm).z), x, y, s.norm, adv.eps, steps, gen)}
    if victim is not None:
        victim.eval()
        out["victim_only_pgd_acc"] = robust_accuracy(victim, x, y, s.norm, adv.eps, steps, gen)
    return out
