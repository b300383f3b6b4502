"""Per-image pictures, written as PNG: heatmap overlays, binary segmentation masks and the
inspection picture (input, heatmap with ground truth, predicted segmentation), drawn with numpy
and PIL rather than matplotlib because one is drawn for every scored image.

Heatmap colours come from the model, not from the other images of a run (`heat_range`), so an
image's picture does not depend on what it was scored with and pictures can be drawn while the
next images are scored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ._images import Preprocess, save_png

__all__ = [
    "PICTURES",
    "PictureQueue",
    "aligned_image",
    "heat_range",
    "heatmap_overlay",
    "inspection_picture",
    "outline",
    "resize_map",
    "save_heatmap",
    "save_png",
    "save_segmentation",
    "segmentation",
    "write_pictures",
]

PICTURES = ("none", "mask", "heatmap", "both")


def _jet(size: int = 256) -> np.ndarray:
    """(size, 3) float64 RGB in [0, 1]: matplotlib's "jet" colour map, sampled as it samples it."""
    x = np.linspace(0, 1, size)
    red = np.interp(x, [0, 0.35, 0.66, 0.89, 1], [0, 0, 1, 1, 0.5])
    green = np.interp(x, [0, 0.125, 0.375, 0.64, 0.91, 1], [0, 0, 1, 1, 0, 0])
    blue = np.interp(x, [0, 0.11, 0.34, 0.65, 1], [0.5, 1, 1, 0, 0])
    return np.stack([red, green, blue], axis=1)


JET = _jet()


def heat_range(normal_scores: np.ndarray) -> tuple[float, float]:
    """Heatmap colour scale of a model: mean - 3 std (coldest) to mean + 6 std (hottest) of its
    (m,) normal image scores, so the fit-time threshold (mean + 3 std) is yellow, two thirds up.

    Image scores are the hottest values of the maps, so normal texture stays blue and defects
    turn yellow to red. Without spread (one normal score) the std is taken as a tenth of |mean|.
    """
    scores = np.asarray(normal_scores, np.float64)
    mean, std = float(scores.mean()), float(scores.std())
    std = std or abs(mean) / 10 or 1.0
    return mean - 3 * std, mean + 6 * std


