"""Export a run's detect graph (l2, float-nchw, ONNX + TFLite, no victim) with the index-free
unpool's nearest-neighbour upsampling (or its mask) written another way, to time what the
exported graph gains (issue 21; results in
bench/results/pareto-mnist/conv-decoder/README.md).  Measurement only: the patched module is both
the exported graph and the reference the parity checks compare with, so nothing here changes a
model's function except ``nomask`` (which only a timing may use).

    cp -r RUN /tmp/v && python bench/scripts/upsample_variants.py VARIANT /tmp/v [--validate N]

VARIANT: base (unchanged), expand (reshape to 6-D, expand, reshape), mul (reshape, multiply by a
ones tensor that broadcasts), cat (stack twice along new axes), nomask (upsampling without the
mask: a different function, for an upper bound on the mask's cost)."""
from __future__ import annotations

import sys

import torch

import dafar.train.models as M


def up_expand(t):
    n, c, h, w = t.shape
    return t.reshape(n, c, h, 1, w, 1).expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def up_mul(t):
    n, c, h, w = t.shape
    return (t.reshape(n, c, h, 1, w, 1) * torch.ones(1, 1, 1, 2, 1, 2, dtype=t.dtype)).reshape(n, c, 2 * h, 2 * w)


def up_cat(t):
    n, c, h, w = t.shape
    a = torch.stack([t, t], dim=-1).reshape(n, c, h, 2 * w)
    return torch.stack([a, a], dim=-2).reshape(n, c, 2 * h, 2 * w)


if __name__ == "__main__":  # the TFLite conversion runs in a spawned child that imports this file
    import argparse

    from dafar.export import ExportConfig, export

    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=["base", "expand", "mul", "cat", "nomask"])
    p.add_argument("run")
    p.add_argument("--validate", type=int, default=300)
    a = p.parse_args()
    if a.variant == "nomask":
        M.mask_unpool = lambda h, pre, pooled: M._upsample2(h)
    elif a.variant != "base":
        M._upsample2 = {"expand": up_expand, "mul": up_mul, "cat": up_cat}[a.variant]
    export(a.run, ExportConfig(modes=("detect",), validate_images=a.validate, victim=False))
    sys.exit(0)
