"""Training cost per step, to decide CPU or GPU before committing hours to a run.

    python -m dafar.bench.perf.train_speed --dataset cifar10 [--batch-size 128] [--steps 8] [--threads 2]

Times optimizer steps of the joint E+F+D model (the paper's loss, Eq. 7) and of the victim-only
model on synthetic input of the data set's shape, after two burn-in steps (the first steps pay
for oneDNN kernel selection and allocator warm-up), and prints the median and spread per step and
the implied minutes per epoch of 45,000 (CIFAR-10) or 55,000 (MNIST) training images.  Synthetic
input costs what real input costs: the work of a convolution does not depend on pixel values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

__all__ = ["measure", "main"]

_TRAIN_IMAGES = {"mnist": 55000, "cifar10": 45000}


def measure(dataset: str = "cifar10", batch_size: int = 128, steps: int = 8, threads: int | None = None,
            device: str = "cpu", seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as Fn

    from dafar.train.models import ARCHS, Unpool, build_dafar, build_victim, l2_per_sample

    if dataset not in ARCHS:
        raise ValueError(f"dataset must be one of {sorted(ARCHS)}, got {dataset!r}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    spec = ARCHS[dataset]
    memfmt = torch.channels_last
    x = torch.rand(batch_size, *spec.input_shape, device=dev).mul_(2).sub_(1).to(memory_format=memfmt)
    y = torch.randint(0, spec.num_classes, (batch_size,), device=dev)
    out = {"dataset": dataset, "batch_size": batch_size, "steps": steps, "threads": torch.get_num_threads(),
           "device": str(dev), "torch": torch.__version__}

    def timed(model, loss_fn) -> list[float]:
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        times = []
        for i in range(steps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = loss_fn(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # burn-in
                times.append(time.perf_counter() - t0)
        return times

    def joint_loss(net):
        logits, recon = net(x)
        return 0.25 * l2_per_sample(x - recon).mean() + Fn.cross_entropy(logits, y)

    net = build_dafar(dataset, Unpool.MASK, with_detector=False).to(dev, memory_format=memfmt).train()
    victim = build_victim(dataset).to(dev, memory_format=memfmt).train()
    n = _TRAIN_IMAGES[dataset]
    for name, model, fn in (("joint", net, joint_loss), ("victim_only", victim, lambda v: Fn.cross_entropy(v(x), y))):
        t = timed(model, fn)
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        med = statistics.median(t)
        out[name] = {"median_s": med, "q1_s": q[0], "q3_s": q[2], "min_per_epoch": med * n / batch_size / 60}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dafar.bench.perf.train_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(_TRAIN_IMAGES), default="cifar10")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.steps < 1:
        p.error("--batch-size and --steps must be positive")
    r = measure(a.dataset, a.batch_size, a.steps, a.threads, a.device)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['dataset']}, batch {r['batch_size']}, {r['threads']} threads on {r['device']} (torch {r['torch']}), "
          f"{r['steps']} timed steps after 2 burn-in:")
    for name in ("joint", "victim_only"):
        s = r[name]
        print(f"  {name:12s} {s['median_s']:.3f} s/step (IQR {s['q1_s']:.3f}-{s['q3_s']:.3f}) "
              f"= {s['min_per_epoch']:.1f} min per epoch")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
