"""The four DAFAR subnetworks (paper Tables 1-3) for MNIST and CIFAR-10.

``E`` (feature extractor) and ``F`` (output layers) form the victim classifier ``F(E(x))``;
``D`` (feedback decoder) rebuilds the input from ``E(x)``; ``C`` (optional anomaly autoencoder)
rebuilds the residual ``x - D(E(x))``.  Every module works on the model scale: images in
[-1, 1] (the decoder ends in Tanh), NCHW float32.

Unpooling.  The paper's decoder uses MaxUnpool with the encoder's pooling indices.  That op
needs ``FlexMaxPoolWithArgmax`` on TFLite/LiteRT and does not survive the legacy ONNX exporter,
so the default here is an *index-free* unpool built from builtin ops only::

    unpool(h) = upsample_nearest(h) * (pre_pool == upsample_nearest(pooled))

where ``pre_pool``/``pooled`` are the encoder's activations before and after the matching
2x2 max-pool.  Tie rule (deterministic): every position of a window that equals the window's
maximum receives the value; MaxUnpool gives it to the first such position only.  The two agree
exactly on tie-free windows and differ on tied ones: an all-zero post-ReLU window (MNIST
background) ties everywhere, so there the index-free unpool spreads ``h`` like nearest
upsampling while MaxUnpool puts it in the top-left corner.  Because they are not
interchangeable on real data, the operator a model was trained with is recorded in the manifest
and the same one is exported: the deployed graph is the trained graph.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as Fn
from torch import nn

from dafar.errors import ConfigError
from dafar.train.config import FEEDBACK_POSITIONS
from dafar.schema import Unpool

__all__ = [
    "Unpool",
    "ArchSpec",
    "ARCHS",
    "PoolContext",
    "Features",
    "Encoder",
    "OutputHead",
    "Decoder",
    "AnomalyAE",
    "DafarNet",
    "Victim",
    "build_dafar",
    "build_victim",
    "paper_spec",
    "custom_spec",
    "spec_from_record",
    "decoder_output_for",
    "FAMILIES",
    "FEEDBACK_POSITIONS",
    "resplit_victim",
    "mask_unpool",
    "conv_from_convtranspose",
    "deploy_form",
    "Normalize",
    "VictimLogits",
]


@dataclass(frozen=True)
class ArchSpec:
    """Shape facts of one architecture (what the manifest records).

    ``family`` names the layer recipe (the paper's MNIST or CIFAR-10 tables); ``name`` is what
    manifests call it (``dafar-mnist``, ``dafar-cifar10``); the input shape and class count may be
    any a data set needs (height and width divisible by 4: two 2x2 pools, mirrored by D)."""

    name: str
    family: str  # "paper-mnist" | "paper-cifar10"
    in_channels: int
    height: int
    width: int
    num_classes: int
    enc_channels: tuple[int, ...]  # per conv of E; a pool follows each block
    block_convs: int  # convs per encoder block
    detector_hidden: tuple[int, int]
    # D's last activation: Tanh where the model scale of [0, 1] pixels is [-1, 1] (normalization
    # mean 0.5, std 0.5, the paper's setting), none where a data set's own mean/std leave that range
    decoder_out: str = "tanh"
    width_mult: float = 1.0  # channel multiplier (the mobile family)
    # D's channel multiplier (every family): the paper's other cost knob beside the feedback
    # position.  Only D's hidden layers narrow; the channels its unpool masks need (E's) do not.
    decoder_width: float = 1.0
    # the feedback position: the layer after which E ends, F begins and D's input is taken
    # (paper section 3: "we can determine the layers to capture high-level features (i.e.,
    # feedback positions) according to what tradeoff we want to make"); "" = the family's default
    feedback: str = ""
    # the "custom" family (a user's own classifier, dafar.train.graph): its traced graph as JSON
    # text and the shape of E's output at the feedback position (what D starts from)
    victim_graph: str = ""
    feature_shape: tuple[int, ...] = ()

    @property
    def feedback_at(self) -> str:
        return self.feedback or FEEDBACK_POSITIONS[self.family][-1]

    @property
    def encoder_blocks(self) -> int:
        """How many of the family's downsampling blocks (pools, or mobile stages) E holds."""
        return FEEDBACK_POSITIONS[self.family].index(self.feedback_at) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.height, self.width)

    @property
    def input_numel(self) -> int:
        return self.in_channels * self.height * self.width


