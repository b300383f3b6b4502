"""Per-run plots and per-image inspection pictures: valid PNG files, thinned curves, known pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap import metrics
from anomap._images import Preprocess
from anomap.pictures import PREDICTED_RGB, TRUTH_RGB, aligned_image, inspection_picture, outline
from anomap.plots import pixel_curves, thin_curve, write_plots


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()


@pytest.fixture
def run_data():
    """Labels (N,), scores (N,), masks and maps (N, 32, 32) with a 6x6 defect per anomalous image."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 5)
    scores = rng.normal(0, 1, 11) + 2.5 * labels
    masks = np.zeros((11, 32, 32), bool)
    masks[labels == 1, 10:16, 12:18] = True
    maps = rng.normal(0, 1, masks.shape).astype(np.float32) + 2.0 * masks
    return labels, scores, masks, maps


def test_thin_curve_keeps_ends_and_order():
    x = np.sort(np.random.default_rng(1).uniform(0, 1, 50_000))
    y = np.sqrt(x)
    tx, ty = thin_curve(x, y, max_points=500)
    assert len(tx) <= 502
    assert (tx[0], ty[0], tx[-1], ty[-1]) == (x[0], y[0], x[-1], y[-1])
    assert np.all(np.diff(tx) >= 0) and np.all(np.diff(ty) >= 0)
    assert np.max(np.abs(ty - np.sqrt(tx))) == 0  # only original points are kept


def test_thin_curve_leaves_short_curves_alone():
    x, y = np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])
    tx, ty = thin_curve(x, y)
    np.testing.assert_array_equal(tx, x)
    np.testing.assert_array_equal(ty, y)


def test_thin_curve_keeps_a_single_step():
    # a step curve: 10k points on the vertical, 10k on the horizontal part
    x = np.concatenate([np.zeros(10_000), np.linspace(0, 1, 10_000)])
    y = np.concatenate([np.linspace(0, 1, 10_000), np.ones(10_000)])
    tx, ty = thin_curve(x, y, max_points=100)
    assert np.any((tx == 0) & (ty > 0.9)) and np.any((tx > 0.9) & (ty == 1))


def test_pixel_curves_end_points_and_absent_masks(run_data):
    _, _, masks, maps = run_data
    curves = pixel_curves(masks, maps, max_points=300)
    assert curves["roc"]["fpr"][-1] == 1.0 and curves["roc"]["tpr"][-1] == 1.0
    assert len(curves["roc"]["fpr"]) <= 302
    assert curves["pro"]["fpr"][-1] == pytest.approx(0.3)
    fpr, pro = np.array(curves["pro"]["fpr"]), np.array(curves["pro"]["pro"])
    area = np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2 / 0.3
    assert area == pytest.approx(metrics.aupro(masks, maps), abs=0.01)
    assert pixel_curves(np.zeros_like(masks), maps) is None


def test_write_plots_with_and_without_pixels(tmp_path, run_data):
    labels, scores, masks, maps = run_data
    result = metrics.evaluate(labels, scores, 1.0, masks=masks, maps=maps)
    plots = write_plots(tmp_path / "full", labels, scores, result, pixel_curves(masks, maps))
    assert list(plots) == ["ROC", "Precision-recall", "PRO", "Score distributions", "Confusion matrix"]
    for path in plots.values():
        assert_png(path)
    plots = write_plots(tmp_path / "image_only", labels, scores, result)
    assert "PRO" not in plots and len(plots) == 4


def test_write_plots_one_class_and_tied_scores(tmp_path):
    labels, scores = np.zeros(4, int), np.ones(4)
    result = metrics.classification_report(labels, scores, 1.0)
    plots = write_plots(tmp_path, labels, scores, result)
    assert list(plots) == ["Score distributions", "Confusion matrix"]
    for path in plots.values():
        assert_png(path)


def test_outline_of_a_square():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    band = outline(mask, width=1)
    assert band.sum() == 6 * 4 - 4
    assert not band[3:7, 3:7].any() and band[2, 2:8].all()
    assert not outline(np.zeros((4, 4), bool)).any()


def test_inspection_picture_layout_and_colours():
    image = np.full((64, 64, 3), 128, np.uint8)
    amap = np.zeros((64, 64), np.float32)
    amap[20:40, 20:40] = 1.0
    truth = np.zeros((64, 64), bool)
    truth[10:30, 10:30] = True
    pic = inspection_picture(image, amap, 0.0, 1.0, 0.5, truth, ("score 1 >= threshold 0.5: anomalous", "x"), panel=64)
    assert pic.shape == (44 + 20 + 64, 3 * 64 + 12, 3) and pic.dtype == np.uint8
    panels = pic[64:]
    heat, seg = panels[:, 70:134], panels[:, 140:204]
    assert (heat[10, 15] == TRUTH_RGB).all() and (seg[10, 15] == TRUTH_RGB).all()  # top edge of the truth
    assert (seg[20, 35] == PREDICTED_RGB).all()  # top edge of the prediction
    assert (panels[:, :64] == 128).all()  # the input is untouched
    plain = inspection_picture(image, amap, 0.0, 1.0, 0.5, None, ("a", "b"), panel=64)
    assert not (plain[64:] == TRUTH_RGB).all(axis=-1).any()


def test_aligned_image_follows_the_crop():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white
    out = aligned_image(image, Preprocess(size=40, crop=20))
    assert out.shape == (20, 20, 3)
    assert out[:, 0].max() < 30 and out[:, -1].min() > 225  # the centre crop straddles the edge
