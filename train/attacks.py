"""Adversarial images against the float victim ``F(E(x))`` (the paper's gray-box setting), with
adversarial-robustness-toolbox (ART), cached in the run folder.  Used by ``dafar quantize`` (the
float-vs-int8 detection check) and ``dafar eval``; they live with training because they need
only the trained victim (and adversarial training will need them too).

* Attacks work on the input contract's scale: float32 NCHW in [0, 1] (``clip_values=(0, 1)``);
  the model scale [-1, 1] is applied inside the wrapped victim, as in the exported graphs.
* Images: test images the float victim classifies correctly, the first ``n`` of a permutation
  seeded by ``seed`` (so the same images serve every attack and intensity).
* Cache: ``RUN/attacks/<name>.npz`` (adversarial images float32, test indices, labels) with its
  parameters in the file and in the manifest (``attacks`` table, plus the sha256 in ``files``).
  A cached set is reused only when its parameters, the image selection and the victim weights'
  hashes all match; otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from dafar.errors import ConfigError, require
from dafar.manifest import atomic_write_bytes
from dafar.run import RunFolder

__all__ = ["Attack", "AttackSpec", "AttackSet", "victim_classifier", "select_images", "generate", "attack_sets",
           "spec_from_string", "eps_label", "attack_label", "victim_hash", "parse_budget", "parse_budgets", "format_budgets",
           "parse_attack_list"]


class Attack(str, Enum):
    FGSM = "fgsm"
    PGD = "pgd"  # L-inf
    CW_L2 = "cw-l2"
    JSMA = "jsma"
    NOISE = "noise"  # Gaussian noise of std eps, clipped (not an attack: the paper's Table 4 control)


@dataclass(frozen=True)
class AttackSpec:
    attack: Attack
    eps: float = 0.0  # L-inf budget (FGSM, PGD), noise std (noise); unused by CW-L2 and JSMA
    params: tuple[tuple[str, float], ...] = ()  # extra parameters, e.g. (("max_iter", 40),)

    def __post_init__(self):
        try:
            object.__setattr__(self, "attack", Attack(self.attack))
        except ValueError:
            raise ConfigError(f"unknown attack {self.attack!r}; choose from {', '.join(a.value for a in Attack)}") from None
        if self.attack in (Attack.FGSM, Attack.PGD, Attack.NOISE) and not (0 < float(self.eps) <= 1):
            raise ConfigError(f"{self.attack.value}: eps must lie in (0, 1] (pixels / 255 scale), got {self.eps!r}")
        object.__setattr__(self, "params", tuple(sorted((str(k), float(v)) for k, v in dict(self.params).items())))

    @property
    def key(self) -> str:
        p = "".join(f"-{k}{v:g}" for k, v in self.params)
        e = f"-eps{self.eps:g}" if self.attack in (Attack.FGSM, Attack.PGD, Attack.NOISE) else ""
        return f"{self.attack.value}{e}{p}"

    def describe(self) -> dict:
        return {"attack": self.attack.value, "eps": self.eps, "params": dict(self.params)}


def eps_label(eps: float) -> str:
    """How a budget reads in a report: ``8/255`` for CIFAR-10's k/255 budgets, ``0.3`` for MNIST's
    (0.2 is also 51/255, so round decimals win)."""
    eps = float(eps)
    k = eps * 255
    if abs(k - round(k)) < 1e-4 and abs(eps * 20 - round(eps * 20)) > 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def attack_label(key: str) -> str:
    """An attack set's key (``pgd-eps0.0313725``) as a report shows it (``pgd-eps8/255``)."""
    import re

    return re.sub(r"eps([0-9.]+(?:e-?[0-9]+)?)", lambda m: "eps" + eps_label(float(m.group(1))), key)


def parse_budget(text: str) -> float:
    """One L-inf budget on the [0, 1] pixel scale, written as a decimal (``0.3``) or ``k/255``."""
    try:
        num, _, den = text.strip().partition("/")
        v = float(num) / (float(den) if den else 1.0)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{text!r} is not a budget (write 0.3 or 8/255)") from None
    if not 0 < v <= 1:
        raise ConfigError(f"budget {text} is outside (0, 1] (budgets are on the pixels/255 scale)")
    return v


def parse_budgets(text: str) -> tuple[float, ...]:
    """A comma list of budgets (``0.1,0.3`` or ``2/255,8/255``)."""
    items = [v for v in text.split(",") if v.strip()]
    if not items:
        raise ConfigError("no budgets given")
    return tuple(parse_budget(v) for v in items)


