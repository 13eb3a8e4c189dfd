"""``dafar eval``: the paper's experiments, the peers beside DAFAR, white-box adaptive attacks,
and the deployed files, as one JSON record per (model, format, attack, intensity) plus a report.

Settings (all recorded in ``RUN/eval/summary.json``):

* gray-box attacks (ART) against the float victim F(E(x)): FGSM and PGD over ``eps``, CW-L2 and
  JSMA at a weak and a strong setting, Gaussian noise as a control; images are test images the
  victim classifies correctly (:mod:`dafar.train.attacks`), cached in the run folder;
* DAFAR in torch (float) with both detectors at the manifest's alpha, plus every method at the
  same false-positive rates (thresholds set on clean validation images: ``fprs``);
* peers (:mod:`dafar.bench.security.peers`) trained on the same training images;
* adaptive white-box PGD (exact gradient and BPDA) and a CW-style variant against DAFAR, MagNet
  and Feature Squeezing (:mod:`dafar.bench.security.adaptive`), with the sanity checks the literature asks
  for: more steps and restarts do not help, success rises with eps and reaches ~100% at a large
  eps, and per image the adaptive attack succeeds wherever the gray-box one did;
* the exported float and int8 files through the runtime, on the same adversarial images.

Hours of work on a CPU for CIFAR-10, so the expensive parts are cached in the run folder and a
rerun resumes: gray-box sets (``RUN/attacks/``), trained peers (``RUN/eval/peers.safetensors``)
and each adaptive piece (``RUN/eval/adaptive/*.json``), each under a key of everything it
depends on.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError
from dafar.manifest import atomic_write_json
from dafar.options import option, to_argv
from dafar.run import RunFolder
from dafar.schema import Unpool
from dafar.schema import Detector, InputContract, parse_enums
from dafar.train.attacks import AttackSpec, attack_sets, format_budgets, parse_budgets, spec_from_string

from . import metrics as M

__all__ = ["EvalConfig", "EvalResult", "evaluate", "run_eval", "default_attacks"]

MNIST_EPS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
CIFAR_EPS = tuple(k / 255 for k in (1, 2, 4, 8, 12, 16))


def default_attacks(dataset: str, eps=None) -> list[AttackSpec]:
    eps = eps or (MNIST_EPS if dataset == "mnist" else CIFAR_EPS)
    specs = [spec_from_string(f"fgsm@{e}") for e in eps] + [spec_from_string(f"pgd@{e},max_iter=20") for e in eps]
    if dataset == "mnist":
        specs += [spec_from_string("cw-l2@confidence=0,max_iter=50,binary_search_steps=5"),  # weak: just across the boundary
                  spec_from_string("cw-l2@confidence=20,max_iter=100,binary_search_steps=5")]  # strong: high confidence
    else:
        # ART's CW-L2 runs a line search of up to 5 halvings and 5 doublings per step, each a forward
        # pass: on CIFAR-10's victim one step over 100 images took 14.6 s on 2 CPU cores, so the MNIST
        # settings would take 1 h (confidence 0) and 2 h (20) per set.  Fewer steps and a shorter line
        # search bring each set to minutes; the attack is weaker (less minimal) and the report says so.
        cw = "max_iter={},binary_search_steps=3,max_halving=2,max_doubling=2"
        specs += [spec_from_string("cw-l2@confidence=0," + cw.format(20)),
                  spec_from_string("cw-l2@confidence=20," + cw.format(30))]
    specs += [spec_from_string("jsma@theta=1,gamma=0.05"),  # weak: at most 5% of the pixels
              spec_from_string("jsma@theta=1,gamma=0.15")]  # strong
    specs.append(spec_from_string(f"noise@{0.3 if dataset == 'mnist' else 8 / 255}"))
    return specs


GRAYBOX_FAMILIES = ("fgsm", "pgd", "cw-l2", "jsma", "noise")


@dataclass(frozen=True)
class EvalConfig:
    images: int = option(300, help="images per FGSM/PGD/noise set")
    slow_images: int = option(100, help="images per CW-L2/JSMA set (their ART implementations are slow on a CPU)")
    eps: tuple[float, ...] | None = option(None, parse=parse_budgets, fmt=format_budgets, metavar="BUDGETS",
                                           help="comma list of L-inf budgets in (0, 1], e.g. 0.1,0.3 or 2/255,8/255 "
                                                "(default: the data set's)")
    fprs: tuple[float, ...] = option((0.01, 0.05), help="false-positive rates at which every method is also compared")
    clean_images: int = option(2000, help="clean test images for ROC curves and false-positive rates")
    peers: bool = option(True, help="skip MagNet, Feature Squeezing and the binary detector")
    peer_train_images: int = option(20000, help="training images for the peers")
    peer_epochs: int = option(10, help="training epochs of the peers")
    adaptive: bool = option(True, help="skip the white-box adaptive attacks")
    adaptive_images: int = option(100, help="images per adaptive attack")
    adaptive_eps: tuple[float, ...] | None = option(None, parse=parse_budgets, fmt=format_budgets, metavar="BUDGETS",
                                                    help="budgets of the adaptive attack, same form (default MNIST "
                                                         "0.05-1, CIFAR-10 2/255-1)")
    adaptive_steps: int = option(100, help="PGD steps of the adaptive attack")
    adaptive_restarts: int = option(2, help="starts of the adaptive PGD: the clean image, then random points (the gray-box "
                                                     "example of the same budget is one more start)")
    adaptive_apgd: bool = option(True, help="skip APGD-CE and APGD-DLR (Auto-PGD on the same combined objective) after "
                                            "PGD in the adaptive attack")
    graybox: tuple[str, ...] = option(("fgsm", "pgd", "cw-l2", "jsma", "noise"), metavar="ATTACKS",
                                      help="gray-box attack families to run, a comma list of fgsm, pgd, cw-l2, jsma, "
                                           "noise (pgd is needed: the adaptive attack starts from its examples)")
    deployed: bool = option(True, help="skip evaluating the exported files")
    seed: int = option(0, help="seed of the image selection and the attacks")
    detectors: tuple[Detector, ...] = option((Detector.L2, Detector.AUTOENCODER), flag="--detector",
                                             help="comma list of DAFAR detectors to evaluate")

    def __post_init__(self):
        object.__setattr__(self, "detectors", parse_enums(self.detectors, Detector, "detector"))
        for k in ("images", "slow_images", "clean_images", "adaptive_images", "adaptive_steps", "adaptive_restarts",
                  "peer_train_images", "peer_epochs"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be a positive integer, got {v!r}")
        if self.adaptive and self.adaptive_images > self.images:
            raise ConfigError(f"adaptive_images ({self.adaptive_images}) cannot exceed images ({self.images}): the "
                              "adaptive attack runs on the gray-box PGD set's images (raise --images)")
        fams = tuple(str(a).strip() for a in (self.graybox.split(",") if isinstance(self.graybox, str) else self.graybox))
        bad = [a for a in fams if a not in GRAYBOX_FAMILIES]
        if bad or not fams:
            raise ConfigError(f"graybox: unknown attack family {', '.join(bad) or '(none given)'}; choose from "
                              f"{', '.join(GRAYBOX_FAMILIES)}")
        if "pgd" not in fams:
            raise ConfigError("graybox must include pgd: the adaptive attack and the image selection start from its sets")
        object.__setattr__(self, "graybox", fams)
        if any(not 0 < f < 1 for f in self.fprs):
            raise ConfigError(f"fprs must lie in (0, 1), got {self.fprs!r}")


def reproduce_command(cfg: dict) -> str:
    """``dafar eval`` with the flags that rebuild a recorded configuration (``summary.json``)."""
    known = {f.name for f in fields(EvalConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in known}
    flags = to_argv(EvalConfig(**kw), always=("images", "slow_images", "adaptive_images", "adaptive_steps",
                                              "adaptive_restarts", "seed"))
    return " ".join(["dafar eval RUN_DIR", *flags])


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured (``RUN/eval/summary.json``) and the report it wrote."""

    run_dir: Path
    summary: dict
    report: Path


