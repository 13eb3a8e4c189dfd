"""Run a dafar command with the index-free unpool's nearest-neighbour upsampling (or its mask)
written another way, to time what the exported graph gains (issue 21; results in
bench/results/pareto-mnist/conv-decoder/README.md).  Measurement only: the patched module is both
the exported graph and the reference the parity checks compare with, so nothing here changes a
model's function except ``nomask`` (which only a timing may use).

    python bench/scripts/upsample_variants.py VARIANT dafar-args...
    e.g. cp -r RUN /tmp/v && python bench/scripts/upsample_variants.py cat export /tmp/v --mode detect --no-victim

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
    variant = sys.argv[1]
    if variant == "nomask":
        M.mask_unpool = lambda h, pre, pooled: M._upsample2(h)
    elif variant != "base":
        M._upsample2 = {"expand": up_expand, "mul": up_mul, "cat": up_cat}[variant]
    from dafar.cli import main

    sys.argv = ["dafar", *sys.argv[2:]]
    sys.exit(main(sys.argv[1:]))