def format_budgets(values) -> str:
    """Budgets as :func:`parse_budgets` reads them (``0.1,0.3``, ``2/255,8/255``)."""
    return ",".join(eps_label(v) for v in values)


def parse_attack_list(text: str) -> tuple[str, ...]:
    """A comma list of attack specs, where a spec's own ``k=v`` parameters follow it:
    ``fgsm@0.1,pgd@0.3,max_iter=20`` is FGSM at 0.1 and PGD at 0.3 with 20 steps."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and "@" not in part and specs:
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise ConfigError("no attacks given")
    for s in specs:
        spec_from_string(s)
    return tuple(specs)


def spec_from_string(text: str) -> AttackSpec:
    """``fgsm@0.1``, ``pgd@0.3``, ``noise@0.3``, ``cw-l2``, ``cw-l2@confidence=10``, ``jsma@theta=1,gamma=0.1``."""
    name, _, rest = text.partition("@")
    eps, params = 0.0, {}
    for part in filter(None, rest.split(",")):
        if "=" in part:
            k, v = part.split("=", 1)
            params[k.strip()] = float(v)
        else:
            eps = float(part)
    return AttackSpec(Attack(name.strip()), eps, tuple(params.items()))


@dataclass
class AttackSet:
    spec: AttackSpec
    x_adv: np.ndarray  # float32 N x C x H x W in [0, 1]
    x_clean: np.ndarray  # float32, the same images before the attack
    labels: np.ndarray  # true labels
    indices: np.ndarray  # indices into the test set
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def linf(self) -> np.ndarray:
        return np.abs(self.x_adv - self.x_clean).reshape(len(self.labels), -1).max(axis=1)

    @property
    def l2(self) -> np.ndarray:
        return np.linalg.norm((self.x_adv - self.x_clean).reshape(len(self.labels), -1), axis=1)


def victim_classifier(run_dir, device: str = "cpu"):
    """ART ``PyTorchClassifier`` over the float victim F(E(x)), input float NCHW in [0, 1]."""
    require("art", "eval", "adversarial attacks")
    import torch
    from art.estimators.classification import PyTorchClassifier

    from .loading import load_dafar
    from .models import VictimLogits

    net, m = load_dafar(run_dir)
    model = VictimLogits(net, m["input"]["normalization"]).eval()
    c, h, w = m["input"]["shape"]
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(c, h, w),
                            nb_classes=int(m["architecture"]["num_classes"]), clip_values=(0.0, 1.0),
                            device_type="gpu" if device == "cuda" else "cpu")
    return clf, model, m


def select_images(run_dir, n: int, seed: int = 0, data_dir=None, model=None):
    """``n`` test images the float victim classifies correctly: (x float NCHW [0,1], labels, indices)."""
    import torch

    test = RunFolder.open(run_dir, verify=False).test_set(data_dir)
    u8, labels = test.images, test.labels
    if model is None:
        _, model, _ = victim_classifier(run_dir)
    order = np.random.default_rng([seed, 7]).permutation(len(labels))
    picked: list[int] = []
    with torch.no_grad():
        for i in range(0, len(order), 1000):
            idx = order[i: i + 1000]
            x = torch.from_numpy(u8[idx].astype(np.float32) / 255.0)
            ok = model(x).argmax(1).numpy() == labels[idx]
            picked.extend(int(j) for j in idx[ok])
            if len(picked) >= n:
                break
    if len(picked) < n:
        raise ConfigError(f"only {len(picked)} correctly classified test images; asked for {n}")
    idx = np.array(picked[:n])
    return u8[idx].astype(np.float32) / 255.0, labels[idx].astype(np.int64), idx


def _make(spec: AttackSpec, clf, batch_size: int):
    from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent, SaliencyMapMethod

    p = dict(spec.params)
    if spec.attack is Attack.FGSM:
        return FastGradientMethod(clf, norm=np.inf, eps=spec.eps, batch_size=batch_size)
    if spec.attack is Attack.PGD:
        steps = int(p.get("max_iter", 40))
        return ProjectedGradientDescent(clf, norm=np.inf, eps=spec.eps, eps_step=p.get("eps_step", 2.5 * spec.eps / steps),
                                        max_iter=steps, num_random_init=int(p.get("random_init", 0)),
                                        batch_size=batch_size, verbose=False)
    if spec.attack is Attack.CW_L2:
        return CarliniL2Method(clf, confidence=p.get("confidence", 0.0), max_iter=int(p.get("max_iter", 50)),
                               binary_search_steps=int(p.get("binary_search_steps", 5)),
                               learning_rate=p.get("learning_rate", 0.01), initial_const=p.get("initial_const", 0.1),
                               max_halving=int(p.get("max_halving", 5)), max_doubling=int(p.get("max_doubling", 5)),
                               batch_size=batch_size, verbose=False)
    if spec.attack is Attack.JSMA:
        return SaliencyMapMethod(clf, theta=p.get("theta", 1.0), gamma=p.get("gamma", 0.1), batch_size=batch_size,
                                 verbose=False)
    raise ConfigError(f"{spec.attack.value} is not an ART attack")


def victim_hash(m: dict) -> str:
    """A short digest of the victim's weights (E and F), under which attack results are cached."""
    files = m.get("files", {})
    parts = [files.get(f"weights/{k}.safetensors", {}).get("sha256", "") for k in ("E", "F")]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def generate(run_dir, spec: AttackSpec, x: np.ndarray, y: np.ndarray, seed: int = 0, batch_size: int = 128,
             clf=None) -> tuple[np.ndarray, float]:
    """Adversarial versions of ``x`` (float NCHW [0, 1]) under ``spec``; (x_adv, seconds)."""
    t0 = time.perf_counter()
    if spec.attack is Attack.NOISE:
        rng = np.random.default_rng([seed, 11])
        x_adv = np.clip(x + rng.normal(0.0, spec.eps, x.shape).astype(np.float32), 0.0, 1.0)
        return x_adv.astype(np.float32), time.perf_counter() - t0
    require("art", "eval", "adversarial attacks")
    import torch
    from art.utils import to_categorical

    if clf is None:
        clf, _, _ = victim_classifier(run_dir)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    atk = _make(spec, clf, batch_size)
    if spec.attack is Attack.JSMA:
        # ART's JSMA is targeted: y are the targets.  A random wrong class per image, seeded.
        rng = np.random.default_rng([seed, 13])
        target = (y + rng.integers(1, clf.nb_classes, len(y))) % clf.nb_classes
        x_adv = atk.generate(x=x, y=to_categorical(target, clf.nb_classes))
    else:
        x_adv = atk.generate(x=x, y=to_categorical(y, clf.nb_classes))
    return np.clip(x_adv, 0.0, 1.0).astype(np.float32), time.perf_counter() - t0


