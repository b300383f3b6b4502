"""One contract, run over every registered method: fit returns self, predict is pure and
batch-independent, handles empty input, refuses to run unfitted, shapes and signs are right,
parameters rebuild the detector, save/load round-trips exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomap import create, load, methods
from anomap.data import MVTecAD
from anomap.detectors.base import REGISTRY
from anomap.encoder import FeatureParams
from anomap.errors import AnomapError

from conftest import assert_close_scaled

# Per-method settings that keep the contract run short; each method's own tests use its defaults.
QUICK = {
    "patchcore": {},
    "global_ae": {"epochs": 50},
    "conv_ae": {"epochs": 3},
    "dfr": {"epochs": 3},
    "padim": {},
    "psfe": {},
    "global_knn": {},
    "ensemble": {},
}


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.fixture(scope="module", params=methods())
def fitted(request, toy):
    det = create(request.param, **_params(request.param))
    assert det.fit(toy.train) is det
    return det


def _params(method: str) -> dict:
    params = {"image_size": 128, "device": "cpu", "seed": 0, **QUICK[method]}
    if issubclass(REGISTRY[method], FeatureParams):
        params["backbone"] = "efficientnet_lite0"
    return params


def _learned(det) -> dict:
    """Copies of everything a fitted detector learned."""
    tensors, state = det._get_state()
    copies = {k: v.detach().clone() for k, v in tensors.items()}
    return {**copies, "state": repr(state), "normal": det.normal_scores_.copy(), "threshold": det.threshold_}


def test_every_method_has_quick_settings():
    assert set(QUICK) == set(methods())


def test_predict_shapes_and_threshold(fitted, toy):
    pred = fitted.predict(toy.test)
    n = len(toy.test)
    assert pred.scores.shape == (n,)
    assert pred.maps.shape == (n, 128, 128)
    assert pred.maps.dtype == np.float32
    assert np.isfinite(pred.scores).all() and np.isfinite(pred.maps).all()
    assert fitted.threshold_ is not None and np.isfinite(fitted.threshold_)
    assert pred.labels.shape == (n,)


def test_predict_is_pure_and_batch_independent(fitted, toy):
    before, learned = fitted.get_params(), _learned(fitted)
    whole = fitted.predict(toy.test)
    single = fitted.predict(toy.test[2:3])
    assert_close_scaled(single.scores, whole.scores[2:3])  # another batch size: other float kernels
    assert_close_scaled(single.maps, whole.maps[2:3])
    again = fitted.predict(toy.test)
    np.testing.assert_array_equal(again.scores, whole.scores)
    assert fitted.get_params() == before
    after = _learned(fitted)
    assert after.keys() == learned.keys()
    for name, value in learned.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[name], value), name
        else:
            np.testing.assert_array_equal(after[name], value)


def test_empty_input(fitted):
    pred = fitted.predict([])
    assert pred.scores.shape == (0,) and pred.maps.shape == (0, 128, 128)
    assert pred.labels.shape == (0,)


def test_predict_before_fit_is_a_clear_error(fitted, toy):
    fresh = create(fitted.method, **fitted.get_params())
    for call in (lambda: fresh.predict(toy.test), lambda: fresh.save("never.anomap")):
        with pytest.raises(AnomapError, match="not fitted"):
            call()


def test_parameters_rebuild_the_detector(fitted):
    rebuilt = create(fitted.method, **fitted.get_params())
    assert type(rebuilt) is type(fitted)
    assert rebuilt.get_params() == fitted.get_params()
    assert repr(rebuilt) == repr(fitted)


def test_failed_fit_leaves_the_detector_unfitted(fitted, toy, monkeypatch):
    det = create(fitted.method, **fitted.get_params())
    det.fit(toy.train)

    def broken(self, images):
        raise AnomapError("fit failed midway")

    monkeypatch.setattr(type(det), "_fit", broken)
    with pytest.raises(AnomapError, match="midway"):
        det.fit(toy.train)
    with pytest.raises(AnomapError, match="not fitted"):
        det.predict(toy.test)


def test_anomalies_score_higher(fitted, toy):
    pred = fitted.predict(toy.test)
    labels = np.array([s.label for s in toy.test])
    assert pred.scores[labels == 1].mean() > pred.scores[labels == 0].mean()


def test_save_load_round_trip(fitted, toy, tmp_path):
    path = fitted.save(tmp_path / "model.anomap")
    restored = load(path)
    assert type(restored) is type(fitted)
    assert restored.get_params() == fitted.get_params()
    assert restored.threshold_ == fitted.threshold_
    a, b = fitted.predict(toy.test), restored.predict(toy.test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
