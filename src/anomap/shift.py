"""Domain shift: seeded geometric, photometric and illumination changes applied jointly to images
and their masks, and a shifted copy of a category in MVTec AD layout.

Per image, with parameters drawn from the seed and the image's relative path:

- geometric, same transform for image and mask (mask by nearest neighbour, so it stays binary):
  rotation in [-10, 10] degrees; a random resized crop of scale [0.9, 1.0] (area fraction) and
  aspect ratio [0.9, 1.1], placed uniformly inside the image; a translation of up to 5% of the
  side in each direction. Pixels that come from outside the image are mirrored back in (for the
  mask too, so mirrored defects stay marked);
- photometric, image only: brightness, contrast and saturation factors in [0.7, 1.3]; a Gaussian
  blur with a kernel of 3 or 5 pixels (sigma in [0.1, 2.0]); Gaussian noise with sigma in
  [0.01, 0.05] on the [0, 1] scale;
- illumination, image only, on half of the images: a linear gradient from a random side, or a
  radial one centred on the image centre or on a random point of an edge, darkening by a factor
  in [0.4, 0.7] at the dark end, smoothed by a Gaussian of sigma 80 px per 1024 px of image side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ._images import save_png
from ._io import refuse_inside
from ._rng import stable_rng
from .data import MVTecAD, Sample, load_image, load_mask
from .errors import DataError

__all__ = ["shift_category", "shift_image", "shift_samples", "shifted_sample"]

log = logging.getLogger(__name__)

MAX_TRANSLATION = 0.05
_ILLUMINATION_STEP = 8  # the light field is built at 1/8 of the image size, then resized


def _geometry(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Affine map from output to input pixel coordinates (y, x): (2, 2) matrix and (2,) offset."""
    h, w = shape
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale, ratio = rng.uniform(0.9, 1.0), np.exp(rng.uniform(np.log(0.9), np.log(1.1)))
    crop_h, crop_w = min(h, h * np.sqrt(scale / ratio)), min(w, w * np.sqrt(scale * ratio))
    shift = np.array(
        [rng.uniform(-(h - crop_h) / 2, (h - crop_h) / 2), rng.uniform(-(w - crop_w) / 2, (w - crop_w) / 2)]
    )
    shift += rng.uniform(-MAX_TRANSLATION, MAX_TRANSLATION, 2) * (h, w)
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.array([[cos, -sin], [sin, cos]]) @ np.diag([crop_h / h, crop_w / w])
    centre = (np.array(shape) - 1) / 2
    return matrix, centre + shift - matrix @ centre