ARCHS: dict[str, ArchSpec] = {
    "mnist": ArchSpec("dafar-mnist", "paper-mnist", 1, 28, 28, 10, (32, 64), 2, (256, 32)),
    "cifar10": ArchSpec("dafar-cifar10", "paper-cifar10", 3, 32, 32, 10, (96, 192), 3, (512, 64)),
}
FAMILIES = {spec.family: spec for spec in ARCHS.values()}

# the small residual network of dafar.train.mobile (its channels follow `width`)
FAMILIES["mobile"] = ArchSpec("dafar-mobile", "mobile", 3, 32, 32, 10, (), 0, (512, 64))
# a user's own classifier (dafar attach --victim package.module:callable): see custom_spec
FAMILIES["custom"] = ArchSpec("custom-victim", "custom", 3, 32, 32, 10, (), 0, (512, 64))


def decoder_output_for(mean, std) -> str:
    """Tanh when normalized [0, 1] pixels stay within [-1, 1] on every channel, else none."""
    lo = min((0.0 - m) / s for m, s in zip(mean, std))
    hi = max((1.0 - m) / s for m, s in zip(mean, std))
    return "tanh" if lo >= -1.0 - 1e-9 and hi <= 1.0 + 1e-9 else "linear"


def decoder_channels(c: int, decoder_width: float) -> int:
    """A hidden layer of D with ``c`` channels at full width, narrowed by ``decoder_width``."""
    return c if decoder_width == 1.0 else max(4, int(round(c * decoder_width)))


