"""Per-run plots and per-image inspection pictures: valid PNG files, thinned curves, known pixels."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap import metrics
from anomap._images import Preprocess, png_bytes
from anomap.pictures import (
    JET,
    PREDICTED_RGB,
    TRUTH_RGB,
    PictureQueue,
    aligned_image,
    heat_range,
    heatmap_overlay,
    inspection_picture,
    outline,
)
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


def test_scores_too_close_for_a_density_still_plot(tmp_path):
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.0, 1e-300, 0.0, 2.0, 2.0 + 4e-16])  # distinct, but zero variance in float
    result = metrics.classification_report(labels, scores, 1.5)
    for path in write_plots(tmp_path, labels, scores, result).values():
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


def test_jet_colours_are_matplotlibs():
    from matplotlib import colormaps

    np.testing.assert_allclose(JET, colormaps["jet"](np.arange(256))[:, :3], rtol=0, atol=1e-12)


def test_heatmap_colours_known_values():
    image = np.zeros((2, 3, 3), np.uint8)
    amap = np.array([[-1.0, 0.0, 0.5], [0.999, 1.0, 9.0]], np.float32)  # already at the image size
    out = heatmap_overlay(image, amap, 0.0, 1.0, alpha=1.0)
    # below vmin: the coldest colour, at and above vmax: the hottest; in between floor(256 * value)
    expected = np.rint(255 * JET[[0, 0, 128, 255, 255, 255]]).reshape(2, 3, 3)
    np.testing.assert_array_equal(out, expected)
    half = heatmap_overlay(np.full((2, 3, 3), 200, np.uint8), amap, 0.0, 1.0, alpha=0.5)
    np.testing.assert_array_equal(half, np.rint(0.5 * expected + 100))


def test_heat_range_puts_the_fit_threshold_two_thirds_up():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    lo, hi = heat_range(scores)
    mean, std = 2.5, np.sqrt(1.25)
    assert (lo, hi) == pytest.approx((mean - 3 * std, mean + 6 * std))
    assert (metrics.sigma_threshold(scores) - lo) / (hi - lo) == pytest.approx(2 / 3)
    assert heat_range(np.array([5.0])) == pytest.approx((3.5, 8.0))  # no spread: a tenth of the mean
    assert heat_range(np.array([0.0, 0.0])) == (-3.0, 6.0)


def test_picture_queue_runs_every_job_holds_few_and_reports_failures():
    running, most, done = [], [0], []
    lock = threading.Lock()

    def job(i):
        with lock:
            running.append(i)
            most[0] = max(most[0], len(running) - len(done))
        time.sleep(0.01)
        with lock:
            done.append(i)

    with PictureQueue(workers=2, limit=3) as queue:
        for i in range(20):
            queue.submit(job, i)
            assert i + 1 - len(done) <= 3 + 1  # submit waits while 3 jobs are pending
    assert sorted(done) == list(range(20)) and most[0] <= 2

    def fail():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        with PictureQueue() as queue:
            queue.submit(fail)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (9, 1, 3), (1, 9), (37, 53, 3), (64, 64), (5, 300, 3)])
@pytest.mark.parametrize("runs", [False, True])
def test_png_files_decode_to_the_same_pixels(shape, runs):
    array = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    array[: shape[0] // 2] = 7  # flat rows too
    data = png_bytes(array, runs)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == ("L" if len(shape) == 2 else "RGB")
        np.testing.assert_array_equal(np.asarray(img), array)


def test_png_refuses_other_arrays():
    for array in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            png_bytes(array)
