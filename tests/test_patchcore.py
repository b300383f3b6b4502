import numpy as np
import pytest
import torch

from anomap import PatchCore, load
from anomap.data import MVTecAD, load_image, load_masks
from anomap.errors import AnomapError
from anomap.metrics import image_auroc

from conftest import assert_close_scaled


@pytest.fixture(scope="module")
def toy(toy_root):
    return MVTecAD(toy_root, "toy")


@pytest.fixture(scope="module")
def fitted(toy):
    return PatchCore(backbone="efficientnet_lite0", image_size=128, device="cpu").fit(toy.train)


def test_synthetic_defect_is_found_and_localized(fitted, toy):
    pred = fitted.predict(toy.test)
    labels = np.array([s.label for s in toy.test])
    assert image_auroc(labels, pred.scores) == 1.0
    masks = load_masks(toy.test, fitted.preprocess_)
    for amap, mask, label in zip(pred.maps, masks, labels):
        if label:
            peak = np.unravel_index(amap.argmax(), amap.shape)
            assert mask[peak], "the hottest pixel lies inside the defect"
            assert amap[mask].mean() > 2 * amap[~mask].mean()


def test_threshold_separates_toy_test(fitted, toy):
    pred = fitted.predict(toy.test)
    labels = np.array([s.label for s in toy.test])
    assert (pred.labels == labels).all()


def test_bank_size_follows_sampler(toy):
    patches = len(toy.train) * 16 * 16  # 128 px input, stride-8 grid
    sizes = {}
    for sampler in ("coreset", "random", "none"):
        det = PatchCore(
            backbone="efficientnet_lite0", image_size=128, device="cpu", sampler=sampler, coreset_ratio=0.05
        ).fit(toy.train)
        sizes[sampler] = det.memory_bank_.shape
    assert sizes["coreset"] == sizes["random"] == (round(patches * 0.05), 40 + 112)
    assert sizes["none"] == (patches, 152)


def test_same_seed_same_bank_other_seed_other_bank(toy):
    make = (
        lambda seed: PatchCore(
            backbone="efficientnet_lite0",
            image_size=128,
            device="cpu",  # noqa: E731
            coreset_ratio=0.05,
            seed=seed,
        ).fit(toy.train[:4])
    )
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a.memory_bank_, b.memory_bank_)
    assert not torch.equal(a.memory_bank_, c.memory_bank_)


def test_leave_out_score_equals_score_without_that_image(toy):
    train = toy.train[:4]
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", sampler="none")
    full = PatchCore(**params).fit(train)
    others = PatchCore(**params).fit(train[1:])
    expected = others.predict(train[:1]).scores[0]
    # fit keeps patches in float16, so the two paths agree to float16 precision
    assert full.normal_scores_[0] == pytest.approx(expected, rel=1e-3)
    assert full.threshold_ == pytest.approx(full.normal_scores_.mean() + 3 * full.normal_scores_.std(), rel=1e-6)


def test_reweighting_scales_scores_by_a_weight_in_0_1(fitted, toy):
    plain = fitted.predict(toy.test).scores
    fitted.reweight = True
    try:
        weighted = fitted.predict(toy.test).scores
    finally:
        fitted.reweight = False
    ratio = weighted / plain
    assert ((ratio > 0) & (ratio <= 1)).all()
    assert not np.allclose(ratio, ratio[0])


def test_k_neighbours_average_raises_scores(fitted, toy):
    one = fitted.predict(toy.test[:2]).scores
    fitted.k = 3
    try:
        three = fitted.predict(toy.test[:2]).scores
    finally:
        fitted.k = 1
    assert (three >= one).all()


def test_target_dim_reduces_bank_width(toy):
    det = PatchCore(backbone="efficientnet_lite0", image_size=128, device="cpu", target_dim=64, coreset_ratio=0.05).fit(
        toy.train[:3]
    )
    assert det.memory_bank_.shape[1] == 64
    assert det.predict(toy.test[:1]).maps.shape == (1, 128, 128)


@pytest.mark.parametrize(
    "bad",
    [{"sampler": "kmeans"}, {"coreset_ratio": 0.0}, {"coreset_ratio": 1.5}, {"coreset_chunk": 0}, {"precision": "fp8"}],
)
def test_bad_parameters_are_clear_errors(toy, bad):
    with pytest.raises(AnomapError):
        PatchCore(backbone="efficientnet_lite0", image_size=128, device="cpu", **bad).fit(toy.train[:2])


