"""A user's own images: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``DIR/val/<class>/*``
optional), any number of classes >= 2, any size, grayscale or RGB, PNG / JPEG / BMP / WebP.

The images are decoded once into a uint8 cache on disk (``$DAFAR_CACHE_DIR/imagefolder/<key>/``:
one raw N x C x H x W file per split, memory-mapped on every later load and verified by sha256),
so a data set larger than memory trains without holding it: a batch reads only its rows.  The
cache key names every file (path, size, modification time), the class list and the options, so
an added, removed or edited image builds a new cache instead of reusing a stale one.

How an image file becomes pixels (the same function serves training and ``dafar predict``, and
README gives the recipe for a camera frame): Pillow decodes it, converts it to ``L`` (1 channel)
or ``RGB`` (3), and, when an image size is set, resizes it to W x H with bilinear interpolation
(``Image.BILINEAR``) unless it already has that size.  Animated files give their first frame.

Bad data gets an error naming the file, and nothing is half-written: an unreadable or truncated
image (or, with ``skip_bad=True``, a record of which were skipped), class folders that differ
between splits, an empty class, a single class, mixed sizes without an image size, a symbolic
link that leaves the data folder.  Files that are not images by their suffix are counted and
never decoded.

numpy and Pillow (the ``[images]`` extra) only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, DataCorruptError, DataError, DataNotFoundError, MissingExtraError
from dafar.manifest import umask_mode

__all__ = ["IMAGE_SUFFIXES", "INTERPOLATION", "FolderOptions", "read_image", "load_image_folder", "parse_image_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm")
INTERPOLATION = "bilinear"  # Pillow's Image.BILINEAR, applied to the uint8 image after its L/RGB conversion
_CACHE_VERSION = 1


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MissingExtraError("reading image files needs Pillow: pip install 'dafar[images]'") from None
    env = os.environ.get("DAFAR_MAX_IMAGE_PIXELS")
    if env:  # Pillow refuses images above twice this many pixels (decompression bombs)
        try:
            Image.MAX_IMAGE_PIXELS = int(env)
        except ValueError:
            raise ConfigError(f"DAFAR_MAX_IMAGE_PIXELS must be an integer, got {env!r}") from None
    return Image


def parse_image_size(text) -> tuple[int, int]:
    """``"64"`` -> (64, 64); ``"48x64"`` -> (48, 64) (height x width)."""
    try:
        if isinstance(text, (tuple, list)):
            parts = [int(v) for v in text]
        else:
            parts = [int(v) for v in str(text).lower().replace(" ", "").split("x")]
    except (TypeError, ValueError):
        raise ConfigError(f"an image size is H or HxW (e.g. 64 or 48x64), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(1 <= v <= 4096 for v in parts):
        raise ConfigError(f"an image size is H or HxW with sides in 1..4096, got {text!r}")
    return parts[0], parts[1]


def read_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image file as uint8 H x W x C (see the module docstring for how); errors name the file."""
    Image = _pil()
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.seek(0)  # animated files: the first frame
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataCorruptError(f"{p}: {exc} (Pillow's decompression-bomb limit; set DAFAR_MAX_IMAGE_PIXELS to "
                               "raise it)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's many ways of saying "not readable"
        raise DataCorruptError(f"{p}: not a readable image ({type(exc).__name__}: {exc})") from None
    return arr if arr.ndim == 3 else arr[:, :, None]


@dataclass(frozen=True)
class FolderOptions:
    """How a folder's images become the model's input, and how validation is carved."""

    image_size: tuple[int, int] | None = None  # (H, W) to resize to; None: every image must have one size
    channels: int | None = None  # 1 or 3; None: 1 when every image is grayscale, else 3
    skip_bad: bool = False  # skip unreadable images (recorded) instead of failing
    val_size: int | None = None  # images carved from train when there is no val/ folder; None: 10%
    seed: int = 0

    def __post_init__(self):
        if self.image_size is not None:
            object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels!r}")