def attack_sets(run_dir, specs: list[AttackSpec], n: int = 500, seed: int = 0, data_dir=None, log=print,
                batch_size: int = 128, cache: bool = True) -> list[AttackSet]:
    """Build (or reuse from the run folder's cache) one adversarial set per spec."""
    from tqdm.auto import tqdm

    run = RunFolder.open(run_dir, verify=["weights/E.safetensors", "weights/F.safetensors"])
    run_dir, m = run.path, run.manifest
    clf, model, _ = victim_classifier(run_dir)
    x, y, idx = select_images(run_dir, n, seed, data_dir, model)
    sel = hashlib.sha256(idx.astype(np.int64).tobytes()).hexdigest()[:16]
    victim = victim_hash(m)
    out: list[AttackSet] = []
    new_files: dict[str, dict] = {}
    for spec in tqdm(specs, desc="attacks", unit="set", disable=len(specs) < 2, leave=False):
        rel = f"attacks/{spec.key}-n{n}-s{seed}.npz"
        meta = {**spec.describe(), "n": n, "seed": seed, "selection_sha256": sel, "victim_sha256": victim,
                "setting": "gray-box: generated against the float victim F(E(x)), defence unknown to the attacker"}
        path = run_dir / rel
        if cache and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                old = json.loads(str(z["meta"]))
                if {k: old.get(k) for k in meta} == meta:
                    out.append(AttackSet(spec, z["x_adv"], x, y, idx, float(old.get("seconds", 0.0)), old))
                    continue
        x_adv, secs = generate(run_dir, spec, x, y, seed, batch_size, clf)
        meta["seconds"] = secs
        with np.errstate(all="ignore"):
            import torch

            with torch.no_grad():
                pred = model(torch.from_numpy(x_adv)).argmax(1).numpy()
        meta["victim_accuracy"] = float(np.mean(pred == y))
        meta["linf_max"] = float(np.abs(x_adv - x).max())
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, x_adv=x_adv, indices=idx, labels=y, meta=np.array(json.dumps(meta, sort_keys=True)))
        atomic_write_bytes(path, buf.getvalue())
        new_files[rel] = meta
        log(f"{spec.key}: {n} images in {secs:.1f} s, victim accuracy {100 * meta['victim_accuracy']:.1f}%")
        out.append(AttackSet(spec, x_adv, x, y, idx, secs, meta))
    if new_files:
        run.register({rel: {"role": "attack"} for rel in new_files}, tables={"attacks": new_files})
    return out
