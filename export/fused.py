"""The whole defence as one torch module, the graph every export format is made from.

``FusedDafar`` maps an image batch to five outputs, in this order and with these names:

* ``label``: argmax of the purified logits (``--mode hybrid``, the paper's) or of the victim's
  logits (``--mode detect``); int64 in ONNX, int32 in TFLite, where LiteRT's CompiledModel API
  cannot read int64,
* ``score``: the anomaly score, ``||d||_2`` with ``d = x - D(E(x))`` (``--detector l2``) or
  ``d - C(d)`` (``--detector autoencoder``), on the model scale [-1, 1],
* ``rejected``: ``not (score <= alpha)``: True for a score above alpha *and* for a NaN score, so
  the graph fails closed (built so that converters cannot turn it into ``score > alpha``),
* ``logits``: the victim's logits ``F(E(x))``,
* ``purified_logits``: ``F(E(D(E(x))))`` (hybrid mode only: a detect graph leaves out the second
  E/F pass, and with it this output; the other four keep their names and meaning).

The input contract decides the first ops: ``float-nchw`` takes float32 NCHW in [0, 1];
``uint8-nhwc`` takes camera pixels (uint8 NHWC) and casts, transposes and scales inside the graph.
Normalization (``(x01 - mean) / std``) always lives inside the graph, and alpha is a constant in it.
"""
from __future__ import annotations

import torch
from torch import nn

from dafar.schema import OUTPUT_NAMES, VICTIM_OUTPUT_NAMES, Detector, InputContract, Mode
from dafar.train.models import DafarNet, Normalize, Victim

__all__ = ["OUTPUT_NAMES", "VICTIM_OUTPUT_NAMES", "FusedDafar", "VictimGraph"]


class _Preprocess(Normalize):
    """Input contract -> model scale [-1, 1], NCHW float32 (raw pixels: the 1/255 joins the
    normalization's multiply, one multiply-add per pixel)."""

    def __init__(self, contract: InputContract, mean: list[float], std: list[float]):
        contract = InputContract(contract)
        super().__init__(mean, std, 255.0 if contract is InputContract.UINT8_NHWC else 1.0)
        self.contract = contract

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.contract is InputContract.UINT8_NHWC:
            x = x.permute(0, 3, 1, 2).to(torch.float32)
        return super().forward(x)


class FusedDafar(nn.Module):
    """Victim + feedback loop + detector + threshold as one graph (see the module docstring)."""

    def __init__(self, net: DafarNet, alpha: float, detector: Detector | str = Detector.L2,
                 contract: InputContract | str = InputContract.FLOAT_NCHW,
                 mean: list[float] | None = None, std: list[float] | None = None,
                 mode: Mode | str = Mode.HYBRID):
        super().__init__()
        self.detector = Detector(detector)
        self.mode = Mode(mode)
        if self.detector is Detector.AUTOENCODER and net.C is None:
            raise ValueError("detector=autoencoder needs a model trained with the anomaly autoencoder C")
        c = net.spec.in_channels
        self.pre = _Preprocess(contract, mean or [0.5] * c, std or [0.5] * c)
        self.E, self.F, self.D = net.E, net.F, net.D
        self.C = net.C if self.detector is Detector.AUTOENCODER else None
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor):
        xm = self.pre(x)
        feats = self.E(xm)
        logits = self.F(feats.z)
        recon = self.D(feats)
        d = xm - recon
        if self.C is not None:
            d = d - self.C(d)
        score = torch.sqrt(torch.sum(d * d, dim=(1, 2, 3)))
        if x.dtype.is_floating_point:
            # NaN guard: sum(x - x) is 0 for a finite image and NaN for one holding NaN or inf.
            # The float graph needs no guard (NaN flows into the residual), but an int8 graph
            # quantizes x before E, and a quantized NaN is just a number: reading the raw input
            # here keeps the score NaN, so the image is rejected, in every precision.
            score = score + torch.sum(x - x, dim=(1, 2, 3))
        # Fail closed: a NaN score must be rejected.  "score > alpha" is False for NaN, and
        # onnx2tf rewrites Not(LessOrEqual(s, a)) into Greater(s, a), which accepts NaN.  Going
        # through a float cast (accepted = 1.0 only when score <= alpha) keeps NaN on the reject
        # side in every format; the TFLite and ONNX tests feed NaN images to check it.
        accepted = (score <= self.alpha).to(torch.float32)
        rejected = accepted < 0.5
        if self.mode is Mode.DETECT:
            # the victim's own label: D served only the score, no second pass through E and F
            return torch.argmax(logits, dim=1), score, rejected, logits
        purified_logits = self.F(self.E(recon).z)
        label = torch.argmax(purified_logits, dim=1)
        return label, score, rejected, logits, purified_logits


class VictimGraph(nn.Module):
    """The undefended classifier F(E(x)) with the same input contract, for cost comparisons."""

    def __init__(self, model: DafarNet | Victim, contract: InputContract | str = InputContract.FLOAT_NCHW,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        c = model.spec.in_channels
        self.pre = _Preprocess(contract, mean or [0.5] * c, std or [0.5] * c)
        self.E, self.F = model.E, model.F

    def forward(self, x: torch.Tensor):
        logits = self.F(self.E(self.pre(x)).z)
        return torch.argmax(logits, dim=1), logits
