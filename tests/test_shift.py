"""Domain shift: masks stay aligned with what they mark, runs are reproducible, the shifted copy
is a valid MVTec AD category."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomap._rng import stable_rng
from anomap.cli import main
from anomap.data import MVTecAD, load_image, load_mask
from anomap.errors import DataError
from anomap.shift import shift_image, shift_samples

from conftest import make_category


def _square_scene(size: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy (size, size, 3) image with a bright square away from the centre, and its mask."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[30:60, 90:125] = True
    img[mask] = 230
    return img, mask


@pytest.mark.parametrize("seed", range(6))
def test_mask_moves_with_the_content_it_marks(seed):
    img, mask = _square_scene(seed=seed)
    out, out_mask = shift_image(img, mask, stable_rng(seed, "square.png"))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert out_mask.shape == mask.shape and out_mask.dtype == bool
    assert 0.7 * mask.sum() < out_mask.sum() < 1.4 * mask.sum()
    gray = out.mean(axis=-1)
    assert gray[out_mask].mean() > 2.5 * gray[~out_mask].mean()
    bright = gray > (np.median(gray) + gray.max()) / 2
    assert (bright & out_mask).sum() / (bright | out_mask).sum() > 0.93
    # The content did move: the old square is not where the new one is.
    assert (out_mask != mask).any()


def test_mask_values_stay_binary_after_saving(tmp_path):
    root = make_category(tmp_path / "src", "cat", n_train=2, n_good=1, n_bad=2, seed=3)
    data = MVTecAD(root, "cat")
    copies = shift_samples(data.test, root, tmp_path / "dst", seed=5)
    for copy in copies:
        if copy.mask_path is not None:
            values = np.unique(np.asarray(Image.open(copy.mask_path)))
            assert set(values.tolist()) <= {0, 255} and load_mask(copy.mask_path).any()


def test_shift_is_reproducible_and_seed_dependent():
    img, mask = _square_scene()
    a = shift_image(img, mask, stable_rng(1, "cat/test/blob/000.png"))
    b = shift_image(img, mask, stable_rng(1, "cat/test/blob/000.png"))
    c = shift_image(img, mask, stable_rng(2, "cat/test/blob/000.png"))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_mask_of_another_size_is_refused():
    img, mask = _square_scene()
    with pytest.raises(DataError, match="does not match"):
        shift_image(img, mask[:-1], stable_rng(0, "x"))


def test_shift_command_writes_an_mvtec_category(tmp_path):
    root = make_category(tmp_path / "src", "cat", n_train=3, n_good=1, n_bad=2, seed=4)
    out = tmp_path / "shifted"
    args = ["shift", "--data", str(root), "--category", "cat", "--out", str(out), "--seed", "9"]
    assert main(args) == 0
    clean, shifted = MVTecAD(root, "cat"), MVTecAD(out, "cat")
    assert [s.path.name for s in shifted.train] == [s.path.name for s in clean.train]
    assert [(s.label, s.defect) for s in shifted.test] == [(s.label, s.defect) for s in clean.test]
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" for s in shifted.test if s.label)
    first = load_image(shifted.train[0].path)
    assert first.shape == load_image(clean.train[0].path).shape
    assert not np.array_equal(first, load_image(clean.train[0].path))
    # Re-running keeps the existing copy; --overwrite regenerates it identically.
    assert main(args + ["--overwrite"]) == 0
    np.testing.assert_array_equal(load_image(shifted.train[0].path), first)
