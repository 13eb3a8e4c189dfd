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
* Auto-PGD (Croce and Hein 2020) with the cross-entropy or the DLR loss in place of the margin,
  on the same combined objective (:func:`apgd_attack`; ART's APGD sees a classifier's loss only);
* a CW-style L2 variant (Adam on a tanh-reparameterised image, distortion + hinge terms);
* DAFAR in ``detect`` mode (the label from the victim's own logits) and the victim alone (never
  rejecting: for an adversarially trained run, the robust victim the defence is compared with);
* the same treatment against MagNet (reformer + two detectors) and Feature Squeezing (BPDA for
  the bit-depth rounding; the median filter is differentiable almost everywhere).

Every function works on float NCHW images in [0, 1] and returns per-image success flags, so the
report can check that the adaptive attack beats the gray-box one per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dafar.schema import Detector

__all__ = ["DafarTarget", "VictimTarget", "MagNetTarget", "SqueezeTarget", "pgd_attack", "apgd_attack", "cw_attack",
           "AttackResult"]


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


def _dlr(logits, y):
    """Croce and Hein's difference-of-logits ratio, sign flipped so that larger is more adversarial:
    (max_{j != y} z_j - z_y) / (z_pi1 - z_pi3); invariant to the logits' scale and shift (with
    fewer than three classes the denominator is the top two's gap)."""
    srt = logits.sort(1, descending=True).values
    low = srt[:, min(2, logits.shape[1] - 1)]
    return _margin(logits, y) / (srt[:, 0] - low + 1e-12)


def _classifier_term(logits, y, kind: str):
    """The part of an attack objective that pushes the label off ``y`` (larger: more adversarial),
    bounded so that a detector penalty beside it dominates once the label is wrong."""
    torch = _torch()
    if kind == "margin":
        return torch.clamp(_margin(logits, y), max=10.0)
    if kind == "ce":
        return torch.clamp(torch.nn.functional.cross_entropy(logits, y, reduction="none"), max=10.0)
    if kind == "dlr":
        return torch.clamp(_dlr(logits, y), max=1.0)
    raise ValueError(f"unknown attack loss {kind!r}")


class VictimTarget:
    """The classifier ``F(E(x))`` with no detector: an image is broken when its label is wrong.
    For an adversarially trained run this is the robust victim alone; for any run, the row the
    defence is compared with."""

    name = "Victim alone"

    def __init__(self, net):
        self.net = net.eval()

    def identity(self) -> tuple:
        return (self.net.E, self.net.F, "victim-alone")

    def logits(self, x01):
        return self.net.F(self.net.E(self.net.from_unit(x01)).z)

    def loss(self, x01, y, c: float = 0.0, kind: str = "margin"):
        return _classifier_term(self.logits(x01), y, kind)

    def loss_and_success(self, x01, y, c: float = 0.0, kind: str = "margin"):
        logits = self.logits(x01)
        return _classifier_term(logits, y, kind), (logits.detach().argmax(1) != y).numpy()

    def decide(self, x01):
        torch = _torch()
        with torch.no_grad():
            label = self.logits(x01).argmax(1).numpy()
        return np.zeros(len(label), bool), label

    def success(self, x01, y):
        return self.decide(x01)[1] != y.numpy()


class DafarTarget:
    """The fused DAFAR decision as a differentiable function of the image.  ``mode`` is the
    deployed graph's: ``hybrid`` labels from the purified logits ``F(E(D(E(x))))``, ``detect``
    from the victim's own ``F(E(x))`` (D runs for the score only)."""

    name = "DAFAR"

    def __init__(self, net, alpha: float, detector: str = "l2", straight_through: bool = False, mode: str = "hybrid"):
        self.net, self.alpha, self.detector = net.eval(), float(alpha), Detector(detector)
        self.straight_through = straight_through
        if mode not in ("hybrid", "detect"):
            raise ValueError(f"mode must be hybrid or detect, got {mode!r}")
        self.mode = mode

    def identity(self) -> tuple:
        """What decides this target's outcome (its cache key in ``dafar eval``)."""
        return (self.net, self.alpha, self.detector, self.straight_through) + (("detect",) if self.mode == "detect" else ())

    def _set_bpda(self, on: bool):
        unpool = getattr(self.net.D, "unpool", None)  # the mobile decoder upsamples without a mask: nothing to bypass
        if unpool is not None:
            unpool.straight_through = on

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
            label_logits = self.net.F(feats.z) if self.mode == "detect" else self.net.F(self.net.E(recon).z)
            return label_logits, score
        finally:
            self._set_bpda(False)

    def loss(self, x01, y, c: float, kind: str = "margin"):
        return self.loss_and_success(x01, y, c, kind)[0]

    def loss_and_success(self, x01, y, c: float, kind: str = "margin"):
        """The objective and, from the same forward pass, which images it already breaks (one
        forward per attack step instead of two)."""
        purified, score = self.outputs(x01)
        torch = _torch()
        ok = ((score.detach() <= self.alpha) & (purified.detach().argmax(1) != y)).numpy()
        return _classifier_term(purified, y, kind) - c * torch.relu(score - 0.98 * self.alpha), ok

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


