"""Fuzzing the loaders and the metrics: any input gives a valid result or an AnomapError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from anomap import metrics
from anomap.data import MIN_SIDE, load_image, load_mask
from anomap.errors import AnomapError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on damaged TIFF tags

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# (numpy dtype, PIL mode it is written as, or None for PIL's choice)
PIXEL_TYPES = [
    ("uint8", None),
    ("uint16", None),
    ("int32", None),
    ("float32", None),
    ("bool", None),
    ("uint8", "P"),
    ("uint8", "CMYK"),
    ("uint8", "LA"),
    ("uint8", "RGBA"),
]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"]
ANOMAP_FORMATS = {"PNG", "JPEG", "BMP", "TIFF"}  # the decoders anomap runs; the others are refused


def _check_image(path: Path) -> bool:
    """Loads `path` or gets an AnomapError; returns whether it loaded."""
    try:
        img = load_image(path)
    except AnomapError:
        return False
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert min(img.shape[:2]) >= MIN_SIDE
    return True


def _check_mask(path: Path) -> None:
    try:
        mask = load_mask(path)
    except AnomapError:
        return
    assert mask.dtype == bool and mask.ndim == 2


def _encoded(array: np.ndarray, mode: str | None, fmt: str) -> bytes | None:
    """`array` written by PIL as `fmt`, or None where PIL cannot write that combination."""
    buf = io.BytesIO()
    try:
        img = Image.fromarray(array)
        if mode is not None:
            img = img.convert(mode)
        img.save(buf, format=fmt)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return buf.getvalue()


@st.composite
def arrays(draw) -> tuple[np.ndarray, str | None]:
    dtype, mode = draw(st.sampled_from(PIXEL_TYPES))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([None, 3, 4])) if dtype == "uint8" and mode is None else None
    shape = (h, w) if channels is None else (h, w, channels)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5, mode
    if dtype == "float32":
        return rng.normal(0, 100, shape).astype(np.float32), mode
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), shape, endpoint=True).astype(dtype), mode


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif", ".txt"]))
def test_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    _check_image(path)
    _check_mask(path)


@FUZZ
@given(
    spec=arrays(),
    fmt=st.sampled_from(FORMATS),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=4),
)
def test_written_images_then_damaged(tmp_path, spec, fmt, cut, flips):
    """Valid files of many pixel types, optionally truncated or with flipped bits."""
    data = _encoded(*spec, fmt)
    if data is None:
        return
    data = bytearray(data if cut is None else data[: int(len(data) * cut)])
    for where, bit in flips:
        if data:
            data[min(int(where * len(data)), len(data) - 1)] ^= 1 << bit
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(bytes(data))
    loaded = _check_image(path)
    _check_mask(path)
    array, _ = spec
    usable = fmt in ANOMAP_FORMATS and array.dtype != np.float32 and min(array.shape[:2]) >= MIN_SIDE
    if cut is None and not flips and usable:
        assert loaded, "an undamaged image in a supported format was refused"


@FUZZ
@given(spec=arrays())
def test_valid_png_keeps_its_size(tmp_path, spec):
    array, mode = spec
    data = _encoded(array, mode, "PNG")
    if data is None or min(array.shape[:2]) < MIN_SIDE:
        return
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        image = load_image(path)
    except AnomapError as err:  # only floating-point pixels are refused
        assert "floating-point" in str(err)
        return
    assert image.shape == (*array.shape[:2], 3)
    assert load_mask(path).shape == array.shape[:2]


SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 1e30])


@st.composite
def metric_inputs(draw):
    n = draw(st.integers(0, 6))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, draw(st.sampled_from([n, n + 1]))).astype(
        draw(st.sampled_from(["int64", "bool", "float64"]))
    )
    scores = rng.normal(size=draw(st.sampled_from([(n,), (n, 1), (n + 1,)]))).astype(
        draw(st.sampled_from(["float32", "float64"]))
    )
    masks = rng.integers(0, draw(st.sampled_from([2, 3])), (n, h, w))
    maps = rng.normal(size=draw(st.sampled_from([(n, h, w), (n, w, h), (n, h)]))).astype(np.float32)
    for arr in (scores, maps):
        if arr.size and draw(st.booleans()):
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(SPECIAL)
    return labels, scores, masks, maps, draw(SPECIAL)


@FUZZ
@given(inputs=metric_inputs())
def test_metrics_valid_or_score_error(inputs):
    labels, scores, masks, maps, threshold = inputs
    calls = [
        lambda: metrics.image_auroc(labels, scores),
        lambda: metrics.image_auprc(labels, scores),
        lambda: metrics.pixel_auroc(masks, maps),
        lambda: metrics.aupro(masks, maps),
        lambda: metrics.f1_optimal_threshold(labels, scores),
        lambda: metrics.classification_report(labels, scores, threshold)["f1"],
        lambda: metrics.evaluate(labels, scores, threshold, masks=masks, maps=maps)["image_auroc"],
    ]
    for call in calls:
        try:
            value = call()
        except AnomapError:
            continue
        assert np.isfinite(value)
        if call is not calls[4]:
            assert 0.0 <= value <= 1.0 + 1e-9


@pytest.mark.parametrize("bad", [[[0, 1], [1]], ["a", "b"], [None, 1.0], [1 + 2j, 0j]])
def test_metrics_reject_non_numeric(bad):
    with pytest.raises(AnomapError):
        metrics.image_auroc([0, 1], np.array(bad, dtype=object))
