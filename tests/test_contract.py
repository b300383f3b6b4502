"""One contract, run over every registered method: fit returns self, predict is pure and
batch-independent, shapes and signs are right, save/load round-trips exactly."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from anomap import create, load, methods
from anomap.data import MVTecAD
from anomap.detectors.base import REGISTRY

# Per-method settings that keep the contract run short; each method's own tests use its defaults.
QUICK = {
    "patchcore": {},
    "global_ae": {"epochs": 50},
    "conv_ae": {"epochs": 3},
    "dfr": {"epochs": 3},
    "padim": {},
    "psfe": {},
    "global_knn": {},
}


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.fixture(scope="module", params=methods())
def fitted(request, toy):
    params = {"backbone": "efficientnet_lite0", "image_size": 128, "device": "cpu", "seed": 0}
    accepted = inspect.signature(REGISTRY[request.param]).parameters  # conv_ae has no backbone
    params = {k: v for k, v in params.items() if k in accepted}
    det = create(request.param, **{**params, **QUICK.get(request.param, {})})
    assert det.fit(toy.train) is det
    return det


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
    before = fitted.get_params()
    whole = fitted.predict(toy.test)
    single = fitted.predict(toy.test[2:3])
    np.testing.assert_allclose(single.scores, whole.scores[2:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(single.maps, whole.maps[2:3], rtol=1e-4, atol=1e-5)
    again = fitted.predict(toy.test)
    np.testing.assert_array_equal(again.scores, whole.scores)
    assert fitted.get_params() == before


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
