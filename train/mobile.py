"""``--arch mobile``: a small residual network for a phone or a Pi, and the decoder that mirrors it.

Why residual blocks of dense 3x3 convolutions rather than MobileNet's depthwise ones: on the
CPUs our users have (and on this 2-core VM) a dense convolution does several times more useful
work per second than a depthwise one, so at the same latency a ResNet-style block trains and runs
faster; every op is a builtin of TFLite and quantizes to int8 (batch norm is folded into the
convolutions before export: :func:`fold_batchnorm`).

Layout (channels at ``--width 1``: 32, 64, 128, 256, rounded to multiples of 8):

* E (the feature extractor): a 3x3 stem (stride 1 for inputs up to 64 px, else 2), then two
  stages of a stride-2 residual block: features at 1/4 (1/8) of the input's side
  (``--feedback-at stage1``: one stage, features at 1/2 (1/4), and stage2 moves into F);
* F (the rest of the classifier): stride-2 stages of 256 and, for large inputs, 512 channels,
  global average pooling and one linear layer;
* D (the feedback decoder): mirrors E with nearest-neighbour upsampling and 3x3 conv + batch
  norm + ReLU per step, then a 3x3 convolution to the image (Tanh where the normalization maps
  pixels into [-1, 1]).  No pooling indices and no masks: the decoder needs nothing from E but its
  output, so it is the same computation on every runtime.

Inputs from 32 to 224 px; height and width divisible by E's downsampling (4, or 8 above 64 px).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ConvBN", "ResBlock", "MobileEncoder", "MobileHead", "MobileDecoder", "UpDecoder", "fold_batchnorm", "mobile_channels",
           "mobile_stem_stride"]


def mobile_channels(width: float, n: int = 5) -> tuple[int, ...]:
    return tuple(max(8, int(math.ceil(c * width / 8.0)) * 8) for c in (32, 64, 128, 256, 512)[:n])


def mobile_stem_stride(height: int, width: int) -> int:
    return 1 if min(height, width) <= 64 else 2


class ConvBN(nn.Module):
    """A convolution, batch norm and (optionally) ReLU: folded into one convolution at export."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y


class _FoldedConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        self.conv, self.relu = conv, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


class ResBlock(nn.Module):
    """Two 3x3 ConvBN with a shortcut (a 1x1 ConvBN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = ConvBN(cin, cout, 3, stride)
        self.b = ConvBN(cout, cout, 3, 1, relu=False)
        self.short = ConvBN(cin, cout, 1, stride, relu=False) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + self.short(x))


class MobileEncoder(nn.Module):
    def __init__(self, spec):
        super().__init__()
        c = mobile_channels(spec.width_mult)
        self.stem = ConvBN(spec.in_channels, c[0], 3, mobile_stem_stride(spec.height, spec.width))
        self.stage1 = ResBlock(c[0], c[1], 2)
        # feedback after stage1: stage2 belongs to F (MobileHead.stage2, the same weights)
        self.stage2 = ResBlock(c[1], c[2], 2) if spec.encoder_blocks == 2 else nn.Identity()

    def forward(self, x: torch.Tensor):
        from .models import Features

        return Features(self.stage2(self.stage1(self.stem(x))), ())


class MobileHead(nn.Module):
    def __init__(self, spec, dropout: float = 0.0):
        super().__init__()
        c = mobile_channels(spec.width_mult)
        large = mobile_stem_stride(spec.height, spec.width) == 2
        self.stage2 = ResBlock(c[1], c[2], 2) if spec.encoder_blocks == 1 else nn.Identity()
        self.stage3 = nn.Sequential(ResBlock(c[2], c[3], 2), ResBlock(c[3], c[3], 1))
        self.stage4 = ResBlock(c[3], c[4], 2) if large else nn.Identity()
        self.dropout = float(dropout)
        self.fc = nn.Linear(c[4] if large else c[3], spec.num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stage4(self.stage3(self.stage2(z))).mean(dim=(2, 3))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout, training=True)
        return self.fc(h)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBN(cin, cout, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class MobileDecoder(nn.Module):
    def __init__(self, spec):
        super().__init__()
        from .models import decoder_channels

        c = mobile_channels(spec.width_mult)
        d0, d1 = (decoder_channels(v, spec.decoder_width) for v in c[:2])  # --decoder-width
        # mirrors E's stages: from E's output (c[2] after stage 2, c[1] after stage 1)
        ups = [_Up(c[2], d1), _Up(d1, d0)] if spec.encoder_blocks == 2 else [_Up(c[1], d0)]
        if mobile_stem_stride(spec.height, spec.width) == 2:
            ups.append(_Up(d0, d0))
        self.ups = nn.Sequential(*ups)
        self.out = nn.Conv2d(d0, spec.in_channels, 3, padding=1)
        self.tanh = spec.decoder_out == "tanh"

    def forward(self, feats) -> torch.Tensor:
        y = self.out(self.ups(feats.z))
        return torch.tanh(y) if self.tanh else y


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (in eval mode) with every :class:`ConvBN`'s batch norm folded into its
    convolution: the exported graph then holds convolutions only (int8-friendly), computing the
    same function up to float rounding.  Modules without batch norm come back unchanged."""
    if not any(isinstance(m, ConvBN) for m in module.modules()):
        return module
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    out = copy.deepcopy(module).eval()

    def swap(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvBN):
                setattr(parent, name, _FoldedConv(fuse_conv_bn_eval(child.conv, child.bn), child.relu))
            else:
                swap(child)

    swap(out)
    return out


class UpDecoder(nn.Module):
    """D for a user's own classifier: from E's feature map (C x h x w) back to the image, doubling
    the side per step (nearest upsampling, 3x3 conv, batch norm, ReLU; channels halve, at least
    16), then a 3x3 convolution to the image's channels (Tanh where the normalization maps pixels
    into [-1, 1]).  Like :class:`MobileDecoder` it needs nothing from E but its output."""

    def __init__(self, feature_shape, image_shape, tanh: bool, decoder_width: float = 1.0):
        super().__init__()
        from .models import decoder_channels

        c, h, _ = (int(v) for v in feature_shape)
        steps = int(round(math.log2(int(image_shape[1]) // h)))
        layers, full, cin = [], c, c  # full: the channel count at width 1; cin: what the last layer gives
        for _ in range(max(1, steps)):
            full = max(16, full // 2)
            cout = decoder_channels(full, decoder_width)
            # no steps: E keeps the image's resolution, one conv block before the output conv
            layers.append(_Up(cin, cout) if steps else ConvBN(cin, cout, 3, 1))
            cin = cout
        self.ups = nn.Sequential(*layers)
        self.out = nn.Conv2d(cin, int(image_shape[0]), 3, padding=1)
        self.tanh = tanh

    def forward(self, feats) -> torch.Tensor:
        y = self.out(self.ups(feats.z))
        return torch.tanh(y) if self.tanh else y
