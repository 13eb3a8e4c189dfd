"""White-box adaptive attacks on the whole pipeline (beyond the paper's gray-box setting).

The attacker knows the victim *and* the defence.  For DAFAR the objective is the deployed
decision: an attack succeeds on an image when the score stays at or under alpha (accepted) and
the purified label ``argmax F(E(D(E(x))))`` is wrong.  Following Carlini and Wagner (2017) and
Tramer et al. (2020):

* PGD (L-inf) maximizing ``margin(purified logits) - c * relu(score - 0.98 * alpha)`` with many
  steps and random restarts, keeping per image the first adversarial example that succeeds;
* the index-free unpool's mask is piecewise constant, so its gradient is zero: a BPDA variant
  (straight-through: the backward pass treats the mask as all ones) runs beside the exact
  gradient, and an image counts as broken when either finds an example;
* a CW-style L2 variant (Adam on a tanh-reparameterised image, distortion + hinge terms);
* the same treatment against MagNet (reformer + two detectors) and Feature Squeezing (BPDA for
  the bit-depth rounding; the median filter is differentiable almost everywhere).

Every function works on float NCHW images in [0, 1] and returns per-image success flags, so the
report can check that the adaptive attack beats the gray-box one per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dafar.schema import Detector

__all__ = ["DafarTarget", "MagNetTarget", "SqueezeTarget", "pgd_attack", "cw_attack", "AttackResult"]


def _torch():
    import torch

    return torch


def _margin(logits, y):
    """max_{j != y} z_j - z_y: positive when the label is wrong."""
    torch = _torch()
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -torch.inf)
    return other.max(1).values - z_y


class DafarTarget:
    """The fused DAFAR decision as a differentiable function of the image."""

    name = "DAFAR"

    def __init__(self, net, alpha: float, detector: str = "l2", straight_through: bool = False):
        self.net, self.alpha, self.detector = net.eval(), float(alpha), Detector(detector)
        self.straight_through = straight_through

    def identity(self) -> tuple:
        """What decides this target's outcome (its cache key in ``dafar eval``)."""
        return (self.net, self.alpha, self.detector, self.straight_through)

    def _set_bpda(self, on: bool):
        self.net.D.unpool.straight_through = on

    def outputs(self, x01):
        """(purified logits, score) for float NCHW in [0, 1]."""
        torch = _torch()
        self._set_bpda(self.straight_through)
        try:
            xm = self.net.from_unit(x01)
            feats = self.net.E(xm)
            recon = self.net.D(feats)
            d = xm - recon
            if self.detector is Detector.AUTOENCODER:
                d = d - self.net.C(d)
            score = torch.sqrt(torch.sum(d * d, dim=(1, 2, 3)) + 1e-12)
            purified = self.net.F(self.net.E(recon).z)
            return purified, score
        finally:
            self._set_bpda(False)

    def loss(self, x01, y, c: float):
        purified, score = self.outputs(x01)
        torch = _torch()
        return torch.clamp(_margin(purified, y), max=10.0) - c * torch.relu(score - 0.98 * self.alpha)

    def success(self, x01, y):
        torch = _torch()
        with torch.no_grad():
            purified, score = self.outputs(x01)
        return ((score <= self.alpha) & (purified.argmax(1) != y)).numpy()

    def decide(self, x01):
        """(rejected, label) numpy, the deployed decision."""
        torch = _torch()
        with torch.no_grad():
            purified, score = self.outputs(x01)
        return (~(score <= self.alpha)).numpy(), purified.argmax(1).numpy()


class MagNetTarget:
    name = "MagNet"

    def __init__(self, magnet):
        self.m = magnet

    def identity(self) -> tuple:
        return (self.m.ae1, self.m.ae2, self.m.victim, [float(t) for t in self.m.thresholds])

    def _errs(self, x):
        torch = _torch()
        e1 = torch.mean((self.m.ae1(x) - x) ** 2, dim=(1, 2, 3)) / self.m.thresholds[0]
        e2 = torch.mean(torch.abs(self.m.ae2(x) - x), dim=(1, 2, 3)) / self.m.thresholds[1]
        return e1, e2

    def loss(self, x, y, c: float):
        torch = _torch()
        e1, e2 = self._errs(x)
        logits = self.m.victim(self.m.ae1(x))
        return torch.clamp(_margin(logits, y), max=10.0) - c * (torch.relu(e1 - 0.98) + torch.relu(e2 - 0.98))

    def decide(self, x):
        torch = _torch()
        with torch.no_grad():
            e1, e2 = self._errs(x)
            label = self.m.victim(self.m.ae1(x)).argmax(1)
        return ((e1 > 1) | (e2 > 1)).numpy(), label.numpy()

    def success(self, x, y):
        rej, lab = self.decide(x)
        return ~rej & (lab != y.numpy())