def resize_map(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (S, S) float map to (H, W)."""
    if amap.shape == tuple(shape):
        return amap.astype(np.float32)
    img = Image.fromarray(amap.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an image.

    Args:
        image: (H, W, 3) uint8 RGB.
        amap: (S, S) anomaly map, resized to the image.
        vmin, vmax: map values shown as the coldest and hottest colour (e.g. `heat_range`).
        alpha: weight of the heatmap.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    values = resize_map(amap, image.shape[:2])
    # colour index as matplotlib computes it: floor(256 * normalised value), 1.0 -> 255
    index = np.clip((values - np.float32(vmin)) * np.float32(len(JET) / max(vmax - vmin, 1e-12)), 0, len(JET) - 1)
    heat = (alpha * 255 * JET).astype(np.float32)[index.astype(np.uint8)]  # (H, W, 3)
    heat += np.float32(1 - alpha) * image
    return np.rint(heat, out=heat).astype(np.uint8)


def save_heatmap(path: Path, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> None:
    """Write the heatmap overlay of `amap` on `image` (see `heatmap_overlay`)."""
    save_png(path, heatmap_overlay(image, amap, vmin, vmax), runs=True, durable=False)


def segmentation(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) bool mask -> (H, W) uint8 0/255, resized nearest-neighbour."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img)


def save_segmentation(path: Path, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Write an (S, S) bool mask, resized (nearest) to (H, W), as a 0/255 PNG."""
    save_png(path, segmentation(mask, shape), runs=True, durable=False)


def write_pictures(
    folder: Path,
    stem: str,
    image: np.ndarray,
    amap: np.ndarray,
    scale: tuple[float, float],
    threshold: float | None,
    which: str = "both",
) -> None:
    """Write an image's `<stem>_heatmap.png` and/or `<stem>_mask.png` (map >= threshold; none
    without a threshold) at the image's size into `folder`, as `which` (one of PICTURES) asks.

    Args:
        image: (H, W, 3) uint8 RGB; amap: its (S, S) anomaly map; scale: (vmin, vmax) colours.
    """
    if which in ("heatmap", "both"):
        save_heatmap(folder / f"{stem}_heatmap.png", image, amap, *scale)
    if which in ("mask", "both") and threshold is not None:
        save_segmentation(folder / f"{stem}_mask.png", amap >= threshold, image.shape[:2])


PANEL_CAPTIONS = ("input", "anomaly map, ground truth in green", "segmentation at the threshold")
TRUTH_RGB = np.array([0, 255, 0], np.uint8)
PREDICTED_RGB = np.array([255, 40, 40], np.uint8)
_GAP, _HEADER, _CAPTION = 6, 44, 20


def aligned_image(image: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8 with the resize and crop the model saw, so maps line up."""
    return preprocess.pixels(image)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool -> (H, W) bool band of `width` pixels along the inside of each region's border."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)


def _panel_mask(mask: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127


def inspection_picture(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    threshold: float,
    truth: np.ndarray | None,
    title: tuple[str, str],
    panel: int = 256,
) -> np.ndarray:
    """Input, heatmap overlay and predicted segmentation side by side under a two-line title.

    Args:
        image: (S, S, 3) uint8 input, aligned with the map (see `aligned_image`).
        amap: (S, S) anomaly map; `vmin`/`vmax` are its coldest and hottest colours.
        threshold: map values >= it form the predicted segmentation (red).
        truth: (S, S) bool ground-truth mask, outlined in green, or None.
        title: two text lines; the first is drawn in red when it ends with "anomalous".
        panel: side of each of the three square panels, in pixels.

    Returns:
        (44 + 20 + panel, 3 * panel + 12, 3) uint8 RGB.
    """
    base = np.asarray(Image.fromarray(image).resize((panel, panel), Image.BILINEAR))
    heat = heatmap_overlay(base, amap, vmin, vmax)
    predicted = _panel_mask(amap >= threshold, panel)
    seg = (0.6 * base).astype(np.uint8)
    seg[predicted] = (0.5 * seg[predicted] + 0.5 * PREDICTED_RGB).astype(np.uint8)
    seg[outline(predicted, 1)] = PREDICTED_RGB
    if truth is not None:
        band = outline(_panel_mask(truth, panel))
        heat[band] = TRUTH_RGB
        seg[band] = TRUTH_RGB
    canvas = Image.new("RGB", (3 * panel + 2 * _GAP, _HEADER + _CAPTION + panel), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    colour = (200, 0, 0) if title[0].endswith("anomalous") else (0, 110, 0)
    draw.text((4, 3), title[0], fill=colour, font=font)
    draw.text((4, 23), title[1], fill=(40, 40, 40), font=font)
    for k, (caption, pixels) in enumerate(zip(PANEL_CAPTIONS, (base, heat, seg))):
        left = k * (panel + _GAP)
        draw.text((left + 2, _HEADER + 3), caption, fill=(70, 70, 70), font=small)
        canvas.paste(Image.fromarray(pixels), (left, _HEADER + _CAPTION))
    return np.asarray(canvas)


class PictureQueue:
    """Draws and writes pictures in background threads while the caller goes on scoring.

    At most `limit` jobs wait: beyond that `submit` blocks, so a fast producer never holds more
    than `limit` decoded images. Used as a context manager; leaving it waits for every job and
    raises the first failure (a failure also stops later `submit` calls).
    """

    def __init__(self, workers: int = 1, limit: int = 32) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anomap-pictures")
        self._slots = threading.BoundedSemaphore(limit)
        self._error: BaseException | None = None

    def submit(self, job: Callable[..., None], *args: object) -> None:
        """Run `job(*args)` in the background."""
        self._raise_failure()
        self._slots.acquire()
        self._pool.submit(job, *args).add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None and self._error is None:
            self._error = future.exception()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> PictureQueue:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._pool.shutdown(wait=True, cancel_futures=error is not None)
        if error is None:
            self._raise_failure()
