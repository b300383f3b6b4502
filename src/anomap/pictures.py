"""Per-image pictures, written as PNG: heatmap overlays, binary segmentation masks and the
inspection picture (input, heatmap with ground truth, predicted segmentation), drawn with PIL
rather than matplotlib because one is drawn for every test image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ._images import Preprocess
from ._io import atomic_path


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
        vmin, vmax: map values shown as the coldest and hottest colour.
        alpha: weight of the heatmap.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    values = resize_map(amap, image.shape[:2])
    norm = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = colormaps["jet"](norm)[..., :3] * 255
    return (alpha * heat + (1 - alpha) * image).round().astype(np.uint8)


def save_png(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array (H, W) or (H, W, 3) as PNG, atomically."""
    with atomic_path(path) as tmp:
        # level 1: about 5x faster than the default 6 for ~15% larger files; one is written per image
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def save_heatmap(path: Path, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> None:
    """Write the heatmap overlay of `amap` on `image` (see `heatmap_overlay`)."""
    save_png(path, heatmap_overlay(image, amap, vmin, vmax))


def save_segmentation(path: Path, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Write an (S, S) bool mask, resized (nearest) to (H, W), as a 0/255 PNG."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    save_png(path, np.asarray(img))


PANEL_CAPTIONS = ("input", "anomaly map, ground truth in green", "segmentation at the threshold")
TRUTH_RGB = np.array([0, 255, 0], np.uint8)
PREDICTED_RGB = np.array([255, 40, 40], np.uint8)
_GAP, _HEADER, _CAPTION = 6, 44, 20


def aligned_image(image: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8 with the resize and crop the model saw, so maps line up."""
    return np.asarray(preprocess._resize(Image.fromarray(image), Image.Resampling.BILINEAR))


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool -> (H, W) bool band of `width` pixels along the inside of each region's border."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)


def _panel_mask(mask: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127


def inspection_picture(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, threshold: float,
                       truth: np.ndarray | None, title: tuple[str, str], panel: int = 256) -> np.ndarray:
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
