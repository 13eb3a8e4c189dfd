"""How an image folder larger than memory trains: decode time, cache load, batch throughput and
peak memory.

    python -m dafar.bench.perf.data_speed make CIFAR_TAR_OR_TREE OUT --size 96      # a 60,000-image folder
    python -m dafar.bench.perf.data_speed measure OUT --image-size 96 --steps 20 [--json r.json]

``make`` re-encodes an image-folder CIFAR-10 (the JPEG tarball in ``../shared/data``) at a larger
size (bilinear, JPEG quality 90) into OUT/{train,test}/<class>/, so the decoded data set is
several times the 32x32 one.  ``measure`` builds the decoded cache (timed), loads it again (the
memory-mapped, sha256-verified path every later run takes), then times batch gathering alone
and ``steps`` training steps of the mobile network on random batches of the training split, and
reports images per second and the process's peak resident memory (``ru_maxrss``) beside the
decoded data's size: the point is that the second stays far below the first.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["make_folder", "measure"]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _RssSampler:
    """Peak anonymous and file-backed resident memory, sampled from /proc/self/status.

    ``ru_maxrss`` counts the pages of a memory-mapped file that happen to be resident (RssFile):
    the kernel drops those under pressure, so they do not have to fit in RAM.  Anonymous memory
    (RssAnon: the heap, torch's tensors) is what must; the two are reported apart.
    """

    def __init__(self, every: float = 0.1):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.phases: dict[str, dict] = {}
        self._phase_anon = 0
        self._stop = threading.Event()
        self._every = every
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                k, _, v = line.partition(":")
                if k in self.peak:
                    self.peak[k] = max(self.peak[k], int(v.split()[0]))
                    if k == "RssAnon":
                        self._phase_anon = max(self._phase_anon, int(v.split()[0]))
        except OSError:  # not Linux: only ru_maxrss is reported
            pass

    def _run(self):
        while not self._stop.wait(self._every):
            self._sample()

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def end_phase(self, name: str) -> None:
        """Close a phase: its peak anonymous memory is recorded under ``name``."""
        self._sample()
        self.phases[name] = round(self._phase_anon / 1024.0, 1)
        self._phase_anon = 0

    def mib(self) -> dict:
        out = {f"peak_{k.lower()}_mib": v / 1024.0 for k, v in self.peak.items()}
        out["peak_rssanon_mib_by_phase"] = self.phases
        return out


def make_folder(src: str | Path, out: str | Path, size: int = 96, quality: int = 90) -> int:
    """Re-encode every image of an image-folder tree (or a .tar.gz of one) at ``size`` x ``size``."""
    from PIL import Image

    src, out = Path(src), Path(out)
    tmp = None
    if src.is_file():
        tmp = tempfile.TemporaryDirectory(prefix="dafar-make-")
        with tarfile.open(src) as tf:
            tf.extractall(tmp.name, filter="data")
        src = Path(tmp.name)
    roots = [p.parent for p in src.rglob("train") if p.is_dir() and (p.parent / "test").is_dir()]
    if not roots:
        raise SystemExit(f"no train/ and test/ trees under {src}")
    n = 0
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **k):
            return x
    files = sorted(p for p in roots[0].rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for p in tqdm(files, desc="re-encode", unit="img", mininterval=2.0):
        rel = p.relative_to(roots[0]).with_suffix(".jpg")
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im.convert("RGB").resize((size, size), Image.BILINEAR).save(dst, quality=quality)
        n += 1
    if tmp is not None:
        tmp.cleanup()
    return n


def measure(folder: str | Path, image_size: int = 96, steps: int = 20, batch_size: int = 64, threads: int = 2,
            width: float = 1.0) -> dict:
    import torch

    torch.set_num_threads(threads)
    r: dict = {"folder": str(folder), "image_size": image_size, "batch_size": batch_size, "threads": threads}
    sampler = _RssSampler()
    with sampler:
        _measure(r, folder, image_size, steps, batch_size, width, sampler)
    r.update(sampler.mib())
    r["peak_rss_mib"] = _peak_rss_mib()
    return r


def _measure(r, folder, image_size, steps, batch_size, width, sampler):
    import torch

    from dafar.data import load_dataset
    from dafar.train.models import build_dafar, decoder_output_for, l2_per_sample, paper_spec
    from dafar.train.trainer import to_model_scale

    t0 = time.perf_counter()
    splits = load_dataset("imagefolder", folder, image_size=(image_size, image_size))
    r["first_load_s"] = time.perf_counter() - t0  # decode + cache build (or load, when the cache exists)
    sampler.end_phase("first_load")
    del splits
    t0 = time.perf_counter()
    splits = load_dataset("imagefolder", folder, image_size=(image_size, image_size))
    r["cached_load_s"] = time.perf_counter() - t0  # the memory-mapped, sha256-verified cache
    sampler.end_phase("cached_load")
    x = splits.train.images
    r["images"] = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    r["decoded_mib"] = sum(s.images.nbytes for s in (splits.train, splits.val, splits.test)) / 2**20
    r["train_is_memmap"] = isinstance(x, np.memmap)
    rng = np.random.default_rng(0)
    gather = []
    for _ in range(steps):
        idx = rng.choice(len(x), batch_size, replace=False)
        t0 = time.perf_counter()
        to_model_scale(x[idx])
        gather.append(time.perf_counter() - t0)
    r["gather_images_per_s"] = batch_size / statistics.median(gather)
    r["gather_s_median"] = statistics.median(gather)
    sampler.end_phase("gather")
    norm = splits.normalization
    spec = paper_spec("mobile", splits.input_shape, len(splits.classes), decoder_output_for(norm["mean"], norm["std"]),
                      width)
    net = build_dafar(spec, with_detector=False, normalization=norm).train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    y_all = splits.train.labels
    times = []
    for i in range(steps + 2):
        idx = rng.choice(len(x), batch_size, replace=False)
        t0 = time.perf_counter()
        xb = to_model_scale(x[idx], net.norm)
        yb = torch.from_numpy(y_all[idx])
        logits, recon = net(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb) + 0.25 * l2_per_sample(xb - recon).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # burn-in
            times.append(time.perf_counter() - t0)
    r["train_step_s_median"] = statistics.median(times)
    r["train_step_s_p90"] = float(np.percentile(times, 90))
    sampler.end_phase("train_steps")
    r["train_images_per_s"] = batch_size / r["train_step_s_median"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dafar.bench.perf.data_speed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("src")
    m.add_argument("out")
    m.add_argument("--size", type=int, default=96)
    q = sub.add_parser("measure")
    q.add_argument("folder")
    q.add_argument("--image-size", type=int, default=96)
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--width", type=float, default=1.0)
    q.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.cmd == "make":
        print(f"wrote {make_folder(a.src, a.out, a.size)} images into {a.out}")
        return 0
    r = measure(a.folder, a.image_size, a.steps, a.batch_size, a.threads, a.width)
    text = json.dumps(r, indent=2)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
