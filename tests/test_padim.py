"""PaDiM: the Gaussian maths against numpy, the leave-one-out threshold, shapes of the state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomap.data import MVTecAD
from anomap.detectors.padim import PaDiM, accumulate, default_n_features, gaussians, leave_one_out, mahalanobis
from anomap.errors import AnomapError

EPS = 0.01


def _numpy_distances(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """(N, P, D) train, (M, P, D) test -> (M, P) Mahalanobis distances, np.cov + inv per position."""
    out = np.empty(test.shape[:2])
    for p in range(train.shape[1]):
        mean = train[:, p].mean(0)
        inv = np.linalg.inv(np.cov(train[:, p], rowvar=False) + EPS * np.eye(train.shape[2]))
        diff = test[:, p] - mean
        out[:, p] = np.sqrt(np.einsum("md,de,me->m", diff, inv, diff))
    return out


def _fitted_sums(train: np.ndarray, batch: int = 3):
    n, p, d = train.shape
    sums, outer = torch.zeros(p, d, dtype=torch.float64), torch.zeros(p, d, d, dtype=torch.float64)
    for s in range(0, n, batch):  # streamed in uneven batches
        accumulate(sums, outer, torch.from_numpy(train[s : s + batch]).float())
    return sums, outer


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(0)
    train = rng.normal(2.0, 1.5, (11, 5, 4)).astype(np.float32)
    test = rng.normal(2.0, 3.0, (6, 5, 4)).astype(np.float32)
    mean, inv = gaussians(*_fitted_sums(train), len(train), EPS)
    got = mahalanobis(torch.from_numpy(test), mean.float(), inv.float()).numpy()
    expected = _numpy_distances(train.astype(np.float64), test.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_leave_one_out_matches_refitting_without_each_image():
    rng = np.random.default_rng(1)
    train = rng.normal(0.0, 1.0, (9, 4, 6)).astype(np.float32)
    sums, outer = _fitted_sums(train)
    mean, _ = gaussians(sums, outer, len(train), EPS)
    inv_downdate = gaussians(sums, outer, len(train), EPS, ddof=2)[1]
    got = leave_one_out(torch.from_numpy(train).double(), mean, inv_downdate, len(train)).numpy()
    x = train.astype(np.float64)
    expected = np.stack([_numpy_distances(np.delete(x, i, 0), x[i : i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_default_channel_counts():
    assert default_n_features(24 + 40 + 112) == 100  # efficientnet_lite0 layer1..layer3
    assert default_n_features(256 + 512 + 1024) == 550  # wide_resnet50_2 layer1..layer3
    assert default_n_features(60) == 60


@pytest.fixture(scope="module")
def fitted(toy_root):
    data = MVTecAD(toy_root, "toy")
    det = PaDiM(backbone="efficientnet_lite0", image_size=128, device="cpu", n_features=12, seed=3)
    return det.fit(data.train), data


def test_fit_gaussians_equal_numpy_on_the_training_features(fitted):
    det, data = fitted
    feats = torch.cat([det._embed(f) for f in det._feature_batches(data.train, "test")]).double().numpy()
    assert feats.shape == (len(data.train), det.grid_[0] * det.grid_[1], 12)
    np.testing.assert_allclose(det.mean_.numpy(), feats.mean(0), rtol=1e-5, atol=1e-5)
    for p in (0, 77, feats.shape[1] - 1):
        inv = np.linalg.inv(np.cov(feats[:, p], rowvar=False) + EPS * np.eye(12))
        np.testing.assert_allclose(det.inv_cov_[p].numpy(), inv, rtol=1e-3, atol=1e-3 * np.abs(inv).max())


def test_threshold_from_leave_one_out_scores(fitted):
    det, data = fitted
    plain = det.predict(data.train).scores
    assert det.normal_scores_.shape == plain.shape  # every training image, in order (fewer than 200)
    # scored against Gaussians refitted without it, an image looks less normal than with it
    assert (det.normal_scores_ > plain).all()
    assert det.threshold_ == pytest.approx(det.normal_scores_.mean() + 3 * det.normal_scores_.std())


def test_state_shape_mismatch_and_bad_params(fitted, toy_root):
    det, data = fitted
    tensors, state = det._get_state()
    other = PaDiM(backbone="efficientnet_lite0", image_size=128, device="cpu", n_features=13, seed=3)
    with pytest.raises(ValueError, match=r"mean has shape \(1024, 12\), expected \(1024, 13\)"):
        other._check_state(tensors, state)
    with pytest.raises(AnomapError, match="n_features"):
        PaDiM(backbone="efficientnet_lite0", n_features=500, device="cpu").fit(data.train)
    with pytest.raises(AnomapError, match="at least 3"):
        PaDiM(backbone="efficientnet_lite0", device="cpu").fit(data.train[:2])
