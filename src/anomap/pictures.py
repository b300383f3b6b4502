"""Per-image pictures: heatmap overlays and binary segmentation masks, written as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

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
        Image.fromarray(array).save(tmp, format="PNG")


def save_heatmap(path: Path, image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> None:
    """Write the heatmap overlay of `amap` on `image` (see `heatmap_overlay`)."""
    save_png(path, heatmap_overlay(image, amap, vmin, vmax))


def save_segmentation(path: Path, mask: np.ndarray, shape: tuple[int, int]) -> None:
    """Write an (S, S) bool mask, resized (nearest) to (H, W), as a 0/255 PNG."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    save_png(path, np.asarray(img))
