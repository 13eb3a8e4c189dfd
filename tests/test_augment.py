"""Training augmentation and the per-epoch monitor (fast: no training)."""
import numpy as np
import torch

from dafar.data import sample_index
from dafar.train.config import Augment
from dafar.train.trainer import _augment


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cutout_greys_one_square_per_image_within_its_size():
    x = torch.full((64, 3, 32, 32), 0.7)
    out = _augment(x, _gen(), Augment.NONE, cutout=8)
    grey = (out == 0).all(1)  # (n, h, w): pixels set to 0 in every channel
    assert torch.equal(out[~grey.unsqueeze(1).expand_as(out)], x[~grey.unsqueeze(1).expand_as(x)])
    counts = grey.flatten(1).sum(1)
    assert counts.max() == 64 and counts.min() >= 16  # a whole 8x8 square, or its corner at the border
    for i in range(64):
        rows, cols = torch.nonzero(grey[i], as_tuple=True)
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
        assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    assert (counts == 64).float().mean() > 0.3  # most squares lie inside the image


def test_cutout_is_deterministic_per_generator_and_off_by_default():
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    a = _augment(x, _gen(3), Augment.CROP_FLIP, cutout=8)
    b = _augment(x, _gen(3), Augment.CROP_FLIP, cutout=8)
    assert torch.equal(a, b)
    # cutout=0 draws nothing extra: crop-flip alone gives what it gave before cutout existed
    assert torch.equal(_augment(x, _gen(3), Augment.CROP_FLIP), _augment(x, _gen(3), Augment.CROP_FLIP, cutout=0))
    assert torch.equal(_augment(x, _gen(3), Augment.NONE), x)


def test_monitor_is_a_class_mixed_fixed_subset():
    # validation indices are sorted and an image-folder set lists its images class by class: the
    # first 2,000 of 5,000 would be four classes; the monitor must draw across all of them
    labels = np.repeat(np.arange(10), 500)
    idx = sample_index(len(labels), 2000, seed=0)
    assert len(idx) == 2000 and len(set(idx.tolist())) == 2000
    assert np.array_equal(idx, np.sort(idx))
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.min() > 150 and counts.max() < 250
    assert np.array_equal(idx, sample_index(len(labels), 2000, seed=0))  # the same every epoch and resume
    assert not np.array_equal(idx, sample_index(len(labels), 2000, seed=1))
    assert np.array_equal(sample_index(300, 2000, seed=0), np.arange(300))
    assert np.array_equal(sample_index(300, None, seed=0), np.arange(300))