@dataclass
class _Listing:
    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # split -> [(path, label)]
    ignored: dict[str, int] = field(default_factory=dict)  # split -> files that are not images (never decoded)


def _within(root: Path, p: Path) -> bool:
    try:
        p.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _list(root: Path) -> _Listing:
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist")
    real = root.resolve()
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        raise DataNotFoundError(f"image folder {root} has no {' and no '.join(s + '/' for s in missing)} folder: it must "
                                "hold train/<class>/* and test/<class>/* (val/<class>/* optional)")
    per_split: dict[str, list[str]] = {}
    for s in splits:
        d = root / s
        if not _within(real, d):
            raise DataError(f"{d} is a symbolic link that leaves the data folder {root}; refusing to read it")
        per_split[s] = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        odd = [n for n in per_split[s] if any(ch in n for ch in "\r\n")]
        if odd:
            raise DataError(f"class folder name {odd[0]!r} in {d} holds a line break; class names go one per line "
                            "into labels.txt")
    classes = tuple(per_split["train"])
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} holds {len(classes)} class folder{'s' if len(classes) != 1 else ''}"
                        f"{' (' + classes[0] + ')' if classes else ''}: a classifier needs at least 2")
    for s in splits:
        if s != "train" and tuple(per_split[s]) != classes:
            only_train = sorted(set(classes) - set(per_split[s]))
            only_s = sorted(set(per_split[s]) - set(classes))
            parts = ([f"only in train/: {', '.join(only_train)}"] if only_train else []) + \
                    ([f"only in {s}/: {', '.join(only_s)}"] if only_s else [])
            raise DataError(f"class folders of {root / s} differ from {root / 'train'} ({'; '.join(parts)})")
    files: dict[str, list] = {}
    ignored: dict[str, int] = {}
    for s in splits:
        items, n_ignored = [], 0
        for label, cls in enumerate(classes):
            d = root / s / cls
            if not _within(real, d):
                raise DataError(f"{d} is a symbolic link that leaves the data folder {root}; refusing to read it")
            found = 0
            for p in sorted(d.iterdir()):
                if p.name.startswith(".") or p.is_dir():
                    continue
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    n_ignored += 1
                    continue
                if not _within(real, p):
                    raise DataError(f"{p} is a symbolic link that leaves the data folder {root}; refusing to read it")
                items.append((p, label))
                found += 1
            if not found:
                raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files[s], ignored[s] = items, n_ignored
    return _Listing(root, classes, files, ignored)


def _headers(listing: _Listing) -> tuple[dict, dict]:
    """(size (W, H) -> count, mode -> count) over every image, from the file headers (no decoding);
    an unreadable header is a bad file, judged in the decode pass."""
    Image = _pil()
    sizes: dict = {}
    modes: dict = {}
    example: dict = {}
    for items in listing.files.values():
        for p, _ in items:
            try:
                with Image.open(p) as im:
                    sizes[im.size] = sizes.get(im.size, 0) + 1
                    example.setdefault(im.size, p)
                    modes[im.mode] = modes.get(im.mode, 0) + 1
            except Exception:  # noqa: BLE001 - reported with its name when it is decoded
                continue
    return {k: (v, example[k]) for k, v in sizes.items()}, modes


_GRAY = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"}


def _key(listing: _Listing, opts: FolderOptions, size, channels) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "classes": listing.classes, "size": size, "channels": channels,
                         "interp": INTERPOLATION, "skip_bad": opts.skip_bad, "val_size": opts.val_size,
                         "seed": opts.seed}, sort_keys=True).encode())
    for s, items in listing.files.items():
        for p, label in items:
            st = p.stat()
            h.update(f"{s}/{p.relative_to(listing.root)}:{label}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _stratified_val(labels: np.ndarray, val_size: int | None, seed: int) -> np.ndarray:
    """Indices of a class-stratified, seeded validation subset of the training images."""
    n = len(labels)
    want = int(round(0.1 * n)) if val_size is None else int(val_size)
    if not 0 < want < n:
        raise ConfigError(f"the validation split needs between 1 and {n - 1} of the {n} training images, got {want}")
    rng = np.random.default_rng([seed, 0x7A1])
    out = []
    classes = np.unique(labels)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        k = int(round(want * len(idx) / n))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)
        out.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(out))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_root() -> Path:
    env = os.environ.get("DAFAR_CACHE_DIR")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dafar"
    return base / "imagefolder"


