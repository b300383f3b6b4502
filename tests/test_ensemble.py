"""The fused detector: standardisation against a direct computation, one backbone pass per batch
when scoring, parameters reaching the members, damaged files refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomap
from anomap import PaDiM, PatchCore, create, load
from anomap.data import MVTecAD
from anomap.detectors.ensemble import Ensemble, standardize
from anomap.detectors.model_file import read_model_file, write_model_file
from anomap.errors import AnomapError, ModelFileError, ParamError

from conftest import assert_close_scaled

PARAMS = {"backbone": "efficientnet_lite0", "image_size": 64, "device": "cpu", "seed": 3}


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.fixture(scope="module")
def ensemble(toy):
    return create("ensemble", **PARAMS).fit(toy.train)


@pytest.fixture(scope="module")
def alone(toy):
    """The members fitted on their own, each with its own backbone."""
    return PatchCore(**PARAMS).fit(toy.train), PaDiM(**PARAMS).fit(toy.train)


def _z(values: np.ndarray, normal: np.ndarray) -> np.ndarray:
    return (values - normal.mean()) / normal.std(ddof=1)


def test_scores_and_maps_are_mean_z_scores_of_the_members(ensemble, alone, toy):
    got = ensemble.predict(toy.test)
    preds = [member.predict(toy.test) for member in alone]
    expected_scores = np.mean([_z(p.scores, m.normal_scores_) for p, m in zip(preds, alone)], axis=0)
    expected_maps = np.mean([_z(p.maps, m.normal_scores_) for p, m in zip(preds, alone)], axis=0)
    assert_close_scaled(got.scores, expected_scores)
    assert_close_scaled(got.maps, expected_maps)


def test_normal_scores_pair_the_members_leave_out_scores(ensemble, alone):
    pc, pd = alone
    assert len(pc.normal_scores_) == len(pd.normal_scores_) == 10
    expected = (_z(pc.normal_scores_, pc.normal_scores_) + _z(pd.normal_scores_, pd.normal_scores_)) / 2
    assert_close_scaled(ensemble.normal_scores_, expected)
    assert ensemble.threshold_ == pytest.approx(expected.mean() + 3 * expected.std(), rel=1e-5)


def test_ensemble_is_part_of_the_public_api():
    assert anomap.Ensemble is Ensemble and "Ensemble" in anomap.__all__


def test_standardize_known_answer_and_flat_scores():
    z = standardize(torch.tensor([1.0, 5.0]), np.array([1.0, 2.0, 3.0]))  # mean 2, sample std 1
    torch.testing.assert_close(z, torch.tensor([-1.0, 3.0]))
    with pytest.raises(AnomapError, match="all equal"):
        standardize(torch.tensor([1.0]), np.array([2.0, 2.0, 2.0]))


def test_one_backbone_pass_per_batch_when_scoring(ensemble, toy):
    calls = []
    hook = ensemble.encoder_.extractor.register_forward_hook(lambda *args: calls.append(1))
    try:
        ensemble.predict(toy.test)  # 6 images, batch_size 16: one batch
    finally:
        hook.remove()
    assert len(calls) == 1
    assert all(m.encoder_ is ensemble.encoder_ for m in ensemble._members.values())
    assert set(ensemble.encoder_.extractor.layers) == {"layer1", "layer2", "layer3"}


def test_parameters_reach_the_members():
    det = create("ensemble", **PARAMS, layers=["layer2", "layer3"], coreset_ratio=0.5, threshold_images=7)
    pc, pd = det._members["patchcore"], det._members["padim"]
    assert pc.layers == pd.layers == ("layer2", "layer3")
    assert pc.coreset_ratio == 0.5 and pc.threshold_images == pd.threshold_images == 7
    assert pc.seed == pd.seed == 3 and pc.backbone == pd.backbone == "efficientnet_lite0"
    default = create("ensemble", **PARAMS)._members
    assert default["patchcore"].layers == ("layer2", "layer3")
    assert default["padim"].layers == ("layer1", "layer2", "layer3")


def test_file_without_a_member_tensor_is_refused(ensemble, tmp_path):
    meta, tensors = read_model_file(ensemble.save(tmp_path / "e.anomap"))
    del tensors["padim.mean"]
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    path = write_model_file(tmp_path / "damaged.anomap", tensors, meta)
    with pytest.raises(ModelFileError, match="mean"):
        load(path)


def test_assembled_from_fitted_members_equals_fitted_whole(ensemble, alone, toy):
    pc, pd = (create(m, **m_params) for m, m_params in (("patchcore", PARAMS), ("padim", PARAMS)))
    with pytest.raises(AnomapError, match="not fitted"):
        Ensemble.assemble([pc, pd])
    with pytest.raises(AnomapError, match="parameters an ensemble gives"):
        Ensemble.assemble([PatchCore(**PARAMS, k=2), alone[1]])
    assembled = Ensemble.assemble(alone)
    assert [m.get_params() for m in assembled._members.values()] == [m.get_params() for m in ensemble._members.values()]
    assert_close_scaled(assembled.normal_scores_, ensemble.normal_scores_)
    a, b = assembled.predict(toy.test), ensemble.predict(toy.test)
    assert_close_scaled(a.scores, b.scores)
    assert_close_scaled(a.maps, b.maps)


def test_weighted_members_on_two_backbones_against_a_direct_computation(toy, alone):
    """Members on two backbones (one converting the other's normalisation) with separate score and
    map weights: the weighted means of the members' z-scores, each member alone as reference."""
    pc, pd = alone
    edge = PatchCore(**{**PARAMS, "backbone": "mobilenet_v2"}, border="reflect").fit(toy.train)
    members = [pc, pd, edge]
    score_w, map_w = [2.0, 1.0, 0.0], [1.0, 0.0, 3.0]
    preds = [m.predict(toy.test) for m in members]
    fused = Ensemble.assemble(
        [PatchCore(**PARAMS).fit(toy.train), PaDiM(**PARAMS).fit(toy.train), edge], score_w, map_w
    )
    assert list(fused._members) == ["patchcore0", "padim", "patchcore1"]
    got = fused.predict(toy.test)

    def weighted(values, weights):
        return sum(w * _z(v, m.normal_scores_) for v, m, w in zip(values, members, weights)) / sum(weights)

    assert_close_scaled(got.scores, weighted([p.scores for p in preds], score_w))
    assert_close_scaled(got.maps, weighted([p.maps for p in preds], map_w))
    assert_close_scaled(fused.normal_scores_, weighted([m.normal_scores_ for m in members], score_w))


def test_members_round_trip_through_a_model_file(toy, alone, tmp_path):
    specs = [
        {"method": "patchcore", "border": "reflect", "map_weight": 2},
        {"method": "padim", "backbone": "mobilenet_v2", "score_weight": 0.5},
    ]
    det = create("ensemble", **PARAMS, members=specs).fit(toy.train)
    assert det.members[0] == {
        "method": "patchcore",
        "backbone": None,
        "border": "reflect",
        "score_weight": 1.0,
        "map_weight": 2.0,
    }
    back = load(det.save(tmp_path / "m.anomap"))
    assert back.members == det.members
    a, b = det.predict(toy.test), back.predict(toy.test)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)


@pytest.mark.parametrize(
    "members",
    [
        [],
        [{"method": "psfe"}],
        [{"method": "padim", "border": "reflect"}],
        [{"method": "patchcore", "border": "mirror"}],
        [{"method": "patchcore", "score_weight": -1}],
        [{"method": "patchcore", "map_weight": 0}],
        [{"method": "patchcore", "backbone": "vgg"}],
        [{"method": "patchcore", "extra": 1}],
        "patchcore",
    ],
)
def test_bad_members_are_refused_with_what_is_allowed(members):
    with pytest.raises(ParamError, match="members must be null or a list of 1 to 16 members"):
        create("ensemble", **PARAMS, members=members)


def test_a_weights_file_fits_one_backbone(tmp_path):
    with pytest.raises(ParamError, match="one backbone"):
        create(
            "ensemble",
            **{**PARAMS, "weights": str(tmp_path / "w.pth")},
            members=[{"method": "patchcore"}, {"method": "padim", "backbone": "mobilenet_v2"}],
        )
