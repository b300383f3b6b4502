"""Known answers for the detectors that train a network: global_ae, conv_ae, dfr, and their
shared training helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from anomap import DFR, ConvAE, GlobalAE
from anomap.data import MVTecAD, load_masks
from anomap.detectors.dfr import pca_dimension
from anomap.detectors.training import holdout_split, seeded_module, train_autoencoder
from anomap.errors import AnomapError

from conftest import make_category

FEATURES = {"backbone": "efficientnet_lite0", "image_size": 128, "device": "cpu", "seed": 0}


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.fixture(scope="module")
def conv_ae(toy):
    return ConvAE(image_size=128, device="cpu", seed=0, epochs=4).fit(toy.train)


@pytest.fixture(scope="module")
def dfr(toy):
    return DFR(**FEATURES, epochs=5).fit(toy.train)


@pytest.fixture(scope="module")
def global_ae(toy):
    return GlobalAE(**FEATURES, epochs=60).fit(toy.train)


def assert_defects_localized(det, toy):
    pred = det.predict(toy.test)
    masks = load_masks(toy.test, det.preprocess_)
    for score, amap, mask, sample in zip(pred.scores, pred.maps, masks, toy.test):
        assert score == pytest.approx(amap.max())
        if sample.label:
            peak = np.unravel_index(amap.argmax(), amap.shape)
            assert mask[peak], f"{sample.path}: the hottest pixel lies outside the defect"
            assert amap[mask].mean() > 2 * amap[~mask].mean()


def test_holdout_split_is_seeded_disjoint_and_complete():
    fit, held = holdout_split(20, 0.15, seed=3)
    assert len(held) == 3 and len(fit) == 17
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(20))
    assert torch.equal(held, holdout_split(20, 0.15, seed=3)[1])
    assert not torch.equal(held, holdout_split(20, 0.15, seed=4)[1])


@pytest.mark.parametrize("n", [3, 6])
def test_holdout_split_keeps_everything_when_too_few(n):
    fit, held = holdout_split(n, 0.15, seed=0)
    assert fit.tolist() == list(range(n)) and len(held) == 0


def test_train_autoencoder_lowers_the_loss_and_is_seeded():
    data = torch.randn(64, 4) @ torch.randn(4, 16)  # rank-4 data, fits a width-8 bottleneck

    def run(seed):
        net = seeded_module(lambda: nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16)), seed)
        losses = train_autoencoder(net, data, epochs=30, lr=1e-2, batch_size=16, device=torch.device("cpu"), seed=seed)
        return net, losses

    (a, losses), (b, _), (c, _) = run(0), run(0), run(1)
    assert losses[-1] < 0.1 * losses[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_pca_dimension_counts_components_of_known_spectrum():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 6, generator=gen) * torch.tensor([10.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    # variances 100, 9, 1, 0.01, ...: shares 0.908, 0.990, 0.9997
    assert pca_dimension(x, 0.9) == 1
    assert pca_dimension(x, 0.95) == 2
    assert pca_dimension(x, 0.999) == 3


def test_conv_ae_localizes_synthetic_defects(conv_ae, toy):
    assert_defects_localized(conv_ae, toy)


def test_dfr_localizes_synthetic_defects(dfr, toy):
    assert_defects_localized(dfr, toy)


@pytest.mark.parametrize("name", ["conv_ae", "dfr", "global_ae"])
def test_training_loss_decreases(name, request):
    losses = request.getfixturevalue(name).train_losses_
    assert losses[-1] < losses[0]


def test_global_ae_map_is_its_score_everywhere(global_ae, toy):
    pred = global_ae.predict(toy.test)
    np.testing.assert_array_equal(pred.maps, np.broadcast_to(pred.scores[:, None, None], pred.maps.shape))
    labels = np.array([s.label for s in toy.test])
    assert pred.scores[labels == 1].min() > pred.scores[labels == 0].max()


def test_threshold_is_mean_plus_3_sigma_of_held_out_scores(tmp_path):
    data = MVTecAD(make_category(tmp_path, n_train=14, n_good=0, n_bad=0, seed=5), "toy")
    det = DFR(**FEATURES, epochs=1).fit(data.train)
    held = holdout_split(14, det.holdout, det.seed)[1]
    scores = det.predict([data.train[i] for i in held]).scores
    assert len(det.normal_scores_) == 2
    # fit scores the held-out images from its float16 feature cache, predict from float32 features
    np.testing.assert_allclose(det.normal_scores_, scores, rtol=1e-3)
    expected = det.normal_scores_.mean() + 3 * det.normal_scores_.std()
    assert det.threshold_ == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvAE(image_size=64, device="cpu", epochs=2, seed=7),
        lambda: DFR(**{**FEATURES, "image_size": 64, "seed": 7}, epochs=2),
        lambda: GlobalAE(**{**FEATURES, "image_size": 64, "seed": 7}, epochs=2),
    ],
)
def test_same_seed_gives_identical_weights(make, toy):
    a, b = make().fit(toy.train[:5]), make().fit(toy.train[:5])
    for x, y in zip(a.net_.state_dict().values(), b.net_.state_dict().values()):
        assert torch.equal(x, y)


def test_dfr_latent_is_chosen_by_pca_or_given(dfr):
    assert 1 <= dfr.latent_ < 152  # layer2 + layer3 of efficientnet_lite0: 40 + 112 channels
    assert dfr.net_[2].out_channels == dfr.latent_


def test_set_state_rejects_wrong_shapes(dfr):
    tensors, state = dfr._get_state()
    bad = {**tensors, "net.0.weight": tensors["net.0.weight"][:, :-1]}
    other = DFR(**FEATURES)
    other._setup()
    with pytest.raises(ValueError, match="net.0.weight"):
        other._set_state(bad, state)
    with pytest.raises(ValueError, match="mean"):
        DFR(**FEATURES)._check_state({**tensors, "mean": tensors["mean"][:-1]}, state)


def test_conv_ae_refuses_sizes_not_multiple_of_16(toy):
    with pytest.raises(AnomapError, match="multiple of 16"):
        ConvAE(image_size=120, device="cpu").fit(toy.train[:2])


def test_conv_ae_flips_are_seeded(toy):
    make = lambda: ConvAE(image_size=64, device="cpu", epochs=2, augment=True, seed=1).fit(toy.train[:4])  # noqa: E731
    a, b = make(), make()
    assert a.train_losses_ == b.train_losses_
