"""PSFE: patch statistics with known answers, leave-one-out threshold, maps peak at a defect."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomap.data import MVTecAD, load_masks
from anomap.detectors.psfe import PSFE, cell_map, patch_entropy, patch_variance, patches, robust_z
from anomap.errors import AnomapError


def test_patch_statistics_known_answers():
    const = torch.full((1, 3, 16, 5), 0.7)  # (B, C, K, L)
    assert torch.allclose(patch_variance(const), torch.zeros(1, 5))
    assert torch.allclose(patch_entropy(const, 8), torch.zeros(1, 5))
    # one value in the middle of each of 8 bins on [-3, 3], six times each: uniform histogram
    centres = -3 + 0.75 * (torch.arange(8) + 0.5)
    spread = centres.repeat(6).reshape(1, 3, 16, 1)
    assert patch_entropy(spread, 8).item() == pytest.approx(math.log(8))
    two = torch.tensor([0.0, 2.0]).repeat(8).reshape(1, 1, 16, 1)
    assert patch_variance(two).item() == pytest.approx(1.0)


def test_patches_and_cell_map_cover_the_grid():
    x = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(1, 2, 10, 10)
    p = patches(x, 4, 4)  # 10 cells -> padded to 12: 3 x 3 patches
    assert p.shape == (1, 2, 16, 9)
    assert p[0, 0, :, 0].tolist() == x[0, 0, :4, :4].reshape(-1).tolist()
    cells = cell_map(torch.arange(9.0)[None], (10, 10), 4, 4)
    assert cells.shape == (1, 10, 10)
    assert cells[0, 0, 0] == 0 and cells[0, 9, 9] == 8 and cells[0, 5, 1] == 3
    overlapping = cell_map(torch.tensor([[0.0, 2.0, 4.0]]), (1, 4), 2, 1)  # patches at 0, 1, 2
    assert overlapping[0, 0].tolist() == [0.0, 1.0, 3.0, 4.0]


def test_robust_z_ignores_the_outlier():
    s = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 3.0]]])
    z = robust_z(s)
    assert z[0, 0, 2].item() == pytest.approx(0.0)
    assert z[0, 0, 0].item() == pytest.approx(-2 / 1.4826)  # median 3, MAD 1
    assert z[0, 0, 5].item() == pytest.approx(97 / 1.4826)


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.mark.parametrize("reference", ["none", "train"])
def test_map_is_higher_at_the_defect(toy, reference):
    det = PSFE(
        backbone="efficientnet_lite0",
        image_size=128,
        device="cpu",
        patch_size=2,
        stats=("variance", "entropy"),
        reference=reference,
    ).fit(toy.train)
    bad = [s for s in toy.test if s.label == 1]
    maps = det.predict(bad).maps
    masks = load_masks(bad, det.preprocess_)
    for amap, mask in zip(maps, masks):
        assert amap[mask].mean() > np.percentile(amap[~mask], 90)


def test_train_reference_threshold_is_leave_one_out(toy):
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", reference="train")
    det = PSFE(**params).fit(toy.train)
    without_first = PSFE(**params).fit(toy.train[1:])
    expected = without_first.predict(toy.train[:1]).scores[0]
    np.testing.assert_allclose(det.normal_scores_[0], expected, rtol=1e-4)
    assert det.threshold_ == pytest.approx(det.normal_scores_.mean() + 3 * det.normal_scores_.std())


def test_bad_parameters_and_state(toy):
    with pytest.raises(AnomapError, match="stats"):
        PSFE(stats=("variance", "kurtosis")).fit(toy.train)
    with pytest.raises(AnomapError, match="reference"):
        PSFE(reference="memory").fit(toy.train)
    det = PSFE(backbone="efficientnet_lite0", image_size=128, device="cpu").fit(toy.train)
    tensors, state = det._get_state()
    with pytest.raises(ValueError, match="stat_mean"):
        PSFE(backbone="efficientnet_lite0", image_size=128, device="cpu", patch_size=2)._check_state(tensors, state)
