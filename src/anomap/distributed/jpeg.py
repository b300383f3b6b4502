"""JPEG files decoded and preprocessed on the scoring device (torchvision's nvJPEG decoder on a
GPU, batched), for throughputs that decoding and resizing on the host cannot feed.

The result follows `Preprocess.image` (antialiased bilinear resize, centre crop, normalisation)
but with other decoder and resize arithmetic, so scores are close to, not identical with, those
of images decoded on the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .._images import Preprocess, _open, _orientation
from ..errors import DataError

JPEG_MAGIC = b"\xff\xd8\xff"


def read_jpeg(path: str | Path) -> tuple[np.ndarray, int]:
    """A JPEG file's bytes, (N,) uint8, and its EXIF orientation (1 = as stored), its header
    checked as `load_image` checks it (and parsed once).

    Raises:
        DataError: the file fails `load_image`'s header checks, or is not a JPEG file.
    """
    path = Path(path)
    with _open(path) as img:
        orientation = _orientation(img, path)
    data = np.fromfile(path, np.uint8)
    if data[:3].tobytes() != JPEG_MAGIC:
        raise DataError(f"{path}: not a JPEG file; decoding on the GPU reads JPEG only (use the cpu decoder)")
    return data, orientation


def decode_jpegs(
    data: np.ndarray, sizes: np.ndarray, orientations: np.ndarray, preprocess: Preprocess, device: torch.device
) -> torch.Tensor:
    """Concatenated JPEG files -> preprocessed images.

    Args:
        data: (sum(sizes),) uint8, the files' bytes one after the other.
        sizes: (B,) int, each file's length.
        orientations: (B,) int, each file's EXIF orientation (see `read_jpeg`).
        preprocess: the detector's `preprocess_`.
        device: where to decode ("cuda" uses nvJPEG) and return the result.

    Returns:
        (B, 3, S, S) float32 on `device`.
    """
    files = list(torch.from_numpy(np.ascontiguousarray(data)).split(np.asarray(sizes).tolist()))
    decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)  # nvJPEG ignores EXIF: see _orient
    images = [_orient(img, int(o)) for img, o in zip(decoded, orientations)]
    if len({tuple(img.shape) for img in images}) == 1:
        resized = _resize(torch.stack(images), preprocess)
    else:
        resized = torch.cat([_resize(img[None], preprocess) for img in images])
    mean = torch.tensor(preprocess.mean, device=resized.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess.std, device=resized.device).view(1, 3, 1, 1) * 255
    return (resized - mean) / std


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> as displayed, for EXIF orientations 1-8 (as PIL's exif_transpose)."""
    if orientation in (5, 6, 7, 8):  # a quarter turn, after a mirror for 5 and 7
        mirrored = image.flip(2) if orientation in (5, 7) else image
        image = torch.rot90(mirrored, 1 if orientation in (5, 8) else -1, (1, 2))
    elif orientation in (2, 3, 4):
        image = image.flip({2: (2,), 3: (1, 2), 4: (1,)}[orientation])
    return image


def _resize(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """(B, 3, H, W) uint8 of one size -> (B, 3, S, S) float32 in [0, 255], rounded as 8-bit
    pixels, with the geometry of `Preprocess._resize`."""
    h, w = images.shape[2:]
    if preprocess.resize == "square":
        size = (preprocess.size, preprocess.size)
    else:
        scale = preprocess.size / min(w, h)
        size = (max(preprocess.size, round(h * scale)), max(preprocess.size, round(w * scale)))
    out = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255)
    if preprocess.crop is None:
        return out
    top, left = round((size[0] - preprocess.crop) / 2), round((size[1] - preprocess.crop) / 2)
    return out[:, :, top : top + preprocess.crop, left : left + preprocess.crop]