def _check_decoder_width(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.125 <= v <= 1:
        raise ConfigError(f"decoder width must lie in [0.125, 1] (a fraction of the paper's decoder), got {v!r}")
    return float(v)


def paper_spec(family: str, input_shape, num_classes: int, decoder_out: str = "tanh", width_mult: float = 1.0,
               feedback: str | None = None, decoder_width: float = 1.0) -> ArchSpec:
    """Architecture ``family`` (the paper's two, or ``mobile``) sized for ``input_shape`` (C, H, W)
    and ``num_classes``, with E ending at ``feedback`` (default: the family's last position)."""
    if family not in FAMILIES or family == "custom":
        raise ConfigError(f"unknown architecture {family!r}; choose from: "
                          f"{', '.join(sorted(set(FAMILIES) - {'custom'}))}")
    positions = FEEDBACK_POSITIONS[family]
    if feedback in (None, ""):
        feedback = positions[-1]
    if feedback not in positions:
        raise ConfigError(f"feedback position {feedback!r} does not exist in the {family} network; choose from: "
                          f"{', '.join(positions)}")
    c, h, w = (int(v) for v in input_shape)
    if family == "mobile":
        from .mobile import mobile_stem_stride

        down = 4 * mobile_stem_stride(h, w)
        if h % down or w % down or min(h, w) < 16 or max(h, w) > 512:
            raise ConfigError(f"the mobile architecture takes sides from 16 to 512 px divisible by {down} (its feature "
                              f"extractor downsamples {down}x), got {h}x{w}; pass --image-size with such a size")
        if not (isinstance(width_mult, (int, float)) and 0.125 <= width_mult <= 4):
            raise ConfigError(f"width must lie in [0.125, 4], got {width_mult!r}")
    elif h % 4 or w % 4 or h < 4 or w < 4:
        raise ConfigError(f"the {family} architecture pools twice (2x2): image height and width must be multiples of "
                          f"4, got {h}x{w}; pass --image-size with such a size")
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    decoder_width = _check_decoder_width(decoder_width)
    if decoder_out not in ("tanh", "linear"):
        raise ConfigError(f"decoder output must be tanh or linear, got {decoder_out!r}")
    # the default position is stored as "" so that specs (and manifests) of runs from before the
    # option existed compare equal to today's
    return replace(FAMILIES[family], in_channels=c, height=h, width=w, num_classes=int(num_classes),
                   decoder_out=decoder_out, feedback="" if feedback == positions[-1] else feedback,
                   decoder_width=decoder_width, **({"width_mult": float(width_mult)} if family == "mobile" else {}))


def spec_from_record(manifest: dict) -> ArchSpec:
    """The spec a run's manifest describes: ``architecture.family``, ``input.shape``,
    ``architecture.num_classes`` and ``architecture.decoder_output``.  Runs written before the
    family was recorded are MNIST or CIFAR-10 at the paper's size, named by their data set."""
    arch = manifest.get("architecture") or {}
    if arch.get("family") == "custom":
        from .graph import VictimGraph

        return custom_spec(VictimGraph.from_data(arch.get("victim_graph")), manifest["input"]["shape"],
                           arch["num_classes"], arch.get("decoder_output", "tanh"), arch.get("feedback_at"),
                           arch.get("decoder_width", 1.0))
    if "family" not in arch:
        ds = (manifest.get("dataset") or {}).get("name")
        if ds not in ARCHS:
            raise ConfigError(f"the manifest names no architecture family and its data set {ds!r} has no default")
        return ARCHS[ds]
    return paper_spec(arch["family"], manifest["input"]["shape"], arch["num_classes"], arch.get("decoder_output", "tanh"),
                      arch.get("width", 1.0),  # (the mobile family's channel multiplier)
                      arch.get("feedback_at"),  # absent before the option existed: the default position
                      arch.get("decoder_width", 1.0))  # likewise: the paper's decoder


class PoolContext(NamedTuple):
    """What a decoder unpool needs from the matching encoder pool.

    ``pre``/``pooled`` for the index-free unpool; ``indices`` for MaxUnpool (else an empty tensor,
    so the tuple stays traceable)."""

    pre: torch.Tensor
    pooled: torch.Tensor
    indices: torch.Tensor


class Features(NamedTuple):
    """``E(x)``: the high-level features and the pooling context of each pool (outermost first)."""

    z: torch.Tensor
    pools: tuple[PoolContext, ...]


def _upsample2(t: torch.Tensor) -> torch.Tensor:
    # Nearest-neighbour x2: exports to ONNX Resize(nearest) and TFLite RESIZE_NEAREST_NEIGHBOR.
    return Fn.interpolate(t, scale_factor=2.0, mode="nearest")


def mask_unpool(h: torch.Tensor, pre: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Index-free 2x2 unpool of ``h`` guided by an encoder pool (see module docstring)."""
    mask = (pre == _upsample2(pooled)).to(h.dtype)  # no gradient flows through the mask
    return _upsample2(h) * mask


def _conv_block(cin: int, cout: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=False)]
    return layers


class Encoder(nn.Module):
    """E: conv blocks, each followed by a 2x2 max-pool (Table 1, feature extraction layers)."""

    def __init__(self, spec: ArchSpec, unpool: Unpool = Unpool.MASK):
        super().__init__()
        self.unpool = Unpool(unpool)
        blocks = []
        cin = spec.in_channels
        for cout in spec.enc_channels[: spec.encoder_blocks]:
            blocks.append(nn.Sequential(*_conv_block(cin, cout, spec.block_convs)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> Features:
        pools = []
        h = x
        for block in self.blocks:
            pre = block(h)
            if self.unpool is Unpool.MAXUNPOOL:
                h, idx = Fn.max_pool2d(pre, 2, 2, return_indices=True)
            else:
                h = Fn.max_pool2d(pre, 2, 2)
                idx = pre.new_empty(0)
            pools.append(PoolContext(pre, h, idx))
        return Features(h, tuple(pools))


class OutputHead(nn.Module):
    """F: the victim's output layers (Table 1); returns logits (softmax is left to the loss)."""

    def __init__(self, spec: ArchSpec, dropout: float = 0.0):
        super().__init__()
        # Dropout on F's input E(x) while training only (the exported eval-mode graph has none):
        # the CIFAR-10 head overfits (train 92% vs validation 80% after 30 epochs without it).
        # Functional, so the state dict keys stay those of the published weights.
        self.dropout = float(dropout)
        # the conv blocks (each followed by a 2x2 max-pool) that an earlier feedback position
        # moves from E into F; the same layers and weights, named F.blocks.i instead of E.blocks.j
        k = spec.encoder_blocks
        cins = (spec.in_channels, *spec.enc_channels)
        self.blocks = nn.ModuleList(nn.Sequential(*_conv_block(cins[j], spec.enc_channels[j], spec.block_convs))
                                    for j in range(k, len(spec.enc_channels)))
        c = spec.enc_channels[-1]
        hw = (spec.height // 4) * (spec.width // 4)
        if spec.family == "paper-cifar10":
            self.convs = nn.Sequential(
                nn.Conv2d(c, 192, 3, padding=1), nn.ReLU(),
                nn.Conv2d(192, 192, 1), nn.ReLU(),
                nn.Conv2d(192, 10, 1), nn.ReLU(),
            )
            flat = 10 * hw
        else:
            self.convs = nn.Identity()
            flat = c * hw
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, spec.num_classes),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            z = nn.functional.dropout(z, self.dropout, training=True)
        for block in self.blocks:
            z = Fn.max_pool2d(block(z), 2, 2)
        return self.fc(self.convs(z))


class _Unpool(nn.Module):
    def __init__(self, mode: Unpool):
        super().__init__()
        self.mode = Unpool(mode)
        # BPDA for white-box attacks (dafar.bench.adaptive): the forward value is unchanged, the
        # backward pass treats the mask as all ones, so gradients reach every window position.
        self.straight_through = False

    def forward(self, h: torch.Tensor, ctx: PoolContext) -> torch.Tensor:
        if self.mode is Unpool.MAXUNPOOL:
            return Fn.max_unpool2d(h, ctx.indices, 2, 2, output_size=ctx.pre.shape[-2:])
        if self.mode is Unpool.UPSAMPLE:  # no mask: differentiable as it is, nothing for BPDA to replace
            return _upsample2(h)
        out = mask_unpool(h, ctx.pre, ctx.pooled)
        if self.straight_through:
            up = _upsample2(h)
            return up + (out - up).detach()
        return out


def _convt(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 3, padding=1)


def _is_conv_in_disguise(m: nn.Module) -> bool:
    """A stride-1, size-keeping ConvTranspose2d (stride, dilation, groups, output padding
    1/1/1/0, zero padding (k - 1) / 2): what :func:`conv_from_convtranspose` can rewrite."""
    return (isinstance(m, nn.ConvTranspose2d) and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
            and m.output_padding == (0, 0) and isinstance(m.padding, tuple) and m.padding_mode == "zeros"
            and all(kk - 1 - p == p for kk, p in zip(m.kernel_size, m.padding)))


def conv_from_convtranspose(m: nn.ConvTranspose2d) -> nn.Conv2d | None:
    """The :class:`nn.Conv2d` that computes what a stride-1 ``m`` computes, or None where ``m``
    is not one (stride, dilation, groups or output padding other than 1/1/1/0, or padding that
    does not keep the size).  A stride-1 transposed convolution with padding p is a convolution
    with the same kernel flipped in both spatial axes and in/out channels swapped, padding
    k - 1 - p: the same sums of the same products, in another order (float rounding only)."""
    if not _is_conv_in_disguise(m):
        return None
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, bias=m.bias is not None)
    conv = conv.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(m.weight.transpose(0, 1).flip(2, 3))
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def deploy_form(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (eval mode) for the exported graph, computing the same function: every
    stride-1, size-keeping ConvTranspose2d (the paper decoders' layers) becomes the equivalent
    Conv2d.  Why: onnx2tf writes a padded ConvTranspose as a VALID TRANSPOSE_CONV on a map two
    pixels larger, a STRIDED_SLICE back and a separate RELU, where a Conv2d becomes one CONV_2D
    with SAME padding and the ReLU fused; and tflite-runtime 2.14 cannot run an int8-weight
    TRANSPOSE_CONV on float input at all.  Measured with LiteRT, 1 thread, on the published
    models' detect graphs (`dafar pareto`): 2.41x -> 2.10x the float victim (MNIST), 2.20x ->
    1.99x (CIFAR-10) (bench/results/pareto-cifar10/, bench/results/pareto-mnist/conv-decoder/).
    ``net`` itself is untouched: training, attacks and the evaluation keep the module they always
    used; a module without such layers comes back as it is."""
    import copy

    if not any(_is_conv_in_disguise(m) for m in net.modules()):
        return net
    out = copy.deepcopy(net).eval()

    def swap(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if _is_conv_in_disguise(child):
                setattr(parent, name, conv_from_convtranspose(child))
            else:
                swap(child)

    swap(out)
    return out


class Decoder(nn.Module):
    """D: the feedback network (Table 2), mirror of E with unpools guided by E's pools."""

    def __init__(self, spec: ArchSpec, unpool: Unpool = Unpool.MASK):
        super().__init__()
        c1, c2 = spec.enc_channels
        # --decoder-width narrows the hidden layers (w1, w2); each unpool's input keeps E's channel
        # count (c2 for z, c1 after the inner stage), since the mask comes from E's activations
        w1, w2 = (decoder_channels(c, spec.decoder_width) for c in (c1, c2))
        self.unpool = _Unpool(unpool)
        last = [nn.Tanh()] if spec.decoder_out == "tanh" else []
        if spec.family == "paper-cifar10":
            inner = [_convt(c2, w2), nn.ReLU(), _convt(w2, w2), nn.ReLU(), _convt(w2, c1), nn.ReLU()]
            outer = [_convt(c1, w1), nn.ReLU(), _convt(w1, w1), nn.ReLU(), _convt(w1, spec.in_channels), *last]
        else:
            inner = [_convt(c2, w2), nn.ReLU(), _convt(w2, c1), nn.ReLU()]
            outer = [_convt(c1, w1), nn.ReLU(), _convt(w1, spec.in_channels), *last]
        # feedback after the first pool: E's features are the first block's, D mirrors that block only
        self.inner = nn.Sequential(*inner) if spec.encoder_blocks == 2 else None
        self.outer = nn.Sequential(*outer)

    def forward(self, feats: Features) -> torch.Tensor:
        if self.inner is None:
            (outer_ctx,) = feats.pools
            return self.outer(self.unpool(feats.z, outer_ctx))
        outer_ctx, inner_ctx = feats.pools
        h = self.inner(self.unpool(feats.z, inner_ctx))
        return self.outer(self.unpool(h, outer_ctx))


class AnomalyAE(nn.Module):
    """C: MLP autoencoder over the flattened residual (Table 3)."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        n = spec.input_numel
        h1, h2 = spec.detector_hidden
        self.shape = spec.input_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, h1), nn.ReLU(),
            nn.Linear(h1, n), nn.Tanh(),
        )

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return self.net(delta).view(delta.shape[0], *self.shape)


def l2_per_sample(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each sample of a batch (the paper's ||.||_2)."""
    return torch.linalg.vector_norm(t.flatten(1), ord=2, dim=1)


def custom_spec(graph, input_shape, num_classes: int, decoder_out: str = "tanh", feedback: str | None = None,
                decoder_width: float = 1.0) -> ArchSpec:
    """The spec of a user's traced classifier (:class:`dafar.train.graph.VictimGraph`) on images
    of ``input_shape``, with E ending at layer ``feedback``: checked by running both halves once
    on zeros (the logits must have ``num_classes`` columns; D must be able to mirror E: the input
    side divided by E's output side is a power of two)."""
    if not feedback:
        raise ConfigError("a classifier of your own needs --feedback-at LAYER (where E ends and D takes its input)")
    decoder_width = _check_decoder_width(decoder_width)
    c, h, w = (int(v) for v in input_shape)
    e_graph, f_graph = graph.split(feedback)
    try:
        with torch.no_grad():
            z = e_graph.build().eval()(torch.zeros(1, c, h, w))
            logits = f_graph.build().eval()(z)
    except Exception as exc:  # the user's layers on this data's shape: any torch error means "does not fit"
        raise ConfigError(f"the classifier does not run on {c}x{h}x{w} images ({type(exc).__name__}: {exc})") from None
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ConfigError(f"--feedback-at {feedback}: E's output must be an N x C x H x W feature map, got "
                          f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        raise ConfigError(f"the classifier returns {tuple(getattr(logits, 'shape', ()))} for one image, not logits "
                          f"for the data's {num_classes} classes")
    fh, fw = int(z.shape[2]), int(z.shape[3])
    if h % fh or w % fw or h // fh != w // fw or (h // fh) & (h // fh - 1):
        raise ConfigError(f"--feedback-at {feedback}: E's output is {fh}x{fw} for {h}x{w} images; D upsamples by 2 per "
                          f"step, so pick a layer whose output side divides the input's by a power of two")
    return replace(FAMILIES["custom"], in_channels=c, height=h, width=w, num_classes=int(num_classes),
                   decoder_out=decoder_out, feedback=feedback, victim_graph=graph.text, decoder_width=decoder_width,
                   feature_shape=tuple(int(v) for v in z.shape[1:]))


class _GraphPart(nn.Module):
    """E or F of a user's classifier, rebuilt from its stored graph (torch.nn layers only)."""

    def __init__(self, graph, features: bool):
        super().__init__()
        self.net = graph.build()
        self.features = features

    def forward(self, x: torch.Tensor):
        y = self.net(x)
        return Features(y, ()) if self.features else y


def _split_custom(spec: ArchSpec):
    from .graph import VictimGraph

    return VictimGraph(spec.victim_graph).split(spec.feedback_at)


def _encoder(spec: ArchSpec, unpool: Unpool) -> nn.Module:
    if spec.family == "custom":
        return _GraphPart(_split_custom(spec)[0], features=True)
    if spec.family == "mobile":
        from .mobile import MobileEncoder

        return MobileEncoder(spec)
    return Encoder(spec, unpool)


def _head(spec: ArchSpec, dropout: float) -> nn.Module:
    if spec.family == "custom":
        return _GraphPart(_split_custom(spec)[1], features=False)
    if spec.family == "mobile":
        from .mobile import MobileHead

        return MobileHead(spec, dropout)
    return OutputHead(spec, dropout)


class DafarNet(nn.Module):
    """E, F, D (and optionally C) together; the training-time view of the defence."""

    def __init__(self, spec: ArchSpec, unpool: Unpool = Unpool.MASK, with_detector: bool = True,
                 dropout: float = 0.0, normalization: dict | None = None):
        super().__init__()
        self.spec = spec
        self.unpool_mode = Unpool(unpool)
        # images in [0, 1] -> the model scale (non-persistent: the weights files do not hold it,
        # the manifest does); 0.5 / 0.5 maps them to [-1, 1], the paper's scale
        norm = normalization or {"mean": [0.5] * spec.in_channels, "std": [0.5] * spec.in_channels}
        self.norm = Normalize(norm["mean"], norm["std"])
        self.E, self.F = _encoder(spec, unpool), _head(spec, dropout)
        if spec.family == "mobile":
            from .mobile import MobileDecoder

            self.D = MobileDecoder(spec)
        elif spec.family == "custom":
            from .mobile import UpDecoder

            self.D = UpDecoder(spec.feature_shape, spec.input_shape, spec.decoder_out == "tanh", spec.decoder_width)
        else:
            self.D = Decoder(spec, unpool)
        self.C = AnomalyAE(spec) if with_detector else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x on the model scale -> (victim logits F(E(x)), reconstruction D(E(x)))."""
        feats = self.E(x)
        return self.F(feats.z), self.D(feats)

    def from_unit(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the model scale."""
        return self.norm(x01)

    def to_unit(self, xm: torch.Tensor) -> torch.Tensor:
        """The model scale -> images in [0, 1] (for showing reconstructions)."""
        return (xm - self.norm.shift) / self.norm.scale

    def purified_logits(self, recon: torch.Tensor) -> torch.Tensor:
        return self.F(self.E(recon).z)

    def l2_score(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return l2_per_sample(x - recon)

    def ae_score(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        if self.C is None:
            raise RuntimeError("this model has no anomaly autoencoder C")
        delta = x - recon
        return l2_per_sample(delta - self.C(delta))


class Victim(nn.Module):
    """The undefended classifier F(E(x)), trained alone for the accuracy comparison."""

    def __init__(self, spec: ArchSpec, dropout: float = 0.0):
        super().__init__()
        self.spec = spec
        self.E = _encoder(spec, Unpool.MASK)  # the unpool mode is irrelevant without a decoder
        self.F = _head(spec, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.F(self.E(x).z)


def _spec(arch: "str | ArchSpec") -> ArchSpec:
    return arch if isinstance(arch, ArchSpec) else ARCHS[arch]


def build_dafar(arch: "str | ArchSpec", unpool: Unpool | str = Unpool.MASK, with_detector: bool = True,
                dropout: float = 0.0, normalization: dict | None = None) -> DafarNet:
    """E, F, D (and C) for an :class:`ArchSpec` (or the paper's spec of data set ``arch``)."""
    return DafarNet(_spec(arch), Unpool(unpool), with_detector, dropout, normalization)


def build_victim(arch: "str | ArchSpec", dropout: float = 0.0) -> Victim:
    return Victim(_spec(arch), dropout)


class Normalize(nn.Module):
    """Images in [0, 1] (or raw pixels with ``pixel_max=255``) -> the model scale,
    ``(x01 - mean) / std``, folded into one multiply-add per pixel: ``x * scale + shift``.  The
    exported graphs and the float victim that the attacks and the evaluation use compute it the
    same way, so they see the same numbers."""

    def __init__(self, mean: list[float], std: list[float], pixel_max: float = 1.0):
        super().__init__()
        c = len(mean)
        scale = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(1, c, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, c, 1, 1)
        if pixel_max != 1.0:
            scale = scale / pixel_max
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class VictimLogits(nn.Module):
    """The float victim ``F(E(x))`` on images in [0, 1], NCHW: logits out (what gray-box attacks
    and the evaluation differentiate)."""

    def __init__(self, model: "DafarNet | Victim", normalization: dict):
        super().__init__()
        self.pre = Normalize(normalization["mean"], normalization["std"])
        self.E, self.F = model.E, model.F

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.F(self.E(self.pre(x)).z)


def _canonical(spec: ArchSpec, sub: str, key: str) -> str:
    """A name for an E or F tensor that does not depend on the feedback position."""
    k = spec.encoder_blocks
    if spec.family == "mobile":
        return key if key.startswith("stage2.") else f"{sub}.{key}"
    if key.startswith("blocks."):
        _, j, rest = key.split(".", 2)
        return f"blocks.{int(j) + (0 if sub == 'E' else k)}.{rest}"
    return f"{sub}.{key}"


def resplit_victim(e_state: dict, f_state: dict, src: ArchSpec, dst: ArchSpec) -> tuple[dict, dict]:
    """The state dicts of E and F for feedback position ``dst.feedback_at`` from a classifier
    split at ``src.feedback_at``: the same tensors (the classifier F(E(x)) is unchanged, bit for
    bit), only the boundary between E and F moves."""
    if replace(src, feedback="", decoder_width=1.0) != replace(dst, feedback="", decoder_width=1.0):  # D is not moved
        raise ConfigError(f"cannot move the feedback position between different networks ({src} vs {dst})")
    pool = {_canonical(src, "E", k): v for k, v in e_state.items()}
    pool.update({_canonical(src, "F", k): v for k, v in f_state.items()})
    out = []
    for sub, module in (("E", _encoder(dst, Unpool.MASK)), ("F", _head(dst, 0.0))):
        want = module.state_dict().keys()
        missing = [k for k in want if _canonical(dst, sub, k) not in pool]
        if missing:
            raise ConfigError(f"the classifier's weights lack {sub}.{missing[0]} for feedback at {dst.feedback_at}")
        out.append({k: pool[_canonical(dst, sub, k)] for k in want})
    return out[0], out[1]