def _open_cache(folder: Path) -> dict | None:
    """The cache's arrays, memory-mapped read-only, after checking every file's sha256; None when
    it is missing or does not verify (it is then rebuilt, never trusted)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        out = {"meta": meta}
        with np.load(folder / "labels.npz", allow_pickle=False) as z:
            labels = {k: z[k] for k in z.files}
        for s, shape in meta["shapes"].items():
            path = folder / f"{s}.u8"
            if path.stat().st_size != int(np.prod(shape)) or _sha256_file(path) != meta["sha256"][s]:
                return None
            out[s] = (np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(shape)), labels[s])
        return out
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def load_image_folder(root: str | os.PathLike, opts: FolderOptions = FolderOptions(), *, log=None):
    """The splits of an image folder (see the module docstring).  Returns
    ``(arrays, meta)`` where ``arrays[split] = (uint8 N x C x H x W memmap, int64 labels)`` for
    ``train``, ``val`` and ``test``, and ``meta`` records classes, size, channels, the per-channel
    mean and std of the training split (of pixels / 255), skipped and ignored files, the source's
    fingerprint and where the validation images came from."""
    root = Path(root).expanduser()
    listing = _list(root)
    sizes, modes = _headers(listing)
    size = opts.image_size
    if size is None:
        if len(sizes) > 1:
            common = sorted(sizes.items(), key=lambda kv: -kv[1][0])
            (w0, h0), (n0, p0) = common[0]
            (w1, h1), (_, p1) = common[1]
            raise DataError(f"images of mixed sizes in {root} ({len(sizes)} sizes: {p0} is {w0}x{h0} like {n0} others, "
                            f"{p1} is {w1}x{h1}); pass --image-size HxW to resize them all (bilinear)")
        if not sizes:
            raise DataCorruptError(f"no readable image in {root}")
        (w, h), _ = next(iter(sizes.items()))
        size = (h, w)
    channels = opts.channels or (1 if modes and set(modes) <= _GRAY else 3)
    folder = _cache_root() / _key(listing, opts, size, channels)
    cached = _open_cache(folder)
    if cached is not None:
        return {s: v for s, v in cached.items() if s != "meta"}, cached["meta"]
    return _build(listing, opts, size, channels, folder, log)


def _decode_split(items, size, channels, out_path: Path, skip_bad: bool, desc: str):
    """Decode ``items`` into a raw N x C x H x W file; returns (kept labels, skipped [(path, why)])."""
    h, w = size
    arr = np.memmap(out_path, dtype=np.uint8, mode="w+", shape=(len(items), channels, h, w))
    labels, skipped = [], []
    from dafar.progress import progress

    n = 0
    for p, label in progress(items, desc=desc, unit="img", mininterval=2.0, leave=False):
        try:
            img = read_image(p, channels, size)
        except DataCorruptError as exc:
            if not skip_bad:
                raise
            skipped.append((str(p), str(exc).split(": ", 1)[-1]))
            continue
        arr[n] = img.transpose(2, 0, 1)
        labels.append(label)
        n += 1
    arr.flush()
    del arr
    if n == 0:
        raise DataCorruptError(f"no readable image among the {len(items)} files of {out_path.stem}/ "
                               f"(first: {skipped[0][0] if skipped else '?'})")
    if n < len(items):  # skipped images: shrink the file to the rows kept
        with open(out_path, "r+b") as f:
            f.truncate(n * channels * h * w)
    return np.asarray(labels, dtype=np.int64), skipped


def _build(listing: _Listing, opts: FolderOptions, size, channels, folder: Path, log):
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    os.chmod(tmp, umask_mode(directory=True))  # (mkdtemp makes it 0700)
    h, w = size
    try:
        labels, skipped = {}, []
        for s, items in listing.files.items():
            labels[s], bad = _decode_split(items, size, channels, tmp / f"{s}.u8", opts.skip_bad, f"decode {s}")
            skipped += bad
        raw = {s: np.memmap(tmp / f"{s}.u8", dtype=np.uint8, mode="r", shape=(len(labels[s]), channels, h, w))
               for s in labels}
        # every pass over the decoded data goes in chunks of at most ~64 MiB, whatever the image
        # size, so building the cache of a 224 px folder needs no more memory than a 32 px one
        rows = max(1, (64 << 20) // (channels * h * w))
        fp = hashlib.sha256()
        for s in ("train", "test"):
            fp.update(f"{s}:{raw[s].shape}".encode())
            for i in range(0, len(raw[s]), rows):
                fp.update(np.ascontiguousarray(raw[s][i: i + rows]).tobytes())
            fp.update(labels[s].tobytes())
        if "val" in labels:
            val_from = "val/ folder"
        else:  # carve a stratified validation split from train, rows copied into their own files
            vidx = _stratified_val(labels["train"], opts.val_size, opts.seed)
            keep = np.setdiff1d(np.arange(len(labels["train"])), vidx)
            for name, idx in (("val", vidx), ("train.split", keep)):
                out = np.memmap(tmp / f"{name}.u8", dtype=np.uint8, mode="w+", shape=(len(idx), channels, h, w))
                for i in range(0, len(idx), rows):
                    out[i: i + rows] = raw["train"][idx[i: i + rows]]
                out.flush()
                del out
            labels["val"], labels["train"] = labels["train"][vidx], labels["train"][keep]
            del raw
            os.replace(tmp / "train.split.u8", tmp / "train.u8")
            val_from = (f"{len(vidx)} training images, class-stratified, seed {opts.seed}"
                        + ("" if opts.val_size else " (10%)"))
        shapes = {s: [int(len(labels[s])), channels, h, w] for s in labels}
        train = np.memmap(tmp / "train.u8", dtype=np.uint8, mode="r", shape=tuple(shapes["train"]))
        # per-channel mean and std of pixels / 255 over the training split (never val or test),
        # from exact integer sums of the uint8 pixels and of their squares (no float copy of a chunk)
        s1 = np.zeros(channels, dtype=np.uint64)
        s2 = np.zeros(channels, dtype=np.uint64)
        sq = (np.arange(256, dtype=np.uint32) ** 2).astype(np.uint32)
        for i in range(0, len(train), rows):
            x = np.asarray(train[i: i + rows])
            s1 += x.sum(axis=(0, 2, 3), dtype=np.uint64)
            s2 += sq[x].sum(axis=(0, 2, 3), dtype=np.uint64)
        count = float(len(train) * h * w)
        mean = s1.astype(np.float64) / count / 255.0
        std = np.sqrt(np.maximum(s2.astype(np.float64) / count / 65025.0 - mean * mean, 0.0))
        del train
        meta = {
            "version": _CACHE_VERSION, "root": str(listing.root), "classes": list(listing.classes),
            "image_size": [h, w], "channels": channels, "resize": opts.image_size is not None,
            "interpolation": INTERPOLATION if opts.image_size is not None else None,
            "mean": [float(v) for v in mean], "std": [float(max(v, 1e-3)) for v in std],
            "shapes": shapes, "sha256": {s: _sha256_file(tmp / f"{s}.u8") for s in shapes},
            "fingerprint": fp.hexdigest(), "val_from": val_from,
            "skipped": [{"file": f, "why": why} for f, why in skipped],
            "ignored_non_images": sum(listing.ignored.values()),
        }
        np.savez(tmp / "labels.npz", **labels)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"decoded {sum(v[0] for v in shapes.values())} images of {listing.root} into {folder}")
    cached = _open_cache(folder)
    if cached is None:
        raise DataCorruptError(f"the decoded cache {folder} does not verify right after it was written (disk full?)")
    return {s: v for s, v in cached.items() if s != "meta"}, cached["meta"]