# ---------------------------------------------------------------- helpers
def _victim_module(net, norm):
    """The float victim's logits on [0, 1] images (the peers are trained and judged against it)."""
    from dafar.train.models import VictimLogits

    return VictimLogits(net, norm).eval()


def _dafar_outputs(net, x01: np.ndarray, batch: int = 500) -> dict:
    """torch float: L2 and C scores, purified labels, victim labels, reconstructions."""
    import torch

    from dafar.train.models import l2_per_sample

    out = {"l2": [], "ae": [], "purified": [], "victim": []}
    with torch.no_grad():
        for i in range(0, len(x01), batch):
            xm = net.from_unit(torch.from_numpy(np.ascontiguousarray(x01[i: i + batch])))
            logits, recon = net(xm)
            out["victim"].append(logits.argmax(1).numpy())
            out["l2"].append(l2_per_sample(xm - recon).numpy())
            if net.C is not None:
                out["ae"].append(net.ae_score(xm, recon).numpy())
            out["purified"].append(net.purified_logits(recon).argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _slug(text: str) -> str:
    """A file-name-safe form of a method / attack name ("DAFAR (l2)" -> "DAFAR_l2")."""
    return text.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_")


def _digest(*parts) -> str:
    """sha256 (16 hex digits) over arrays (bytes, dtype and shape), torch modules (their state)
    and JSON values: the key under which long-running results are cached."""
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        if hasattr(p, "state_dict"):
            for k, v in sorted(p.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _features(net, x01: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net.E(net.from_unit(torch.from_numpy(np.ascontiguousarray(x01)))).z.flatten(1).numpy()


class _Method:
    """One defence as the evaluation sees it: scores, its own threshold, decisions, labels."""

    def __init__(self, name, score_fn, label_fn, threshold: float, family: str):
        self.name, self.score_fn, self.label_fn, self.threshold, self.family = name, score_fn, label_fn, threshold, family


def _record(method: _Method, spec_key: str, meta: dict, s_adv, lab_adv, y, s_clean, lab_clean, y_clean,
            thresholds_at_fpr: dict) -> dict:
    rej = ~(np.asarray(s_adv, np.float64) <= method.threshold)
    rej_clean = ~(np.asarray(s_clean, np.float64) <= method.threshold)
    n = len(y)
    rec = {"model": method.name, "family": method.family, "attack": spec_key, **meta, "images": int(n),
           "threshold": float(method.threshold), "clean_fpr": float(np.mean(rej_clean)),
           "detection_rate": float(np.mean(rej)), "accuracy_after_defence_label": float(np.mean(lab_adv == y)),
           "defence_success": M.defence_success(rej, lab_adv, y), "robust_accuracy": M.robust_accuracy(rej, lab_adv, y),
           "auc": M.roc_auc(s_clean, s_adv), "score_mean": float(np.nanmean(s_adv))}
    k = min(n, len(y_clean))
    rec["hybrid_accuracy"] = M.hybrid_accuracy(rej_clean[:k], lab_clean[:k], y_clean[:k], rej[:k], lab_adv[:k], y[:k])
    for f, t in thresholds_at_fpr.items():
        rec[f"detection_at_fpr_{f:g}"] = M.detection_rate(s_adv, t)
        r2 = ~(np.asarray(s_adv, np.float64) <= t)
        rec[f"defence_success_at_fpr_{f:g}"] = M.defence_success(r2, lab_adv, y)
    return rec


# ---------------------------------------------------------------- the run
@dataclass
class _Data:
    """The clean images the evaluation uses: test (ROC curves, FPRs), validation (thresholds at a
    given FPR) and a training subset (the peers), as float NCHW in [0, 1]."""

    x_clean: np.ndarray
    y_clean: np.ndarray
    x_val: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    train_sha256: str


def _data(run: RunFolder, cfg: EvalConfig, data_dir) -> _Data:
    splits = run.splits(data_dir)
    clean = splits.test.sample(cfg.clean_images, cfg.seed)  # class-mixed, never the first N
    rng = np.random.default_rng([cfg.seed, 5])
    n_train = len(splits.train.images)
    tr_idx = np.sort(rng.choice(n_train, min(cfg.peer_train_images, n_train), replace=False))
    return _Data(clean.images.astype(np.float32) / 255, clean.labels.astype(np.int64),
                 splits.val.images.astype(np.float32) / 255, splits.train.images[tr_idx].astype(np.float32) / 255,
                 splits.train.labels[tr_idx].astype(np.int64), _digest(splits.train.images[tr_idx]))


def _graybox_sets(run: RunFolder, cfg: EvalConfig, data_dir, log) -> list:
    specs = [s for s in default_attacks(run.dataset, cfg.eps) if s.attack.value in cfg.graybox]
    fast = [s for s in specs if s.attack.value in ("fgsm", "pgd", "noise")]
    slow = [s for s in specs if s not in fast]
    sets = attack_sets(run.path, fast, n=cfg.images, seed=cfg.seed, data_dir=data_dir, log=log)
    return sets + attack_sets(run.path, slow, n=cfg.slow_images, seed=cfg.seed, data_dir=data_dir, log=log)


def _peers(run: RunFolder, cfg: EvalConfig, victim, data: _Data, log):
    """MagNet, Feature Squeezing, the binary detector and a denoising AE, trained on the same
    training images (or reused from the run folder when trained under the same key) and
    calibrated on the clean validation images."""
    from dafar.train.attacks import generate, victim_hash

    from .peers import load_peers, save_peers, train_peers

    ds = run.dataset
    x_train, y_train = data.x_train, data.y_train
    # adversarial training images for the binary detector: FGSM and PGD at random eps (train split only)
    n_adv = min(5000, len(x_train))
    eps_list = cfg.eps or (MNIST_EPS if ds == "mnist" else CIFAR_EPS)
    plan = [("fgsm", eps_list[len(eps_list) // 2]), ("fgsm", eps_list[-1]),
            ("pgd", eps_list[len(eps_list) // 4]), ("pgd", eps_list[len(eps_list) // 2])]
    # trained peers are cached in the run folder under everything that determines them, so a
    # rerun of an interrupted evaluation (hours on a CPU for CIFAR-10) does not train them again
    peer_key = {"victim_sha256": victim_hash(run.manifest), "dataset": ds, "epochs": cfg.peer_epochs, "seed": cfg.seed,
                "train_images_sha256": data.train_sha256, "n_adv": n_adv,
                "adv_plan": [[k, float(e)] for k, e in plan]}
    peer_path = run.path / "eval" / "peers.safetensors"
    peers = load_peers(victim, peer_path, peer_key, ds, x_train.shape[1], x_train.shape[2])
    if peers is not None:
        log(f"peers: reused from {peer_path.name} (trained under the same victim, images and settings)")
    else:
        parts = []
        chunk = n_adv // 4
        for j, (kind, e) in enumerate(plan):
            sl = slice(j * chunk, (j + 1) * chunk)
            spec = spec_from_string(f"{kind}@{e}" + (",max_iter=10" if kind == "pgd" else ""))
            parts.append(generate(run.path, spec, x_train[sl], y_train[sl], cfg.seed + j)[0])
        peers = train_peers(victim, x_train, np.concatenate(parts), ds, epochs=cfg.peer_epochs, seed=cfg.seed, log=log)
        save_peers(peers, peer_path, peer_key)
    fpr0 = cfg.fprs[0]
    peers.magnet.calibrate(data.x_val, fpr0)
    peers.squeeze.calibrate(data.x_val, fpr0)
    peers.binary.calibrate(data.x_val, fpr0)
    return peers


def _graybox_records(methods, sets, net, victim, peers, data: _Data, at_fpr, clean_scores, clean_labels):
    """One record per (method, attack set), and the purification rows of Fig. 9."""
    from .peers import binary_filter

    records: list[dict] = []
    purification = []  # Fig. 9
    for s in sets:
        meta = {"eps": s.spec.eps, "params": dict(s.spec.params), "setting": "gray-box", "format": "torch",
                "precision": "float32", "victim_accuracy": s.meta.get("victim_accuracy"),
                "linf_mean": float(s.linf.mean()), "l2_mean": float(s.l2.mean())}
        for mt in methods:
            records.append(_record(mt, s.spec.key, meta, mt.score_fn(s.x_adv), mt.label_fn(s.x_adv), s.labels,
                                   clean_scores[mt.name], clean_labels[mt.name], data.y_clean, at_fpr[mt.name]))
        row = {"attack": s.spec.key, "eps": s.spec.eps, "undefended": s.meta.get("victim_accuracy"),
               "dafar_purification": float(np.mean(_dafar_outputs(net, s.x_adv)["purified"] == s.labels))}
        if peers is not None:
            row["denoising_ae"] = float(np.mean(peers.dae.predict(s.x_adv) == s.labels))
            row["binary_filter"] = float(np.mean(binary_filter(victim, s.x_adv) == s.labels))
            row["magnet_reformer"] = float(np.mean(peers.magnet.predict(s.x_adv) == s.labels))
        purification.append(row)
    return records, purification


def run_eval(run_dir, cfg: EvalConfig = EvalConfig(), *, data_dir=None, log=print) -> dict:
    """Every measurement of the evaluation; writes the JSON records and returns the summary."""
    from dafar.train.loading import load_dafar

    from .adaptive import DafarTarget, MagNetTarget, SqueezeTarget, cw_attack, pgd_attack

    t_start = time.perf_counter()
    run = RunFolder.open(run_dir)
    run_dir, m = run.path, run.manifest
    ds = run.dataset
    net, _ = load_dafar(run_dir, m)
    victim = _victim_module(net, run.normalization)
    out_dir = run_dir / "eval"
    (out_dir / "records").mkdir(parents=True, exist_ok=True)
    dets = [d.value for d in cfg.detectors if d is not Detector.AUTOENCODER or net.C is not None]
    alphas = {d: m["thresholds"][d]["rules"][m["thresholds"][d]["default"]]["alpha"] for d in dets}
    timing: dict = {}
    data = _data(run, cfg, data_dir)

    t = time.perf_counter()
    sets = _graybox_sets(run, cfg, data_dir, log)
    timing["attacks_s"] = time.perf_counter() - t

    # ---- methods: DAFAR with each detector, then the peers
    methods: list[_Method] = []
    for d in dets:
        key = Detector(d).score_key
        methods.append(_Method(f"DAFAR ({d})", lambda x, k=key: _dafar_outputs(net, x)[k],
                               lambda x: _dafar_outputs(net, x)["purified"], alphas[d], "dafar"))
    peers = None
    if cfg.peers:
        t = time.perf_counter()
        peers = _peers(run, cfg, victim, data, log)
        timing["peers_train_s"] = time.perf_counter() - t
        methods += [
            _Method("MagNet", peers.magnet.score, peers.magnet.predict, 1.0, "peer"),
            _Method("Feature Squeezing", peers.squeeze.score, peers.squeeze.predict, peers.squeeze.threshold, "peer"),
            _Method("Binary detector", peers.binary.score, peers.binary.predict, peers.binary.threshold, "peer"),
        ]

    # thresholds at each FPR, on clean validation images, for every method
    val_scores = {mt.name: np.asarray(mt.score_fn(data.x_val), np.float64) for mt in methods}
    at_fpr = {mt.name: {f: M.threshold_at_fpr(val_scores[mt.name], f) for f in cfg.fprs} for mt in methods}
    clean_scores = {mt.name: np.asarray(mt.score_fn(data.x_clean), np.float64) for mt in methods}
    clean_labels = {mt.name: mt.label_fn(data.x_clean) for mt in methods}

    records, purification = _graybox_records(methods, sets, net, victim, peers, data, at_fpr, clean_scores,
                                             clean_labels)
    undefended = {s.spec.key: s.meta.get("victim_accuracy") for s in sets}
    log(f"gray-box: {len(records)} records")

    # ---- Table 4: feature distances at the largest budget (1,000 images), and Fig. 4 material
    table4 = _table4(run_dir, net, cfg, ds, data_dir, log)

    # ---- deployed files through the runtime
    deployed = []
    if cfg.deployed:
        t = time.perf_counter()
        deployed = _deployed(run_dir, m, sets, log)
        timing["deployed_s"] = time.perf_counter() - t

    # ---- adaptive white-box attacks
    adaptive = {}
    if cfg.adaptive:
        t = time.perf_counter()
        adaptive = _adaptive(run_dir, net, alphas, peers, sets, cfg, ds, log, DafarTarget, MagNetTarget, SqueezeTarget,
                             pgd_attack, cw_attack)
        timing["adaptive_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t_start

    # ---- write
    for rec in records + deployed:
        name = "__".join(_slug(str(rec[k])) for k in ("model", "format", "precision", "attack"))
        atomic_write_json(out_dir / "records" / f"{name}.json", rec)
    y_clean = data.y_clean
    summary = {"run": run_dir.name, "dataset": ds, "config": {**asdict(cfg)}, "alphas": alphas,
               "thresholds_at_fpr": at_fpr, "clean": {mt.name: {"fpr_at_threshold": float(np.mean(~(clean_scores[mt.name] <= mt.threshold))),
                                                               "accuracy_when_accepted": float(np.mean(clean_labels[mt.name] == y_clean))}
                                                      for mt in methods},
               "test_fpr_manifest": {d: m["thresholds"][d]["rules"][m["thresholds"][d]["default"]]["test_fpr"] for d in dets},
               "records": records, "deployed": deployed, "purification": purification, "table4": table4,
               "adaptive": adaptive, "timing": timing, "undefended": undefended,
               "peers_note": ("MagNet: reconstruction-error detectors I (L2) and II (L1) and the reformer, MNIST "
                              "architectures; the CIFAR-10 Jensen-Shannon detectors are not included. Feature "
                              "Squeezing: bit depth and 2x2 median filter (no non-local means).")}
    atomic_write_json(out_dir / "summary.json", summary)
    _save_plot_data(out_dir, methods, sets, data.x_clean, clean_scores, val_scores, net)
    return summary


def _save_plot_data(out_dir: Path, methods, sets, x_clean, clean_scores, val_scores, net) -> None:
    """Scores per method and set (for ROC curves and histograms) and a few images for Fig. 4."""
    import io

    from dafar.manifest import atomic_write_bytes

    arrays = {}
    for mt in methods:
        arrays[f"{mt.name}|clean"] = clean_scores[mt.name]
        for s in sets:
            arrays[f"{mt.name}|{s.spec.key}"] = np.asarray(mt.score_fn(s.x_adv), np.float64)
    # Fig. 4: 6 images clean, FGSM and PGD at the largest eps, their reconstructions and residuals
    import torch

    pick = [s for s in sets if s.spec.attack.value in ("fgsm", "pgd")]
    if pick:
        top = max(s.spec.eps for s in pick)
        rows = [("clean", pick[0].x_clean[:6])] + [(s.spec.key, s.x_adv[:6]) for s in pick if s.spec.eps == top]
        for name, x in rows:
            with torch.no_grad():
                xm = net.from_unit(torch.from_numpy(np.ascontiguousarray(x)))
                _, rec = net(xm)
            arrays[f"fig4|{name}|x"] = x
            arrays[f"fig4|{name}|recon"] = net.to_unit(rec).numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out_dir / "plot_data.npz", buf.getvalue())


def _table4(run_dir, net, cfg, ds, data_dir, log) -> dict:
    """Paper's Table 4: mean L2 distance of E(x) between clean images and noisy / FGSM / PGD ones."""
    big = 0.3 if ds == "mnist" else 8 / 255
    specs = [spec_from_string(f"noise@{big}"), spec_from_string(f"fgsm@{big}"), spec_from_string(f"pgd@{big},max_iter=20")]
    n = 1000 if ds == "mnist" else 500
    sets = attack_sets(run_dir, specs, n=n, seed=cfg.seed, data_dir=data_dir, log=log)
    f0 = _features(net, sets[0].x_clean)
    out = {"images": n, "eps_or_sigma": big, "feature_dim": int(f0.shape[1])}
    for s in sets:
        out[s.spec.attack.value] = float(np.linalg.norm(_features(net, s.x_adv) - f0, axis=1).mean())
    out["clean_feature_norm_mean"] = float(np.linalg.norm(f0, axis=1).mean())
    out["paper"] = {"noise": 36.13, "fgsm": 102.64, "pgd": 96.44} if ds == "mnist" else None
    return out


def _deployed(run_dir: Path, m: dict, sets, log) -> list[dict]:
    from dafar.runtime import Defence

    out = []
    for rel, e in m.get("exports", {}).items():
        if e["graph"] != "dafar" or (e["format"] == "tflite" and e.get("batch") != 1):
            continue
        d = Defence(run_dir, rel, threads=2)
        for s in sets:
            x = InputContract(e["contract"]).from_unit(s.x_adv)
            p = d.predict(x)
            out.append({"model": rel, "format": e["format"], "precision": e.get("precision", "float32"),
                        "detector": e.get("detector"), "mode": d.mode, "contract": e["contract"], "attack": s.spec.key, "eps": s.spec.eps,
                        "setting": "gray-box", "images": len(s.labels), "alpha": d.alpha,
                        "detection_rate": float(np.mean(p.rejected)), "purified_accuracy": float(np.mean(p.labels == s.labels)),
                        "defence_success": M.defence_success(p.rejected, p.labels, s.labels),
                        "robust_accuracy": M.robust_accuracy(p.rejected, p.labels, s.labels)})
        log(f"deployed {rel}: done")
    return out


def _adaptive(run_dir, net, alphas, peers, sets, cfg, ds, log, DafarTarget, MagNetTarget, SqueezeTarget,
              pgd_attack, cw_attack) -> dict:
    """White-box attacks per (method, eps), then the sanity checks and the CW variant.  Each piece
    is cached in ``RUN/eval/adaptive/`` under a key naming everything it depends on (the target's
    weights and threshold, the images, the gray-box starts, the attack settings), so an
    interrupted evaluation resumes where it stopped and a changed model never reuses a result."""
    import torch

    from .peers import squeeze_bits

    eps_list = cfg.adaptive_eps or ((0.05, 0.1, 0.2, 0.3, 0.4, 1.0) if ds == "mnist" else (2 / 255, 4 / 255, 8 / 255, 16 / 255, 64 / 255, 1.0))
    n = cfg.adaptive_images
    base = next(s for s in sets if s.spec.attack.value == "pgd")
    x, y = base.x_clean[:n], base.labels[:n]
    grey_by_eps = {}  # gray-box PGD success per image at matching eps (for the per-image check)
    for s in sets:
        if s.spec.attack.value == "pgd":
            grey_by_eps[round(s.spec.eps, 6)] = s
    from .adaptive import VictimTarget, apgd_attack

    # BPDA replaces the unpool mask's zero gradient by a straight-through one; a decoder without a
    # mask (the mobile network's nearest-neighbour upsampling) is differentiable as it is
    masked = hasattr(net.D, "unpool") and net.D.unpool.mode is not Unpool.UPSAMPLE

    def bpda(det, mode="hybrid"):
        return DafarTarget(net, alphas[det], det, straight_through=True, mode=mode) if masked else None

    targets = [("DAFAR (l2)", DafarTarget(net, alphas["l2"], "l2"), bpda("l2"))]
    if "autoencoder" in alphas:
        targets.append(("DAFAR (autoencoder)", DafarTarget(net, alphas["autoencoder"], "autoencoder"), bpda("autoencoder")))
    # the label from the victim's own logits (a --mode detect graph): for a robust victim the
    # purification pass may cost robustness, so both modes are attacked
    targets.append(("DAFAR detect (l2)", DafarTarget(net, alphas["l2"], "l2", mode="detect"), bpda("l2", "detect")))
    # the classifier alone, never rejecting: the row the defence is compared with (an adversarially
    # trained run's robust victim)
    targets.append(("Victim alone", VictimTarget(net), None))
    if peers is not None:
        targets.append(("MagNet", MagNetTarget(peers.magnet), None))
        targets.append(("Feature Squeezing", SqueezeTarget(peers.squeeze, squeeze_bits(ds), peers.squeeze.threshold), None))
    results: dict = {"images": len(x), "steps": cfg.adaptive_steps, "restarts": cfg.adaptive_restarts, "eps": list(eps_list),
                     "apgd": cfg.adaptive_apgd, "bpda": masked, "methods": {}, "sanity": {}, "reused_from_cache": 0}
    cache_dir = Path(run_dir) / "eval" / "adaptive"
    ids = {name: _digest(*tgt.identity()) for name, tgt, _ in targets}

    def cached(label: str, key: dict, compute):
        path = cache_dir / (_slug(label) + ".json")
        key = {"version": 1, **key}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("key") == key:
                results["reused_from_cache"] += 1
                log(f"adaptive {label}: reused from {path.parent.name}/{path.name}")
                return old["value"]
        value = compute()
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "value": value})
        return value

    def one_eps(tgt, tgt_bpda, eps, g, apgd: bool):
        t0 = time.perf_counter()
        # restarts: the clean image, then the gray-box PGD example (so the adaptive attack is never
        # weaker than the gray-box one), then random starts
        r = pgd_attack(tgt, x, y, eps, steps=cfg.adaptive_steps, restarts=cfg.adaptive_restarts, seed=cfg.seed,
                       inits=[g.x_adv[:n]] if g is not None else None)
        success = r.success.copy()
        x_best = r.x_adv
        if tgt_bpda is not None and not success.all():
            rest = np.flatnonzero(~success)
            rb = pgd_attack(tgt_bpda, x[rest], y[rest], eps, steps=cfg.adaptive_steps, restarts=1, seed=cfg.seed + 1)
            ok = rb.success & tgt.success(torch.from_numpy(rb.x_adv), torch.from_numpy(y[rest]))
            success[rest[ok]] = True
            x_best = x_best.copy()
            x_best[rest[ok]] = rb.x_adv[ok]
        by_apgd = {}
        for kind in (("ce", "dlr") if apgd else ()):
            # Auto-PGD on the images PGD (and BPDA) left standing, on the same combined objective
            rest = np.flatnonzero(~success)
            by_apgd[kind] = 0
            if rest.size == 0:
                continue
            ra = apgd_attack(tgt, x[rest], y[rest], eps, steps=cfg.adaptive_steps, loss=kind, seed=cfg.seed + 3)
            ok = ra.success
            by_apgd[kind] = int(ok.sum())
            success[rest[ok]] = True
            x_best = x_best.copy()
            x_best[rest[ok]] = ra.x_adv[ok]
        rej, lab = tgt.decide(torch.from_numpy(x_best))
        row = {"eps": eps, "attack_success": float(success.mean()),
               "defence_success": float(np.mean(rej | (lab == y))), "robust_accuracy": float(np.mean(~rej & (lab == y))),
               "broken_from_clean_start": int(np.sum(r.first_restart == 0)),
               "broken_only_from_graybox_start": int(np.sum(r.first_restart == 1)) if g is not None else 0,
               "seconds": time.perf_counter() - t0}
        if apgd:
            row["broken_only_by_apgd_ce"], row["broken_only_by_apgd_dlr"] = by_apgd["ce"], by_apgd["dlr"]
        if g is not None:
            grej, glab = tgt.decide(torch.from_numpy(g.x_adv[:n]))
            grey_ok = ~grej & (glab != y)
            row["graybox_attack_success"] = float(grey_ok.mean())
            row["graybox_only_images"] = int(np.sum(grey_ok & ~success))  # adaptive should cover these
        return row

    images = _digest(x, y)
    for name, tgt, tgt_bpda in targets:
        rows = []
        for eps in eps_list:
            g = grey_by_eps.get(round(eps, 6))
            apgd = cfg.adaptive_apgd and hasattr(tgt, "loss_and_success")  # targets whose loss takes a kind
            key = {"target": ids[name], "bpda": tgt_bpda is not None, "images": images, "eps": float(eps),
                   "steps": cfg.adaptive_steps, "restarts": cfg.adaptive_restarts, "seed": cfg.seed,
                   "graybox_start": _digest(g.x_adv[:n]) if g is not None else None,
                   **({"apgd": ["ce", "dlr"]} if apgd else {})}
            row = cached(f"{name} eps {eps:.6g}", key, lambda: one_eps(tgt, tgt_bpda, eps, g, apgd))
            rows.append(row)
            log(f"adaptive {name} eps {eps:.3g}: attack success {100 * row['attack_success']:.1f}% "
                f"({row['seconds']:.0f} s)")
        results["methods"][name] = rows
    # sanity: more steps and restarts at one eps, on a subset
    k = min(50, n)
    # at a middle budget by default; with budgets given, at the largest one below 1 (the one asked about)
    given = [e for e in (cfg.adaptive_eps or ()) if e < 1]
    e_mid = max(given) if given else 0.1 if ds == "mnist" else 4 / 255
    for name, tgt, _ in [t for t in targets if t[0] not in ("DAFAR (autoencoder)", "DAFAR detect (l2)")]:
        def sanity(tgt=tgt):
            row = {}
            for steps, restarts in ((cfg.adaptive_steps, cfg.adaptive_restarts), (4 * cfg.adaptive_steps, 2 * cfg.adaptive_restarts)):
                r = pgd_attack(tgt, x[:k], y[:k], e_mid, steps=steps, restarts=restarts, seed=cfg.seed + 7)
                row[f"steps{steps}_restarts{restarts}"] = float(r.success.mean())
            return row
        key = {"target": ids[name], "images": _digest(x[:k], y[:k]), "eps": e_mid, "steps": cfg.adaptive_steps,
               "restarts": cfg.adaptive_restarts, "seed": cfg.seed + 7}
        row = cached(f"sanity {name}", key, sanity)
        results["sanity"][name] = {"eps": e_mid, "images": k, **row}
        log(f"sanity {name}: {row}")

    # CW-style L2 variant against DAFAR
    def cw():
        r, dist = cw_attack(targets[0][1], x[: min(50, n)], y[: min(50, n)], steps=100)
        return {"method": targets[0][0], "images": int(len(dist)), "attack_success": float(r.success.mean()),
                "median_l2_of_successes": float(np.median(dist[np.isfinite(dist)])) if np.isfinite(dist).any() else None}

    results["cw_l2"] = cached(f"cw-l2 {targets[0][0]}", {"target": ids[targets[0][0]], "images": _digest(x[:50], y[:50]),
                                                          "steps": 100}, cw)
    return results


def evaluate(run_dir, cfg: EvalConfig = EvalConfig(), *, data_dir=None, log=print) -> EvalResult:
    """``dafar eval``: :func:`run_eval`, then ``eval_report.md`` with its figures."""
    from .report import write_eval_report

    summary = run_eval(run_dir, cfg, data_dir=data_dir, log=log)
    return EvalResult(Path(run_dir), summary, write_eval_report(run_dir))
