import gzip
import pickle
import shutil

import numpy as np
import pytest
from conftest import make_image_folder, write_idx

from dafar.data import (
    CIFAR10_CLASSES,
    VENDORED_MNIST,
    _load_cifar_batches,
    load_cifar10,
    load_dataset,
    load_mnist,
    split_train_val,
)
from dafar.errors import ConfigError, DataCorruptError, DataNotFoundError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def vendored():
    return load_mnist(None, val_size=5000, seed=0)


def test_vendored_mnist_is_canonical(vendored):
    s = vendored
    assert s.train.images.shape == (55000, 1, 28, 28) and s.val.images.shape == (5000, 1, 28, 28)
    assert s.test.images.shape == (10000, 1, 28, 28) and s.test.images.dtype == np.uint8
    counts = np.bincount(np.concatenate([s.train.labels, s.val.labels]), minlength=10)
    assert counts.tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(s.test.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert s.source.startswith("vendored")


def test_validation_split_comes_from_train_and_is_deterministic():
    tr, va = split_train_val(60000, 5000, seed=3)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 60000
    tr2, va2 = split_train_val(60000, 5000, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_train_val(60000, 5000, seed=4)[1])
    with pytest.raises(ConfigError):
        split_train_val(100, 100, 0)


def test_val_images_are_training_images_not_test(vendored):
    # every validation image must come from the training file (none from t10k)
    full = load_mnist(None, val_size=2, seed=0)
    train_rows = {r.tobytes() for r in np.concatenate([full.train.images, full.val.images])[:, 0].reshape(60000, -1)}
    assert all(v.tobytes() in train_rows for v in vendored.val.images[:200, 0].reshape(200, -1))


def test_shared_mnist_matches_vendored(shared_mnist, vendored):
    s = load_mnist(shared_mnist.parent, download=False)  # the folder that holds mnist/
    assert s.fingerprint == vendored.fingerprint
    assert s.source.endswith("mnist")


def test_raw_idx_files_accepted(tmp_path, vendored):
    for f in VENDORED_MNIST.glob("*.gz"):
        (tmp_path / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    s = load_mnist(tmp_path, download=False)
    assert s.fingerprint == vendored.fingerprint


def _copy_mnist(dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in VENDORED_MNIST.glob("*.gz"):
        shutil.copy(f, dst / f.name)
    return dst


def test_missing_mnist_file_names_it(tmp_path):
    d = _copy_mnist(tmp_path / "m")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(d, download=False)


def test_offline_env_blocks_download(tmp_path):
    # DAFAR_OFFLINE=1 is set by conftest: an empty folder must fail fast with instructions
    with pytest.raises(DataNotFoundError, match="Put the four canonical IDX files"):
        load_mnist(tmp_path / "empty")


def test_truncated_gzip_is_refused(tmp_path):
    d = _copy_mnist(tmp_path / "m")
    p = d / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataCorruptError, match="train-labels-idx1-ubyte"):
        load_mnist(d, download=False)


def test_wrong_magic_and_shape_and_content(tmp_path):
    d = _copy_mnist(tmp_path / "m")
    p = d / "t10k-labels-idx1-ubyte.gz"
    labels = np.frombuffer(gzip.decompress(p.read_bytes()), np.uint8, offset=8)
    p.unlink()
    write_idx(d / "t10k-labels-idx1-ubyte", labels, magic=0x0803)
    with pytest.raises(DataCorruptError, match="magic"):
        load_mnist(d, download=False)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(d / "t10k-labels-idx1-ubyte", labels[:9999])
    with pytest.raises(DataCorruptError, match=r"shape \(9999,\)"):
        load_mnist(d, download=False)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    tampered = labels.copy()
    tampered[0] = (tampered[0] + 1) % 10  # valid IDX, wrong content: caught by the content hash
    write_idx(d / "t10k-labels-idx1-ubyte", tampered)
    with pytest.raises(DataCorruptError, match="content sha256"):
        load_mnist(d, download=False)


def test_truncated_idx_body(tmp_path):
    d = _copy_mnist(tmp_path / "m")
    p = d / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataCorruptError, match="truncated"):
        load_mnist(d, download=False)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown data set"):
        load_dataset("imagenet")


def test_cifar_needs_a_folder():
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        load_cifar10(None)


def test_cifar_empty_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path)


def test_cifar_image_folder_tree(tmp_path):
    root = make_image_folder(tmp_path / "tree", CIFAR10_CLASSES, per_class=3)
    s = load_cifar10(root, val_size=5)
    assert s.train.images.shape == (25, 3, 32, 32) and s.val.images.shape == (5, 3, 32, 32)
    assert s.test.images.shape == (30, 3, 32, 32)
    assert sorted(np.bincount(s.test.labels).tolist()) == [3] * 10
    assert s.classes == CIFAR10_CLASSES
    # cached decode gives the same arrays
    assert load_cifar10(root, val_size=5).fingerprint == s.fingerprint