def test_predict_before_fit_is_an_error(toy):
    with pytest.raises(AnomapError, match="not fitted"):
        PatchCore().predict(toy.test)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_cuda_without_gpu_is_a_clear_error(toy):
    with pytest.raises(AnomapError, match="no CUDA GPU"):
        PatchCore(backbone="efficientnet_lite0", device="cuda").fit(toy.train[:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(toy, fitted):
    gpu = PatchCore(backbone="efficientnet_lite0", image_size=128, device="cuda").fit(toy.train)
    a, b = fitted.predict(toy.test), gpu.predict(toy.test)
    assert np.corrcoef(a.scores, b.scores)[0, 1] > 0.99


@pytest.mark.parametrize("search", ["faiss", "ivf"])
def test_other_searches_give_the_exact_scores(fitted, toy, search):
    """The faiss flat index is exact; the IVF index is exact when it visits every cell."""
    det = PatchCore(**{**fitted.get_params(), "search": search, "ivf_probe": 100_000}).fit(toy.train)
    exact = PatchCore(**{**fitted.get_params(), "search": "exact"}).fit(toy.train)
    assert torch.equal(det.memory_bank_, exact.memory_bank_)
    assert_close_scaled(det.normal_scores_, exact.normal_scores_)  # the leave-out threshold too
    a, b = det.predict(toy.test), exact.predict(toy.test)
    assert_close_scaled(a.scores, b.scores)
    assert_close_scaled(a.maps, b.maps)


def test_ivf_search_is_approximate_with_exact_image_scores(toy, tmp_path):
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", sampler="none")
    ivf = PatchCore(**params, search="ivf", ivf_probe=1).fit(toy.train)
    exact = PatchCore(**params, search="exact").fit(toy.train)
    assert ivf.ivf_centroids_.shape[0] > 1
    a, b = ivf.predict(toy.test), exact.predict(toy.test)
    assert (a.maps >= b.maps - 1e-4 * np.abs(b.maps).max()).all()  # a miss only overestimates
    assert_close_scaled(a.scores, b.scores)  # each image's highest patches are re-measured exactly
    restored = load(ivf.save(tmp_path / "ivf.anomap"))
    assert torch.equal(restored.ivf_centroids_, ivf.ivf_centroids_)
    np.testing.assert_array_equal(restored.predict(toy.test).maps, a.maps)


def test_auto_search_switches_to_ivf_on_large_banks(fitted, monkeypatch):
    assert fitted._search_kind() == "exact"
    monkeypatch.setattr("anomap.detectors.patchcore.IVF_MIN_BANK", len(fitted.memory_bank_))
    assert fitted._search_kind() == "ivf"


def test_chunked_bank_is_the_union_of_per_block_coresets(toy):
    per_image = 16 * 16
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", coreset_ratio=0.1, batch_size=3)
    chunked = PatchCore(**params, coreset_chunk=2 * per_image).fit(toy.train[:6])  # blocks of 2 images
    blocks = [PatchCore(**params, coreset_chunk=None).fit(toy.train[i:j]) for i, j in ((0, 2), (2, 4), (4, 6))]
    assert torch.equal(chunked.memory_bank_, torch.cat([b.memory_bank_ for b in blocks]))
    whole = PatchCore(**params, coreset_chunk=None).fit(toy.train[:6])
    assert abs(len(chunked.memory_bank_) - len(whole.memory_bank_)) <= 3  # rounding per block
    assert not torch.equal(chunked.memory_bank_, whole.memory_bank_)


def test_leave_out_threshold_with_chunks_excludes_the_image_itself(toy):
    train = toy.train[:5]
    params = dict(backbone="efficientnet_lite0", image_size=128, device="cpu", sampler="none", batch_size=2)
    full = PatchCore(**params, coreset_chunk=3 * 256).fit(train)
    others = PatchCore(**params).fit(train[:2] + train[3:])
    assert full.normal_scores_[2] == pytest.approx(others.predict(train[2:3]).scores[0], rel=1e-3)


def test_score_batch_matches_predict(fitted, toy):
    pred = fitted.predict(toy.test)
    batch = torch.stack([fitted.preprocess_.image(load_image(s.path)) for s in toy.test])
    scores, maps = fitted.score_batch(batch)
    np.testing.assert_allclose(scores.numpy(), pred.scores, rtol=1e-5)
    np.testing.assert_allclose(maps.numpy(), pred.maps, rtol=1e-4, atol=1e-5)


def test_half_precision_keeps_image_scores_and_maps_close(fitted, toy):
    plain = fitted.predict(toy.test)
    fitted.precision = fitted.encoder_.precision = "bf16"  # autocast works on CPU in bfloat16
    fitted._half_bank = None
    try:
        half = fitted.predict(toy.test)
    finally:
        fitted.precision = fitted.encoder_.precision = "fp32"
    labels = np.array([s.label for s in toy.test])
    assert image_auroc(labels, half.scores) == 1.0
    np.testing.assert_allclose(half.scores, plain.scores, rtol=0.05)
    assert np.corrcoef(half.maps.ravel(), plain.maps.ravel())[0, 1] > 0.99
    assert not np.array_equal(half.scores, plain.scores)  # the half path did run


def test_reflected_border_changes_only_edge_patches_and_is_kept_by_the_file(fitted, toy, tmp_path):
    edge = PatchCore(backbone="efficientnet_lite0", image_size=128, device="cpu", border="reflect").fit(toy.train)
    batch = next(iter(edge._batches(toy.test[:2], "t")))
    feats = edge.encoder_.features(batch)
    a, b = fitted._embed(feats), edge._embed(feats)  # (B, h, w, D)
    # layer3 (half the grid) is upsampled onto layer2's grid, so the border reaches 3 cells in
    torch.testing.assert_close(a[:, 3:-3, 3:-3], b[:, 3:-3, 3:-3])
    assert not torch.allclose(a[:, 0], b[:, 0]) and not torch.allclose(a[:, :, -1], b[:, :, -1])
    back = load(edge.save(tmp_path / "edge.anomap"))
    assert back.border == "reflect"
    np.testing.assert_array_equal(back.predict(toy.test[:3]).maps, edge.predict(toy.test[:3]).maps)