def _loss_success(target, x, y, c: float, kind: str = "margin"):
    """(objective, success flags) at ``x``: one forward pass where the target offers it."""
    if hasattr(target, "loss_and_success"):
        return target.loss_and_success(x, y, c, kind)
    f = target.loss(x, y, c, kind) if kind != "margin" else target.loss(x, y, c)
    torch = _torch()
    with torch.no_grad():
        return f, target.success(x.detach(), y)


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
                # one forward pass gives both the success check of this iterate and the gradient
                # of the next step (the last iterate is only checked)
                xa.requires_grad_(k < steps)
                if k < steps:
                    f, ok = _loss_success(target, xa, yy, c)
                else:
                    with torch.no_grad():
                        ok = target.success(xa, yy)
                xd = xa.detach()
                if ok.any():  # keep the first success per image
                    hit = idx[ok]
                    fresh = ~done[hit]
                    out_x[hit[fresh]] = xd[ok][torch.from_numpy(fresh)].numpy()
                    first[hit[fresh]] = r
                    done[hit] = True
                if done[idx].all() or k == steps:
                    xa = xd
                    break
                (grad,) = torch.autograd.grad(f.sum(), xa)
                with torch.no_grad():
                    xa = xd + step * grad.sign()
                    xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
            with torch.no_grad():
                left = ~done[idx]
                out_x[idx[left]] = xa[torch.from_numpy(left)].detach().numpy()
    return AttackResult(out_x, done, steps, restarts + len(inits), first)


def _apgd_checkpoints(steps: int) -> list[int]:
    """Croce and Hein's checkpoints: p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({int(round(q * steps)) for q in p if 0 < q < 1})


def apgd_attack(target, x: np.ndarray, y: np.ndarray, eps: float, steps: int = 100, loss: str = "ce",
                c: float = 10.0, seed: int = 0, batch: int = 100) -> AttackResult:
    """Auto-PGD (Croce and Hein 2020, the core of AutoAttack) on ``target``'s combined objective:
    the classifier term (``ce``: cross-entropy, APGD-CE; ``dlr``: difference-of-logits ratio,
    APGD-DLR) minus the detector penalty, so "misclassified and accepted" is what it maximizes.
    Step size 2 eps halved per image at the checkpoints where fewer than 75% of the steps since
    the last one improved the objective or nothing improved at an unchanged step, restarting from
    the best point; momentum 0.75; a random start in the ball.  ART's APGD takes a classifier's
    loss only (it cannot see a detector), hence this implementation.  Keeps per image the first
    example that succeeds."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    out_x = x.copy()
    done = np.zeros(len(x), bool)
    checks = _apgd_checkpoints(steps)
    for i in range(0, len(x), batch):
        idx = np.arange(i, min(i + batch, len(x)))
        x0 = torch.from_numpy(x[idx])
        yy = torch.from_numpy(y[idx].astype(np.int64))
        n = len(idx)

        def proj(v):
            return torch.min(torch.max(v, x0 - eps), x0 + eps).clamp(0, 1)

        def value_grad(v):
            """The objective and its gradient at v, recording the images v already breaks."""
            v = v.clone().requires_grad_(True)
            f, ok = _loss_success(target, v, yy, c, loss)
            fresh = ok & ~done[idx]
            if fresh.any():
                out_x[idx[fresh]] = v.detach()[torch.from_numpy(fresh)].numpy()
                done[idx[fresh]] = True
            (gr,) = torch.autograd.grad(f.sum(), v)
            return f.detach(), gr.detach()

        shape = (n,) + (1,) * (x0.dim() - 1)
        xk = proj(x0 + eps * (2 * torch.rand(x0.shape, generator=g) - 1))
        eta = torch.full(shape, 2.0 * eps)
        fk, gk = value_grad(xk)
        x_best, f_best, g_best = xk.clone(), fk.clone(), gk.clone()
        x_prev = xk.clone()
        improved = torch.zeros(n)  # steps since the last checkpoint that raised the objective
        f_best_at_check = f_best.clone()
        eta_reduced_at_check = torch.zeros(n, dtype=torch.bool)
        last = 0
        for k in range(steps):
            with torch.no_grad():
                z = proj(xk + eta * gk.sign())
                a = 1.0 if k == 0 else 0.75
                x_new = proj(xk + a * (z - xk) + (1 - a) * (xk - x_prev))
            f_new, g_new = value_grad(x_new)
            if done[idx].all():
                break
            up = f_new > fk
            improved += up.float()
            better = f_new > f_best
            x_best[better], f_best[better], g_best[better] = x_new[better], f_new[better], g_new[better]
            x_prev, xk, fk, gk = xk, x_new, f_new, g_new
            if k + 1 in checks:
                span = k + 1 - last
                cond1 = improved < 0.75 * span
                cond2 = (~eta_reduced_at_check) & (f_best_at_check >= f_best)
                halve = cond1 | cond2
                eta_reduced_at_check = halve.clone()
                if halve.any():
                    eta[halve] /= 2
                    xk[halve], fk[halve], gk[halve] = x_best[halve], f_best[halve], g_best[halve]
                    x_prev[halve] = xk[halve]
                improved.zero_()
                f_best_at_check = f_best.clone()
                last = k + 1
        left = ~done[idx]
        out_x[idx[left]] = x_best[torch.from_numpy(left)].numpy()
    return AttackResult(out_x, done, steps, 1)


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
