"""Data sets: MNIST (IDX files) and CIFAR-10 (python batches or an image-folder tree).

Needs only the standard library and numpy (Pillow for image folders), so the device-side
benchmark can read test data without torch.  Arrays are uint8 NCHW in [0, 255] with int64 labels;
scaling to the model's range happens in the model graph or the trainer.

Where the data come from, in order:

1. the folder the caller names (``data_dir``; the CLI's ``--data-dir``), else
2. ``$DAFAR_DATA_DIR``, else
3. for MNIST only, the copy vendored in the package (so the main job runs offline).

When files are missing from a named folder the loader downloads them from the canonical source
(unless ``download=False`` or ``$DAFAR_OFFLINE=1``), verifies them, and otherwise raises
:class:`~dafar.errors.DataNotFoundError` saying which files to put where.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from dafar.errors import ConfigError, DataCorruptError, DataError, DataNotFoundError
from dafar.manifest import umask_mode

__all__ = [
    "DatasetName",
    "ImageSet",
    "Splits",
    "load_dataset",
    "load_mnist",
    "load_cifar10",
    "split_train_val",
    "load_image_folder_splits",
    "VENDORED_MNIST",
    "MNIST_CLASSES",
    "CIFAR10_CLASSES",
]


class DatasetName(str, Enum):
    MNIST = "mnist"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"  # a user's own train/<class>/*, test/<class>/* tree (dafar.imagefolder)


MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

VENDORED_MNIST = Path(__file__).resolve().parent / "assets" / "mnist"

# SHA-256 of the *decompressed* canonical IDX files: the .gz wrappers differ between copies
# (different gzip headers), the content does not.  Verified against ../shared/data/README.md.
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", (60000, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", (60000,)),
    "test_images": ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", (10000, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", (10000,)),
}
# Canonical host first; the second is the long-standing mirror of the same files.
MNIST_URLS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp"}
DOWNLOAD_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8, N x C x H x W) with their labels (int64, N)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 NCHW, got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray | slice) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx])

    def sample(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A fixed, class-mixed subset of ``n`` images (all of them for ``None`` or ``n >= len``).

        Never the first ``n``: an image-folder CIFAR-10 is read class by class, so its first 1,000
        test images are all airplanes.  A seeded random subset, kept in file order, is the same
        on every call and every machine."""
        if n is None or n >= len(self):
            return self
        return self.subset(sample_index(len(self), n, seed))


