"""Global k-NN: leave-one-out distances, the threshold, constant maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomap.data import MVTecAD
from anomap.detectors.global_knn import GlobalKNN, leave_one_out_knn
from anomap.errors import AnomapError


def test_leave_one_out_knn_known_answer_with_duplicates():
    v = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert leave_one_out_knn(v, 1).tolist() == pytest.approx([0.0, 0.0, 5.0, 5.0], abs=1e-3)
    assert leave_one_out_knn(v, 2).tolist() == pytest.approx([2.5, 2.5, 5.0, 7.5], abs=1e-3)


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.mark.parametrize("k", [1, 3])
def test_training_scores_equal_scores_without_the_image(toy, k):
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", k=k)
    det = GlobalKNN(**params).fit(toy.train)
    without_last = GlobalKNN(**params).fit(toy.train[:-1])
    expected = without_last.predict(toy.train[-1:]).scores[0]
    assert det.normal_scores_[-1] == pytest.approx(expected, rel=1e-4)
    assert det.threshold_ == pytest.approx(det.normal_scores_.mean() + 3 * det.normal_scores_.std())


def test_maps_are_constant_at_the_score(toy):
    det = GlobalKNN(backbone="efficientnet_lite0", image_size=128, device="cpu", layers=("layer3",))
    det.fit(toy.train)
    pred = det.predict(toy.test)
    assert pred.maps.shape == (len(toy.test), 128, 128)
    np.testing.assert_array_equal(pred.maps, np.broadcast_to(pred.scores[:, None, None], pred.maps.shape))
    assert det.bank_.shape == (len(toy.train), 112)
    with pytest.raises(ValueError, match="bank"):
        GlobalKNN(backbone="efficientnet_lite0", device="cpu")._check_state(*det._get_state())
    with pytest.raises(AnomapError, match="at least 4"):
        GlobalKNN(backbone="efficientnet_lite0", device="cpu", k=3).fit(toy.train[:3])