class SqueezeTarget:
    name = "Feature Squeezing"

    def __init__(self, fs, bit_depth: int, threshold: float):
        self.fs, self.bits, self.threshold = fs, bit_depth, threshold

    def identity(self) -> tuple:
        return (self.fs.victim, self.bits, float(self.threshold))

    def _squeezed(self, x):
        torch = _torch()
        levels = 2 ** self.bits - 1
        q = x + (torch.round(x * levels) / levels - x).detach()  # BPDA: identity gradient
        pad = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="reflect")
        patches = pad.unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H, W, 2, 2
        med = patches.reshape(*patches.shape[:4], 4).median(dim=-1).values
        return q, med

    def _score(self, x):
        torch = _torch()
        p = torch.softmax(self.fs.victim(x), 1)
        q, med = self._squeezed(x)
        s1 = torch.abs(p - torch.softmax(self.fs.victim(q), 1)).sum(1)
        s2 = torch.abs(p - torch.softmax(self.fs.victim(med), 1)).sum(1)
        return torch.maximum(s1, s2)

    def loss(self, x, y, c: float):
        torch = _torch()
        return torch.clamp(_margin(self.fs.victim(x), y), max=10.0) - c * torch.relu(self._score(x) - 0.95 * self.threshold)

    def decide(self, x):
        torch = _torch()
        with torch.no_grad():
            # the deployed decision uses ART's squeezers (numpy), the attack their torch twins
            s = self.fs.score(x.numpy())
            label = self.fs.victim(x).argmax(1)
        return s > self.threshold, label.numpy()

    def success(self, x, y):
        rej, lab = self.decide(x)
        return ~rej & (lab != y.numpy())


@dataclass
class AttackResult:
    x_adv: np.ndarray  # per image: the first successful example, else the last iterate
    success: np.ndarray  # bool per image
    steps: int
    restarts: int
    first_restart: np.ndarray | None = None  # per image: the restart that broke it (-1: none)


def pgd_attack(target, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 100, restarts: int = 2,
               c: float = 10.0, seed: int = 0, batch: int = 100, inits: list | None = None) -> AttackResult:
    """L-inf PGD with restarts: restart 0 starts at the image, then one restart per array in
    ``inits`` (e.g. the gray-box adversarial examples, so the adaptive attack is never weaker than
    them), then random points in the eps-ball.  Each start is checked before its first step."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    step = 2.5 * eps / steps
    out_x = x.copy()
    done = np.zeros(len(x), bool)
    first = np.full(len(x), -1)
    inits = list(inits or [])
    for r in range(restarts + len(inits)):
        for i in range(0, len(x), batch):
            idx = np.arange(i, min(i + batch, len(x)))
            idx = idx[~done[idx]]
            if idx.size == 0:
                continue
            x0 = torch.from_numpy(x[idx])
            yy = torch.from_numpy(y[idx].astype(np.int64))
            xa = x0.clone()
            if 1 <= r <= len(inits):
                start = torch.from_numpy(np.ascontiguousarray(inits[r - 1][idx], dtype=np.float32))
                xa = torch.min(torch.max(start, x0 - eps), x0 + eps).clamp(0, 1)
            elif r > 0:
                xa = (xa + eps * (2 * torch.rand(xa.shape, generator=g) - 1)).clamp(0, 1)
            for k in range(steps + 1):
                if k > 0:
                    xa.requires_grad_(True)
                    loss = target.loss(xa, yy, c).sum()
                    (grad,) = torch.autograd.grad(loss, xa)
                    with torch.no_grad():
                        xa = xa + step * grad.sign()
                        xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
                with torch.no_grad():
                    ok = target.success(xa, yy)
                    if ok.any():  # keep the first success per image
                        hit = idx[ok]
                        fresh = ~done[hit]
                        out_x[hit[fresh]] = xa[ok][torch.from_numpy(fresh)].numpy()
                        first[hit[fresh]] = r
                        done[hit] = True
                if done[idx].all():
                    break
            with torch.no_grad():
                left = ~done[idx]
                out_x[idx[left]] = xa[torch.from_numpy(left)].detach().numpy()
    return AttackResult(out_x, done, steps, restarts + len(inits), first)


def cw_attack(target, x: np.ndarray, y: np.ndarray, steps: int = 200, cs=(0.1, 1.0, 10.0), lr: float = 0.01,
              seed: int = 0, batch: int = 100) -> tuple[AttackResult, np.ndarray]:
    """CW-style L2: minimize ||x' - x||^2 - c * loss(x') over x' = (tanh(w) + 1) / 2; the smallest
    successful distortion per image over the constants.  Returns (result, L2 distortions; inf = failed)."""
    torch = _torch()
    torch.manual_seed(seed)
    best = np.full(len(x), np.inf)
    out_x = x.copy()
    for c in cs:
        for i in range(0, len(x), batch):
            idx = np.arange(i, min(i + batch, len(x)))
            x0 = torch.from_numpy(x[idx])
            yy = torch.from_numpy(y[idx].astype(np.int64))
            w = torch.atanh((x0 * 2 - 1).clamp(-0.999999, 0.999999)).clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            for _ in range(steps):
                xa = (torch.tanh(w) + 1) / 2
                dist = ((xa - x0) ** 2).flatten(1).sum(1)
                loss = (dist - c * torch.clamp(target.loss(xa, yy, 10.0), max=0.5)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    xa = (torch.tanh(w) + 1) / 2
                    ok = target.success(xa, yy)
                    d = torch.sqrt(((xa - x0) ** 2).flatten(1).sum(1)).numpy()
                    better = ok & (d < best[idx])
                    if better.any():
                        best[idx[better]] = d[better]
                        out_x[idx[better]] = xa[torch.from_numpy(better)].numpy()
    return AttackResult(out_x, np.isfinite(best), steps, len(cs)), best
