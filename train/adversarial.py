"""Adversarial training of the victim: PGD (Madry et al. 2018) and FGSM with a random start
(Wong, Rice and Kolter 2020, "Fast is better than free").

Why here: on a phone or a Pi the model file is in the attacker's hands, and DAFAR alone falls to
a white-box attacker who knows it (``dafar eval``'s adaptive rows).  Adversarial training is the
one defence that has held up; the question this module lets us answer is what DAFAR's decoder
adds on top of a robust victim, and at what cost.

Every attack here works on the *model scale* (the batch ``_Session.batch`` builds: normalized,
augmented), while the budget is stated on pixels in [0, 1] like every other budget in dafar:
``eps`` pixels is ``eps * scale`` per channel on the model scale, and the image stays inside the
model-scale image of [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from .config import AdvMode

__all__ = ["AdvMode", "AdvSettings", "perturb", "robust_accuracy"]


@dataclass(frozen=True)
class AdvSettings:
    """The resolved settings (defaults filled in by :meth:`TrainConfig.adv_settings`)."""

    mode: AdvMode
    eps: float  # L-inf budget on pixels in [0, 1]
    steps: int  # 1 for fast
    step_size: float  # on pixels in [0, 1]
    guard: float  # stop when the monitor's PGD accuracy falls by more than this between epochs (0 = off)

    def to_dict(self) -> dict:
        return {"mode": self.mode.value, "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "guard": self.guard}


def _bounds(norm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-channel pixel-to-model factor, model-scale low, model-scale high), each 1xCx1x1."""
    scale, shift = norm.scale, norm.shift
    lo, hi = torch.minimum(shift, scale + shift), torch.maximum(shift, scale + shift)
    return scale.abs(), lo, hi


def perturb(classify, x: torch.Tensor, y: torch.Tensor, norm, eps: float, steps: int, step_size: float,
            gen: torch.Generator | None = None, random_start: bool = True) -> torch.Tensor:
    """An L-inf adversarial batch for ``classify`` (model-scale images -> logits): ``steps`` sign-
    gradient steps of the cross-entropy from a uniform random start in the ball (one step of
    1.25 eps is Wong et al.'s fast variant), projected onto the ball and the valid pixel range.
    Returns a detached model-scale batch; the caller's parameter gradients are untouched."""
    k, lo, hi = _bounds(norm)
    lo, hi, k = lo.to(x.device), hi.to(x.device), k.to(x.device)
    e, a = eps * k, step_size * k
    x = x.detach()
    if random_start:
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype) if gen is not None else torch.rand_like(x)
        delta = (2 * u.to(x.device) - 1) * e
    else:
        delta = torch.zeros_like(x)
    delta = torch.max(torch.min(delta, hi - x), lo - x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = Fn.cross_entropy(classify(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = torch.max(torch.min(delta + a * g.sign(), e), -e)
            delta = torch.max(torch.min(delta, hi - x), lo - x)
    # the batch comes back in the caller's memory format (training runs channels-last)
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return (x + delta).detach().contiguous(memory_format=fmt)


def robust_accuracy(classify, x: torch.Tensor, y: torch.Tensor, norm, eps: float, steps: int = 10,
                    gen: torch.Generator | None = None, batch: int = 250) -> float:
    """Accuracy under a PGD of ``steps`` steps (step 2.5 eps / steps, one random start): the
    training monitor and the catastrophic-overfitting guard (a fast-trained model that overfits
    keeps its FGSM accuracy while its PGD accuracy collapses to ~0 within an epoch)."""
    hits = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i: i + batch], y[i: i + batch]
        xa = perturb(classify, xb, yb, norm, eps, steps, 2.5 * eps / steps, gen)
        with torch.no_grad():
            hits += int((classify(xa).argmax(1) == yb).sum())
    return hits / max(1, len(y))
