import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn import metrics as skm

from anomap import metrics
from anomap.errors import ScoreError


def reference_aupro(masks, maps, fpr_limit):
    """AUPRO written out plainly: one pass over the images per threshold."""
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.sum(above & normal) / np.sum(normal))
        pros.append(np.mean([np.mean(above[i][region]) for i, region in regions]))
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs, fprs[1:], pros, pros[1:]):
        if x1 > fpr_limit:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def trapezoid(y, x):
    return np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2


def blob_masks(rng, n_images, size, n_blobs=3):
    """(n_images, size, size) bool masks of random rectangles; the last image stays empty."""
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks[:-1]:
        for _ in range(n_blobs):
            top, left = rng.integers(0, size - 4, size=2)
            height, width = rng.integers(2, size // 3, size=2)
            mask[top : top + height, left : left + width] = True
    return masks


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- AUPRO ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("levels", [None, 7])  # continuous maps, and maps with heavy ties
def test_aupro_matches_reference(rng, fpr_limit, levels):
    masks = blob_masks(rng, 4, 20)
    maps = rng.random(masks.shape) + 0.4 * masks
    if levels:
        maps = np.round(maps * levels)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert metrics.aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # Two diagonal touching squares form one region: PRO is the mean over 1 region, not 2.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = masks[0, 3:7, 3:7] = True
    maps = np.zeros((1, 8, 8))
    maps[0, 1:3, 1:3] = 1.0  # 4 of the 20 region pixels found, nothing else
    fpr, pro = metrics.pro_curve(masks, maps)
    assert pro[1] == pytest.approx(4 / 20)


def test_aupro_known_cases(rng):
    masks = blob_masks(rng, 30, 64)
    noise = rng.random(masks.shape, dtype=np.float32)
    assert metrics.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-9)
    assert metrics.aupro(masks, noise) == pytest.approx(0.15, abs=0.02)
    assert metrics.aupro(masks, 0.5 * noise - masks) == pytest.approx(0.0, abs=1e-12)


def test_pro_curve_shape(rng):
    masks = blob_masks(rng, 5, 32)
    maps = rng.random(masks.shape) + masks
    fpr, pro = metrics.pro_curve(masks, maps, fpr_limit=0.2)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == pytest.approx(0.2)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert trapezoid(pro, fpr) / 0.2 == pytest.approx(metrics.aupro(masks, maps, fpr_limit=0.2))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fpr_limit=st.floats(0.01, 1.0))
def test_aupro_in_unit_interval(seed, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = rng.random((2, 6, 6)) < 0.3
    masks[0, 0, 0], masks[0, 0, 1] = True, False
    maps = rng.integers(0, 4, size=masks.shape)
    value = metrics.aupro(masks, maps, fpr_limit)
    assert -1e-12 <= value <= 1 + 1e-12
    assert value == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-12)


def test_aupro_rejects_bad_inputs(rng):
    masks = blob_masks(rng, 2, 12)
    maps = rng.random(masks.shape)
    with pytest.raises(ScoreError, match="fpr_limit"):
        metrics.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ScoreError, match="both normal"):
        metrics.aupro(np.zeros_like(masks), maps)
    with pytest.raises(ScoreError, match="0/1"):
        metrics.aupro(masks * 255, maps)


# --- AUROC / AUPRC and curves ------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
def test_image_auroc_and_auprc_match_sklearn(rng, ties):
    labels = rng.integers(0, 2, size=300)
    scores = rng.normal(size=300) + labels
    if ties:
        scores = np.round(scores)
    assert metrics.image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert metrics.image_auprc(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores))


def test_curves_match_sklearn(rng):
    labels = rng.integers(0, 2, size=100)
    scores = np.round(rng.normal(size=100) + labels, 1)
    fpr, tpr = metrics.roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert trapezoid(tpr, fpr) == pytest.approx(metrics.image_auroc(labels, scores))
    recall, precision = metrics.pr_curve(labels, scores)
    sk_precision, sk_recall, _ = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(recall, sk_recall[::-1])
    np.testing.assert_allclose(precision, sk_precision[::-1])


def test_pixel_auroc_equals_image_auroc_on_flattened_data(rng):
    masks = blob_masks(rng, 4, 16)
    maps = np.round(rng.random(masks.shape, dtype=np.float32) + 0.3 * masks, 2)
    expected = metrics.image_auroc(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-15)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()))
    assert metrics.pixel_auroc(masks.astype(int).tolist(), maps.tolist()) == pytest.approx(expected)


def test_auroc_known_cases():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.image_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert metrics.image_auprc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.booleans(), min_size=2, max_size=40).filter(lambda x: 0 < sum(x) < len(x)),
    data=st.data(),
)
def test_auroc_invariant_under_monotone_transform(labels, data):
    scores = np.array(
        data.draw(st.lists(st.integers(-20, 20), min_size=len(labels), max_size=len(labels))), dtype=float
    )
    auroc = metrics.image_auroc(labels, scores)
    assert metrics.image_auroc(labels, np.exp(scores / 4) * 3 - 1) == pytest.approx(auroc)
    assert metrics.image_auroc(labels, -scores) == pytest.approx(1 - auroc)
    assert metrics.image_auprc(labels, scores**3) == pytest.approx(metrics.image_auprc(labels, scores))


