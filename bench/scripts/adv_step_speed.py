"""What adversarial training costs per step on this machine: one joint training step (batch 128)
of the mobile network at 32x32 (CIFAR-10's shape), clean, with `--adversarial fast` and with
7-step PGD, on random data (the cost does not depend on the pixels).

    .venv/bin/python bench/scripts/adv_step_speed.py

Prints seconds per batch and per 45,000-image epoch (CIFAR-10's training split less validation).
"""
import time, torch
import torch.nn.functional as Fn
from dafar.train.models import build_dafar, paper_spec, Normalize
from dafar.train.adversarial import perturb
torch.manual_seed(0)
spec = paper_spec("mobile", (3, 32, 32), 10, "linear", 1.0)
net = build_dafar(spec, with_detector=False, normalization={"mean": [0.5]*3, "std": [0.25]*3}).to(memory_format=torch.channels_last).train()
norm = Normalize([0.5]*3, [0.25]*3)
x = ((torch.rand(128, 3, 32, 32) - 0.5) / 0.25).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
classify = lambda xm: net.F(net.E(xm).z)
for steps in (0, 1, 7):
    t0 = time.perf_counter()
    for _ in range(4):
        if steps:
            xa = perturb(classify, x, y, norm, 8/255, steps, 2.5*8/255/steps if steps > 1 else 1.25*8/255)
            recon = net.D(net.E(x)); logits = classify(xa)
        else:
            logits, recon = net(x)
        loss = Fn.cross_entropy(logits, y) + 0.25 * (x - recon).flatten(1).norm(dim=1).mean()
        net.zero_grad(); loss.backward()
    dt = (time.perf_counter() - t0) / 4
    print(steps, f"{dt:.2f} s/batch of 128 -> {45000/128*dt:.0f} s per 45,000-image epoch", flush=True)