def _warp(channel: np.ndarray, matrix: np.ndarray, offset: np.ndarray, order: int) -> np.ndarray:
    return ndimage.affine_transform(channel, matrix, offset, order=order, mode="mirror")


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> same, with brightness, contrast, saturation, blur and noise."""
    img = img * rng.uniform(0.7, 1.3)
    gray = img @ np.array([0.299, 0.587, 0.114])
    img = (img - gray.mean()) * rng.uniform(0.7, 1.3) + gray.mean()
    gray = (img @ np.array([0.299, 0.587, 0.114]))[..., None]
    img = np.clip(gray + (img - gray) * rng.uniform(0.7, 1.3), 0, 1)
    size, sigma = int(rng.choice([3, 5])), rng.uniform(0.1, 2.0)
    taps = np.exp(-0.5 * (np.arange(size) - size // 2) ** 2 / sigma**2)
    for axis in (0, 1):
        img = ndimage.convolve1d(img, taps / taps.sum(), axis=axis, mode="reflect")
    return img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape)


def _light_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) multiplicative illumination in [dark, 1]: a smoothed linear or radial gradient."""
    h, w = shape
    sh, sw = max(2, -(-h // _ILLUMINATION_STEP)), max(2, -(-w // _ILLUMINATION_STEP))
    yy, xx = np.mgrid[0:sh, 0:sw] / np.array([sh - 1, sw - 1])[:, None, None]
    dark = rng.uniform(0.4, 0.7)
    if rng.random() < 0.5:
        ramp = [yy, 1 - yy, xx, 1 - xx][rng.integers(4)]  # 0 at the dark side
    else:
        centre = (0.5, 0.5) if rng.random() < 0.5 else _edge_point(rng)
        dist = np.hypot((yy - centre[0]) * h, (xx - centre[1]) * w)
        ramp = dist / dist.max()
    field = dark + (1 - dark) * ramp
    sigma = 80 * max(h, w) / 1024 / _ILLUMINATION_STEP
    field = ndimage.gaussian_filter(field, sigma, mode="nearest").astype(np.float32)
    return np.asarray(Image.fromarray(field).resize((w, h), Image.BILINEAR))


def _edge_point(rng: np.random.Generator) -> tuple[float, float]:
    t = rng.uniform()
    return [(0.0, t), (1.0, t), (t, 0.0), (t, 1.0)][rng.integers(4)]


def shift_image(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one random shift (module docstring) to an image and its mask.

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool, or None.
        rng: the source of every parameter.

    Returns:
        (H, W, 3) uint8 image and (H, W) bool mask (None when `mask` is None).
    """
    if mask is not None and mask.shape != image.shape[:2]:
        raise DataError(f"mask of shape {mask.shape} does not match its image of shape {image.shape[:2]}")
    matrix, offset = _geometry(rng, image.shape[:2])
    warped = np.stack([_warp(image[..., c].astype(np.float32), matrix, offset, 1) for c in range(3)], axis=-1)
    out = _photometric(warped / 255.0, rng)
    if rng.random() < 0.5:
        out = out * _light_field(rng, image.shape[:2])[..., None]
    out = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    if mask is None:
        return out, None
    return out, _warp(mask.astype(np.uint8), matrix, offset, 0).astype(bool)


def shifted_sample(sample: Sample, src_root: str | Path, dst_root: str | Path) -> Sample:
    """Where `shift_samples` writes `sample`: same relative folder, PNG, masks `<stem>_mask.png`."""
    rel = Path(sample.path).relative_to(src_root)
    path = Path(dst_root) / rel.with_suffix(".png")
    mask = None
    if sample.mask_path is not None:
        mask_rel = Path(sample.mask_path).relative_to(src_root)
        mask = Path(dst_root) / mask_rel.parent / f"{rel.stem}_mask.png"
    return Sample(path, sample.label, sample.defect, mask)


def shift_samples(
    samples: Sequence[Sample], src_root: str | Path, dst_root: str | Path, seed: int = 42, overwrite: bool = False
) -> list[Sample]:
    """Write a shifted copy of each sample (and mask) under `dst_root`; return the copies' Samples.

    Each image's parameters come from `seed` and its path relative to `src_root`, so the copy of
    one image does not depend on which other images are shifted. Existing copies are kept unless
    `overwrite`.

    Raises:
        AnomapError: `dst_root` is `src_root` or lies inside it (the originals would be overwritten
            or mixed with their copies).
    """
    refuse_inside(dst_root, [src_root])
    out = []
    for sample in tqdm(samples, desc="shift", unit="img", leave=False):
        copy = shifted_sample(sample, src_root, dst_root)
        out.append(copy)
        if copy.path.exists() and (copy.mask_path is None or copy.mask_path.exists()) and not overwrite:
            continue
        rng = stable_rng(seed, Path(sample.path).relative_to(src_root).as_posix())
        mask = None if sample.mask_path is None else load_mask(sample.mask_path)
        image, mask = shift_image(load_image(sample.path), mask, rng)
        copy.path.parent.mkdir(parents=True, exist_ok=True)
        save_png(copy.path, image)
        if mask is not None:
            copy.mask_path.parent.mkdir(parents=True, exist_ok=True)
            save_png(copy.mask_path, mask.astype(np.uint8) * 255)
    return out


def shift_category(
    root: str | Path, category: str, out_root: str | Path, seed: int = 42, overwrite: bool = False
) -> Path:
    """Write a shifted copy of `<root>/<category>` (train, test, ground_truth) to `<out_root>/<category>`."""
    data = MVTecAD(root, category)
    shift_samples(data.train + data.test, root, out_root, seed, overwrite)
    log.info("shifted %s into %s", category, out_root)
    return Path(out_root) / category