# --- thresholds and classification ---------------------------------------------------------


def test_f1_optimal_threshold_separable():
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.3, 0.2, 0.8, 0.5]
    threshold = metrics.f1_optimal_threshold(labels, scores)
    assert threshold == 0.5  # >= convention: the lowest anomalous score itself
    assert metrics.classification_report(labels, scores, threshold)["f1"] == 1.0


def test_f1_optimal_threshold_beats_every_score(rng):
    labels = rng.integers(0, 2, size=80)
    scores = np.round(rng.normal(size=80) + labels, 1)
    threshold = metrics.f1_optimal_threshold(labels, scores)
    best = metrics.classification_report(labels, scores, threshold)
    for t in np.unique(scores):
        assert metrics.classification_report(labels, scores, t)["f1"] <= best["f1"] + 1e-12


def test_sigma_threshold_known_answer():
    assert metrics.sigma_threshold([1, 2, 3, 4, 5]) == pytest.approx(3 + 3 * np.sqrt(2))
    assert metrics.sigma_threshold(np.array([2.0, 4.0]), k=1.0) == pytest.approx(4.0)
    with pytest.raises(ScoreError, match="empty"):
        metrics.sigma_threshold([])


def test_classification_report_known_answer():
    report = metrics.classification_report([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.7, 0.9], 0.6)
    assert report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert report["precision"] == pytest.approx(2 / 3)
    assert report["recall"] == pytest.approx(2 / 3)
    assert report["f1"] == pytest.approx(2 / 3)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["threshold"] == 0.6


def test_classification_report_without_positive_predictions():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = metrics.classification_report([0, 1, 1], [0.1, 0.2, 0.3], threshold=5.0)
    assert report["confusion_matrix"] == [[1, 0], [2, 0]]
    assert report["precision"] == report["recall"] == report["f1"] == 0.0
    assert report["accuracy"] == pytest.approx(1 / 3)


# --- evaluate ------------------------------------------------------------------------------


def test_evaluate_collects_every_metric(rng):
    masks = blob_masks(rng, 6, 16)
    maps = rng.random(masks.shape, dtype=np.float32) + masks
    labels = masks.any(axis=(1, 2))
    scores = maps.max(axis=(1, 2))
    result = metrics.evaluate(labels, scores, 1.0, masks=masks, maps=maps)
    assert list(result) == [
        "image_auroc",
        "image_auprc",
        "pixel_auroc",
        "aupro",
        "f1",
        "precision",
        "recall",
        "accuracy",
        "confusion_matrix",
        "threshold",
    ]
    assert json.loads(json.dumps(result)) == result
    assert all(type(result[key]) is float for key in result if key != "confusion_matrix")
    assert result["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
    assert result["aupro"] == metrics.aupro(masks, maps)


def test_evaluate_without_pixel_ground_truth():
    labels, scores = [0, 1, 0, 1], [0.2, 0.9, 0.1, 0.4]
    assert metrics.evaluate(labels, scores, 0.5)["pixel_auroc"] is None
    empty = metrics.evaluate(labels, scores, 0.5, np.zeros((4, 3, 3)), np.ones((4, 3, 3)))
    assert empty["pixel_auroc"] is None and empty["aupro"] is None
    with pytest.raises(ScoreError, match="without maps"):
        metrics.evaluate(labels, scores, 0.5, masks=np.zeros((4, 3, 3)))


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_and_maps_raise(bad):
    labels, scores = [0, 1, 0], [0.1, bad, 0.3]
    for func in (metrics.image_auroc, metrics.image_auprc, metrics.f1_optimal_threshold, metrics.roc_curve):
        with pytest.raises(ScoreError, match="NaN or infinite"):
            func(labels, scores)
    with pytest.raises(ScoreError, match="NaN or infinite"):
        metrics.classification_report(labels, scores, 0.5)
    with pytest.raises(ScoreError, match="NaN or infinite"):
        metrics.sigma_threshold(scores)
    masks = np.array([[[0, 1], [0, 0]]])
    maps = np.array([[[0.1, bad], [0.2, 0.3]]], dtype=np.float32)
    for func in (metrics.pixel_auroc, metrics.aupro):
        with pytest.raises(ScoreError, match="NaN or infinite"):
            func(masks, maps)


def test_single_class_labels_raise():
    for func in (metrics.image_auroc, metrics.image_auprc, metrics.roc_curve):
        with pytest.raises(ScoreError, match="both normal"):
            func([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ScoreError, match="both normal"):
        metrics.pixel_auroc(np.zeros((2, 3, 3)), np.ones((2, 3, 3)))


def test_mismatched_inputs_raise():
    with pytest.raises(ScoreError, match="length"):
        metrics.image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ScoreError, match="1-D"):
        metrics.image_auroc([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ScoreError, match="shape"):
        metrics.pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 8, 8)))
    with pytest.raises(ScoreError, match="0/1"):
        metrics.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ScoreError, match="empty"):
        metrics.classification_report([], [], 0.5)