def sample_index(total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed, seeded random ``n`` of ``total`` items (all of them for ``None``
    or ``n >= total``): the draw behind :meth:`ImageSet.sample` and the trainer's per-epoch monitor,
    the same on every call and every machine."""
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng([seed, 0x5A3]).permutation(total)[:n])


@dataclass(frozen=True)
class Splits:
    """A data set with its validation split carved from the training set (never from test)."""

    name: DatasetName
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    source: str  # where the files were read from, for the manifest
    fingerprint: str  # sha256 over the content, for the manifest
    # measured per-channel mean / std of pixels / 255 on the training split (image folders); None:
    # the paper's fixed 0.5 / 0.5 (MNIST, CIFAR-10)
    normalization: dict | None = None
    # how files became pixels (image folders): size, channels, resize, interpolation, skipped and
    # ignored files, where validation came from
    preprocess: dict | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train.images.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# helpers


def _offline() -> bool:
    return os.environ.get("DAFAR_OFFLINE", "").strip() not in ("", "0", "false", "no")


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (temporary name, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(tmp, "wb") as out:
        shutil.copyfileobj(resp, out)
    os.replace(tmp, dest)


def _read_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataCorruptError(f"cannot read {path}: {exc} (truncated or not a gzip/IDX file?)") from exc


def _parse_idx(raw: bytes, path: Path, expect_shape: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking magic, dims and length."""
    ndim = len(expect_shape)
    if len(raw) < 4 + 4 * ndim:
        raise DataCorruptError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DataCorruptError(
            f"{path}: IDX magic {magic:#06x}, expected {0x0800 + ndim:#06x} (unsigned bytes, {ndim}-D)"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims != expect_shape:
        raise DataCorruptError(f"{path}: IDX shape {dims}, expected {expect_shape}")
    body = raw[4 + 4 * ndim:]
    n = int(np.prod(dims))
    if len(body) != n:
        raise DataCorruptError(f"{path}: {len(body)} data bytes, expected {n} (truncated file?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def split_train_val(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx) permutation split of ``n_train`` training images."""
    if not 0 < val_size < n_train:
        raise ConfigError(f"val_size must be in 1..{n_train - 1}, got {val_size}")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("DAFAR_DATA_DIR")
    return Path(env).expanduser() if env else None


# --------------------------------------------------------------------------------------------
# MNIST


def _find_mnist_dir(root: Path) -> Path:
    """The folder that holds the IDX files: ``root``, ``root/mnist`` or ``root/MNIST/raw``."""
    for cand in (root, root / "mnist", root / "MNIST" / "raw", root / "MNIST"):
        if any((cand / (base + ext)).exists() for base, _, _ in MNIST_FILES.values() for ext in ("", ".gz")):
            return cand
    return root


def _missing_mnist(folder: Path) -> list[str]:
    return [base for base, _, _ in MNIST_FILES.values()
            if not (folder / base).exists() and not (folder / (base + ".gz")).exists()]


def load_mnist_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Read and verify the four MNIST IDX files (raw or .gz) in ``folder``."""
    out = {}
    missing = _missing_mnist(folder)
    if missing:
        raise DataNotFoundError(
            f"MNIST files missing in {folder}: {', '.join(m + '[.gz]' for m in missing)}. "
            f"Put the four canonical IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; .gz or raw) in that folder."
        )
    for key, (base, sha, shape) in MNIST_FILES.items():
        path = folder / base if (folder / base).exists() else folder / (base + ".gz")
        raw = _read_maybe_gz(path)
        arr = _parse_idx(raw, path, shape)
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha:
            raise DataCorruptError(
                f"{path}: content sha256 {digest[:16]}... differs from canonical MNIST {sha[:16]}... "
                "(the decompressed IDX content is verified, not the .gz wrapper)"
            )
        out[key] = arr
    return out


def _download_mnist(folder: Path) -> None:
    errors = []
    for base in _missing_mnist(folder):
        for url in MNIST_URLS:
            try:
                _download(url + base + ".gz", folder / (base + ".gz"))
                break
            except Exception as exc:  # network errors come in many types
                errors.append(f"{url}{base}.gz: {exc}")
        else:
            raise DataNotFoundError(
                f"MNIST file {base}.gz is missing in {folder} and could not be downloaded "
                f"({'; '.join(errors)}). Copy the four canonical MNIST files into {folder}."
            )


def load_mnist(data_dir=None, *, download: bool = True, val_size: int = 5000, seed: int = 0) -> Splits:
    """MNIST with a validation split carved from the 60,000 training images."""
    root = _resolve_dir(data_dir)
    if root is None:
        folder = VENDORED_MNIST
        source = "vendored (dafar/assets/mnist)"
        if _missing_mnist(folder):  # an installed package: the data set stays in the repository
            folder = _cache_dir() / "mnist"
            source = str(folder)
            if _missing_mnist(folder) and download and not _offline():
                folder.mkdir(parents=True, exist_ok=True)
                _download_mnist(folder)
    else:
        folder = _find_mnist_dir(root)
        source = str(folder)
        if _missing_mnist(folder) and download and not _offline():
            _download_mnist(folder)
    arrays = load_mnist_arrays(folder)
    tr_idx, va_idx = split_train_val(60000, val_size, seed)
    images = arrays["train_images"][:, None]
    labels = arrays["train_labels"].astype(np.int64)
    train = ImageSet(images, labels)
    test = ImageSet(arrays["test_images"][:, None], arrays["test_labels"].astype(np.int64))
    return Splits(
        DatasetName.MNIST, train.subset(tr_idx), train.subset(va_idx), test, MNIST_CLASSES, source,
        _fingerprint(train.images, train.labels, test.images, test.labels),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 python batches that refuses every global but numpy's array rebuild.

    The batches are pickles; a tampered one must not be able to run code on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data file")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise DataCorruptError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataCorruptError(f"{path}: data of shape {data.shape} with {labels.shape[0]} labels, expected N x 3072")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataCorruptError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_cifar_batches(folder: Path, verify: bool = True) -> tuple[ImageSet, ImageSet]:
    missing = [n for n in CIFAR10_BATCH_MD5 if not (folder / n).exists()]
    if missing:
        raise DataNotFoundError(f"CIFAR-10 batches missing in {folder}: {', '.join(missing)}")
    if verify:
        for name, md5 in CIFAR10_BATCH_MD5.items():
            got = _md5(folder / name)
            if got != md5:
                raise DataCorruptError(f"{folder / name}: md5 {got} differs from canonical CIFAR-10 {md5}")
    parts = [_load_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    x, y = _load_cifar_batch(folder / "test_batch")
    return train, ImageSet(x, y)


def _safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract a tarball into ``dest`` atomically; refuses links and paths leaving ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    os.chmod(tmp, umask_mode(directory=True))  # (mkdtemp makes it 0700)
    try:
        with tarfile.open(tar_path) as tf:
            tf.extractall(tmp, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataCorruptError(f"cannot extract {tar_path}: {exc}") from exc


def _cache_dir() -> Path:
    env = os.environ.get("DAFAR_CACHE_DIR")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dafar"
    return base


def _image_folder_root(folder: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` class trees, if ``folder`` is (or wraps) one."""
    for cand in [folder] + sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    return None


def _list_images(root: Path, split: str, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    base = root / split
    present = {p.name for p in base.iterdir() if p.is_dir()}
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataCorruptError(
            f"image folder {base} lacks class folders: {', '.join(missing)} "
            f"(expected one folder per class: {', '.join(classes)})"
        )
    items = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (base / cls).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataCorruptError(f"class folder {base / cls} holds no images")
        items += [(p, label) for p in files]
    return items


def _decode_images(items: list[tuple[Path, int]], shape: tuple[int, int, int], desc: str) -> ImageSet:
    try:
        from PIL import Image
    except ImportError as exc:
        from dafar.errors import MissingExtraError

        raise MissingExtraError("reading an image-folder data set needs Pillow: pip install 'dafar[images]'") from exc
    c, h, w = shape
    mode = "L" if c == 1 else "RGB"
    out = np.empty((len(items), h, w, c), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    from dafar.progress import progress

    for i, (path, label) in enumerate(progress(items, desc=desc, unit="img", mininterval=2.0, leave=False)):
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert(mode))
        except Exception as exc:  # PIL raises many types for bad files
            raise DataCorruptError(f"cannot decode image {path}: {exc}") from exc
        if arr.shape[:2] != (h, w):
            raise DataCorruptError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}, expected {w}x{h}")
        out[i] = arr.reshape(h, w, c)
        labels[i] = label
    return ImageSet(np.ascontiguousarray(out.transpose(0, 3, 1, 2)), labels)


def _load_image_folder(root: Path, classes: tuple[str, ...], shape: tuple[int, int, int]) -> tuple[ImageSet, ImageSet]:
    """Decode ``root/{train,test}/<class>/*``, caching the arrays (keyed by the file listing)."""
    lists = {s: _list_images(root, s, classes) for s in ("train", "test")}
    key = hashlib.sha256()
    for s, items in lists.items():
        for p, label in items:
            st = p.stat()
            key.update(f"{s}/{p.relative_to(root)}:{label}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    cache = _cache_dir() / "decoded" / f"{key.hexdigest()[:24]}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return (ImageSet(z["train_x"], z["train_y"]), ImageSet(z["test_x"], z["test_y"]))
        except Exception:
            cache.unlink(missing_ok=True)  # a broken cache is rebuilt, never trusted
    train = _decode_images(lists["train"], shape, "decode train")
    test = _decode_images(lists["test"], shape, "decode test")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".part.npz")
        np.savez(tmp, train_x=train.images, train_y=train.labels, test_x=test.images, test_y=test.labels)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the decode time next run
    return train, test


def _load_cifar_archive(tar: Path) -> tuple[ImageSet, ImageSet, str]:
    """The canonical ``cifar-10-python.tar.gz`` (md5-checked) or a ``.tar.gz`` of an image-folder
    tree, extracted once into the cache."""
    if tar.name == "cifar-10-python.tar.gz":
        if _md5(tar) != CIFAR10_TAR_MD5:
            raise DataCorruptError(f"{tar}: md5 differs from the canonical cifar-10-python.tar.gz ({CIFAR10_TAR_MD5})")
        dest = _cache_dir() / "cifar-10-python"
        if not (dest / "cifar-10-batches-py" / "test_batch").exists():
            _safe_extract(tar, dest)
        train, test = _load_cifar_batches(dest / "cifar-10-batches-py")
        return train, test, str(tar)
    st = tar.stat()
    dest = _cache_dir() / "extracted" / f"{tar.name.split('.')[0]}-{st.st_size}-{int(st.st_mtime)}"
    if _image_folder_root(dest) is None:
        _safe_extract(tar, dest)
    tree = _image_folder_root(dest)
    if tree is None:
        raise DataCorruptError(f"{tar} holds no train/<class>/ and test/<class>/ image trees")
    train, test = _load_image_folder(tree, CIFAR10_CLASSES, (3, 32, 32))
    return train, test, str(tar)


def load_cifar10(data_dir=None, *, download: bool = True, val_size: int = 5000, seed: int = 0) -> Splits:
    """CIFAR-10 from a folder holding any of: ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz``,
    an image-folder tree (``train/<class>/*``, ``test/<class>/*``), or a ``*.tar.gz`` of such a tree
    (extracted once into ``$DAFAR_CACHE_DIR``, default ``~/.cache/dafar``)."""
    root = _resolve_dir(data_dir)
    if root is None:
        raise DataNotFoundError(
            "CIFAR-10 needs a data folder: pass --data-dir DIR (or set DAFAR_DATA_DIR) pointing at a folder "
            "with cifar-10-batches-py/, cifar-10-python.tar.gz, or train/<class>/ and test/<class>/ image trees"
        )
    if root.is_file():  # --data-dir naming the archive itself (manifests record it that way too)
        if not root.name.endswith((".tar.gz", ".tgz")):
            raise DataCorruptError(f"{root} is a file, not a folder or a .tar.gz archive of CIFAR-10")
        train, test, source = _load_cifar_archive(root)
        return _cifar_splits(train, test, source, val_size, seed)
    if root.is_dir() and (root / "cifar10").is_dir() and not (root / "train").is_dir():
        root = root / "cifar10"
    train = test = None
    source = ""
    if (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").exists():
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        train, test = _load_cifar_batches(folder)
        source = str(folder)
    elif (root / "cifar-10-python.tar.gz").exists():
        train, test, source = _load_cifar_archive(root / "cifar-10-python.tar.gz")
    elif root.is_dir() and _image_folder_root(root) is not None:
        tree = _image_folder_root(root)
        train, test = _load_image_folder(tree, CIFAR10_CLASSES, (3, 32, 32))
        source = str(tree)
    elif root.is_dir() and (tars := sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))):
        train, test, source = _load_cifar_archive(tars[0])
    else:
        if download and not _offline():
            tar = root / "cifar-10-python.tar.gz"
            try:
                _download(CIFAR10_URL, tar)
            except Exception as exc:
                raise DataNotFoundError(
                    f"no CIFAR-10 in {root} and the download from {CIFAR10_URL} failed ({exc}). Put "
                    f"cifar-10-python.tar.gz, cifar-10-batches-py/, or train/<class>/ + test/<class>/ image "
                    f"folders (classes: {', '.join(CIFAR10_CLASSES)}) in {root}"
                ) from exc
            return load_cifar10(root, download=False, val_size=val_size, seed=seed)
        raise DataNotFoundError(
            f"no CIFAR-10 in {root}: put cifar-10-python.tar.gz, cifar-10-batches-py/, or train/<class>/ + "
            f"test/<class>/ image folders (classes: {', '.join(CIFAR10_CLASSES)}) there"
        )
    return _cifar_splits(train, test, source, val_size, seed)


def _cifar_splits(train: ImageSet, test: ImageSet, source: str, val_size: int, seed: int) -> Splits:
    if len(train) < 2:
        raise DataCorruptError(f"CIFAR-10 training set in {source} holds {len(train)} images")
    tr_idx, va_idx = split_train_val(len(train), min(val_size, len(train) - 1), seed)
    return Splits(
        DatasetName.CIFAR10, train.subset(tr_idx), train.subset(va_idx), test, CIFAR10_CLASSES, source,
        _fingerprint(train.images, train.labels, test.images, test.labels),
    )


def load_image_folder_splits(data_dir, *, image_size=None, channels=None, skip_bad: bool = False,
                             val_size: int | None = None, seed: int = 0) -> Splits:
    """A user's image folder (:mod:`dafar.imagefolder`) as :class:`Splits`, its arrays memory-mapped."""
    from dafar.imagefolder import FolderOptions, load_image_folder

    root = _resolve_dir(data_dir)
    if root is None:
        raise DataNotFoundError("an image-folder data set needs --data-dir DIR holding train/<class>/* and "
                                "test/<class>/* (val/<class>/* optional)")
    arrays, meta = load_image_folder(root, FolderOptions(image_size, channels, skip_bad, val_size, seed))
    sets = {s: ImageSet(x, y) for s, (x, y) in arrays.items()}
    c, h, w = int(meta["channels"]), *(int(v) for v in meta["image_size"])
    pre = {"image_size": [h, w], "channels": c, "resize": bool(meta["resize"]), "interpolation": meta["interpolation"],
           "skipped_images": meta["skipped"], "ignored_non_image_files": meta["ignored_non_images"],
           "val_from": meta["val_from"]}
    return Splits(DatasetName.IMAGEFOLDER, sets["train"], sets["val"], sets["test"], tuple(meta["classes"]),
                  str(Path(meta["root"]).resolve()), meta["fingerprint"],
                  normalization={"mean": meta["mean"], "std": meta["std"]}, preprocess=pre)


def load_dataset(name: DatasetName | str, data_dir=None, *, download: bool = True,
                 val_size: int | None = None, seed: int = 0, image_size=None, channels: int | None = None,
                 skip_bad_images: bool = False) -> Splits:
    """Load MNIST, CIFAR-10 or an image folder by name (see the module docstring for where from).
    ``image_size``, ``channels`` and ``skip_bad_images`` apply to image folders; ``val_size=None``
    there carves 10% of the training images (class-stratified) when no ``val/`` folder exists."""
    try:
        name = DatasetName(name)
    except ValueError:
        raise ConfigError(f"unknown data set {name!r}; choose one of: {', '.join(d.value for d in DatasetName)}") from None
    if name is DatasetName.IMAGEFOLDER:
        return load_image_folder_splits(data_dir, image_size=image_size, channels=channels, skip_bad=skip_bad_images,
                                        val_size=val_size, seed=seed)
    if image_size is not None or channels is not None or skip_bad_images:
        raise ConfigError(f"--image-size, --channels and --skip-bad-images apply to image folders, not {name.value} "
                          "(use --dataset imagefolder for your own images)")
    loader = load_mnist if name is DatasetName.MNIST else load_cifar10
    return loader(data_dir, download=download, val_size=5000 if val_size is None else val_size, seed=seed)