def test_cifar_archive_by_folder_or_by_file(tmp_path):
    import tarfile

    tree = make_image_folder(tmp_path / "tree" / "cifar10-jpg", CIFAR10_CLASSES, per_class=2)
    (tmp_path / "data").mkdir()
    tar = tmp_path / "data" / "cifar10-jpg.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(tree, arcname="cifar10-jpg")
    by_folder = load_cifar10(tmp_path / "data", val_size=4)
    assert by_folder.source == str(tar)
    # the manifest records the archive itself; later stages pass that path back as --data-dir
    by_file = load_cifar10(by_folder.source, val_size=4)
    assert by_file.fingerprint == by_folder.fingerprint and by_file.source == str(tar)
    (tmp_path / "data" / "notes.txt").write_text("x")
    with pytest.raises(DataCorruptError, match="not a folder or a .tar.gz"):
        load_cifar10(tmp_path / "data" / "notes.txt")


def test_limits_take_a_class_mixed_subset(tmp_path):
    # image folders are read class by class: the first N test images would all be airplanes
    root = make_image_folder(tmp_path / "tree", CIFAR10_CLASSES, per_class=6)
    s = load_cifar10(root, val_size=5)
    assert len(set(s.test.labels[:6].tolist())) == 1  # the trap
    sub = s.test.sample(12)
    assert len(sub) == 12 and len(set(sub.labels.tolist())) >= 5
    again = s.test.sample(12)
    assert np.array_equal(sub.images, again.images) and np.array_equal(sub.labels, again.labels)
    assert s.test.sample(None) is s.test and s.test.sample(10_000) is s.test


def test_cifar_missing_class_folder(tmp_path):
    root = make_image_folder(tmp_path / "tree", CIFAR10_CLASSES[:9], per_class=1)
    with pytest.raises(DataCorruptError, match="lacks class folders: truck"):
        load_cifar10(root)


def test_cifar_wrong_image_size(tmp_path):
    root = make_image_folder(tmp_path / "tree", CIFAR10_CLASSES, per_class=1)
    make_image_folder(tmp_path / "tree", ["cat"], per_class=1, size=(28, 28), splits=("test",), seed=1)
    with pytest.raises(DataCorruptError, match="expected 32x32"):
        load_cifar10(root)


def test_cifar_corrupt_image(tmp_path):
    root = make_image_folder(tmp_path / "tree", CIFAR10_CLASSES, per_class=1)
    (root / "train" / "dog" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(DataCorruptError, match="dog"):
        load_cifar10(root)


def _fake_batches(d, n=4):
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (d / name).write_bytes(pickle.dumps(obj))
    return d


def test_cifar_python_batches_parse_and_verify(tmp_path):
    d = _fake_batches(tmp_path / "cifar-10-batches-py")
    train, test = _load_cifar_batches(d, verify=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    with pytest.raises(DataCorruptError, match="md5"):  # not the canonical files
        load_cifar10(tmp_path)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batch_pickle_cannot_run_code(tmp_path):
    d = _fake_batches(tmp_path / "b")
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataCorruptError, match="refusing to load global"):
        _load_cifar_batches(d, verify=False)


@pytest.mark.slow
def test_shared_cifar_jpeg_tarball(shared_cifar):
    s = load_cifar10(shared_cifar, val_size=5000)
    assert s.train.images.shape == (45000, 3, 32, 32) and s.val.images.shape == (5000, 3, 32, 32)
    assert s.test.images.shape == (10000, 3, 32, 32)
    assert np.bincount(s.test.labels).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([s.train.labels, s.val.labels])).tolist() == [5000] * 10


def test_installed_package_without_vendored_mnist(tmp_path, monkeypatch, vendored):
    """An installed wheel has no vendored MNIST: it reads (or downloads into) the user cache and,
    offline with an empty cache, names the folder to fill."""
    import dafar.data as data

    monkeypatch.setattr(data, "VENDORED_MNIST", tmp_path / "not-installed")
    monkeypatch.setenv("DAFAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DAFAR_OFFLINE", "1")
    monkeypatch.delenv("DAFAR_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "cache" / "mnist")):
        load_mnist()
    _copy_mnist(tmp_path / "cache" / "mnist")
    s = load_mnist()
    assert s.fingerprint == vendored.fingerprint and s.source == str(tmp_path / "cache" / "mnist")


def test_progress_bars_are_silent_without_tqdm(monkeypatch):
    """One fallback for every progress bar (image decoding, the benchmark): a device install has no tqdm."""
    import sys

    from dafar.progress import progress

    from tqdm import tqdm

    assert isinstance(progress([1, 2]), tqdm)  # tqdm is installed here ([test] pulls [train])
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    items = [1, 2, 3]
    assert progress(items, desc="x", unit="img") is items
    bar = progress(total=3, desc="latency")
    bar.update()
    bar.set_postfix_str("file")
    bar.close()
