"""Parameters and multiply-accumulates of E, F, D and C, counted on the real modules with
forward hooks (convolutions, transposed convolutions and linear layers; pooling, unpooling,
activations and the score's element-wise ops are ignored, under 1% of the total for the paper's
networks).  The trainer records them in the manifest, so ``dafar bench`` reports the cost of any
architecture on a device without torch."""
from __future__ import annotations

import torch

__all__ = ["subnet_costs"]


@torch.no_grad()
def subnet_costs(net) -> dict[str, dict[str, int]]:
    """``{"E": {"macs": ..., "params": ...}, "F": ..., "D": ..., "C": ...}`` for one image
    (C is zero when the model has none)."""
    counts: dict[str, int] = {}

    def hook(name):
        def f(mod, inp, out):
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                counts[name] = counts.get(name, 0) + (out.shape[2] * out.shape[3] * k * mod.in_channels
                                                      * mod.out_channels // mod.groups)
            elif isinstance(mod, torch.nn.Linear):
                counts[name] = counts.get(name, 0) + mod.in_features * mod.out_features
        return f

    handles = []
    for name in "EFDC":
        sub = getattr(net, name, None)
        if sub is not None:
            handles += [m.register_forward_hook(hook(name)) for m in sub.modules()]
    was_training = net.training
    net.eval()
    try:
        x = torch.zeros(1, *net.spec.input_shape, device=next(net.parameters()).device)
        feats = net.E(x)
        net.F(feats.z)
        if net.D is not None:  # (a classifier-only run has none)
            rec = net.D(feats)
            if net.C is not None:
                net.C(x - rec)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    out = {}
    for name in "EFDC":
        sub = getattr(net, name, None)
        out[name] = {"macs": int(counts.get(name, 0)),
                     "params": 0 if sub is None else int(sum(p.numel() for p in sub.parameters()))}
    return out
