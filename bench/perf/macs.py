"""Multiply-accumulates and parameters of E, F, D and C (pure Python, so ``dafar bench
--device-only`` has them on a Pi without torch): read from the manifest, where the trainer
records them counted on the real modules (:mod:`dafar.train.cost`), or, for runs trained before
it did, computed from the paper's tables (a test checks the two agree).

MACs count convolutions, transposed convolutions and linear layers (k*k*C_in*C_out per output
position; a transposed convolution with stride 1 and padding 1 costs the same as a convolution
on its output).  Pooling, unpooling, activations and the score's few element-wise ops are
ignored: they are under 1% of the total here.
"""
from __future__ import annotations

from dafar.schema import Detector, Mode

__all__ = ["layers", "subnet_costs", "fused_costs"]


def _conv(cin, cout, k, hw):  # -> (macs, params)
    return cin * cout * k * k * hw * hw, cin * cout * k * k + cout


def _fc(n_in, n_out):
    return n_in * n_out, n_in * n_out + n_out


def layers(dataset: str) -> dict[str, list[tuple[str, int, int]]]:
    """Per subnetwork: (layer, MACs, parameters)."""
    if dataset == "mnist":
        E = [("conv 1->32 @28", *_conv(1, 32, 3, 28)), ("conv 32->32 @28", *_conv(32, 32, 3, 28)),
             ("conv 32->64 @14", *_conv(32, 64, 3, 14)), ("conv 64->64 @14", *_conv(64, 64, 3, 14))]
        F = [("fc 3136->200", *_fc(3136, 200)), ("fc 200->200", *_fc(200, 200)), ("fc 200->10", *_fc(200, 10))]
        D = [("convT 64->64 @14", *_conv(64, 64, 3, 14)), ("convT 64->32 @14", *_conv(64, 32, 3, 14)),
             ("convT 32->32 @28", *_conv(32, 32, 3, 28)), ("convT 32->1 @28", *_conv(32, 1, 3, 28))]
        C = [("fc 784->256", *_fc(784, 256)), ("fc 256->32", *_fc(256, 32)), ("fc 32->256", *_fc(32, 256)),
             ("fc 256->784", *_fc(256, 784))]
    elif dataset == "cifar10":
        E = [("conv 3->96 @32", *_conv(3, 96, 3, 32)), ("conv 96->96 @32", *_conv(96, 96, 3, 32)),
             ("conv 96->96 @32", *_conv(96, 96, 3, 32)), ("conv 96->192 @16", *_conv(96, 192, 3, 16)),
             ("conv 192->192 @16", *_conv(192, 192, 3, 16)), ("conv 192->192 @16", *_conv(192, 192, 3, 16))]
        F = [("conv 192->192 @8", *_conv(192, 192, 3, 8)), ("conv1x1 192->192 @8", *_conv(192, 192, 1, 8)),
             ("conv1x1 192->10 @8", *_conv(192, 10, 1, 8)), ("fc 640->200", *_fc(640, 200)),
             ("fc 200->200", *_fc(200, 200)), ("fc 200->10", *_fc(200, 10))]
        D = [("convT 192->192 @16", *_conv(192, 192, 3, 16)), ("convT 192->192 @16", *_conv(192, 192, 3, 16)),
             ("convT 192->96 @16", *_conv(192, 96, 3, 16)), ("convT 96->96 @32", *_conv(96, 96, 3, 32)),
             ("convT 96->96 @32", *_conv(96, 96, 3, 32)), ("convT 96->3 @32", *_conv(96, 3, 3, 32))]
        C = [("fc 3072->512", *_fc(3072, 512)), ("fc 512->64", *_fc(512, 64)), ("fc 64->512", *_fc(64, 512)),
             ("fc 512->3072", *_fc(512, 3072))]
    else:
        raise ValueError(f"no architecture for data set {dataset!r}")
    return {"E": E, "F": F, "D": D, "C": C}


def subnet_costs(source: "str | dict") -> dict[str, dict[str, int]]:
    """MACs and parameters per subnetwork: from a manifest (``architecture.costs``, counted on the
    trained modules), or the paper's tables by data set name (runs trained before the manifest
    recorded them)."""
    if isinstance(source, dict):
        costs = (source.get("architecture") or {}).get("costs")
        if costs:
            return {k: {"macs": int(v["macs"]), "params": int(v["params"])} for k, v in costs.items()}
        source = (source.get("dataset") or {}).get("name", "")
    return {k: {"macs": sum(l[1] for l in v), "params": sum(l[2] for l in v)} for k, v in layers(source).items()}


def fused_costs(source: "str | dict", detector: str | None, mode: str | None = None) -> dict:
    """MACs of the fused defence graph (E, F, D, then E and F again on the reconstruction, plus C
    for the autoencoder detector; ``mode="detect"``: E, F and D once, no second pass) and of the
    victim F(E(x)), and their ratio."""
    s = subnet_costs(source)
    victim = s["E"]["macs"] + s["F"]["macs"]
    with_c = detector is not None and Detector(detector) is Detector.AUTOENCODER
    passes = 1 if mode is not None and Mode(mode) is Mode.DETECT else 2
    fused = passes * victim + s["D"]["macs"] + (s["C"]["macs"] if with_c else 0)
    return {"victim_macs": victim, "fused_macs": fused, "mac_ratio": fused / victim}
