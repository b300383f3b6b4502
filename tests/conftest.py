"""Shared fixtures: a tiny MVTec-layout data set built on the fly, and fast detector settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 128
DEFECT = 20


def texture(rng: np.random.Generator) -> np.ndarray:
    """A (SIZE, SIZE, 3) uint8 striped fabric-like texture with mild random variation."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    base = 0.5 + 0.25 * np.sin(xx / 3.0 + phase) * np.cos(yy / 5.0)
    img = base[..., None] * np.array([0.9, 0.8, 0.6]) + rng.normal(0, 0.02, (SIZE, SIZE, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def add_defect(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Paint a dark red square; return the image, its (SIZE, SIZE) bool mask and the square's corner."""
    y, x = (int(v) for v in rng.integers(16, SIZE - 16 - DEFECT, 2))
    out = img.copy()
    out[y : y + DEFECT, x : x + DEFECT] = (150, 20, 20)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y : y + DEFECT, x : x + DEFECT] = True
    return out, mask, (y, x)


def make_category(
    root: Path, name: str = "toy", n_train: int = 10, n_good: int = 3, n_bad: int = 3, seed: int = 0
) -> Path:
    """Write `<root>/<name>` in MVTec AD layout; returns `root`."""
    rng = np.random.default_rng(seed)
    cat = root / name
    for folder in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (cat / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture(rng)).save(cat / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(texture(rng)).save(cat / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        img, mask, _ = add_defect(texture(rng), rng)
        Image.fromarray(img).save(cat / "test/blob" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(cat / "ground_truth/blob" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """A read-only-by-convention tiny data set: category `toy` (10 train, 3 good + 3 `blob` test)."""
    return make_category(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture
def fast() -> dict:
    """Detector settings that keep tests quick: real offline weights, small images, CPU."""
    return {"backbone": "efficientnet_lite0", "image_size": SIZE, "device": "cpu"}


def patchcore_file(folder: Path) -> Path:
    """A small but complete PatchCore model file, without fitting (the random backbone is instant)."""
    import torch

    from anomap import PatchCore

    det = PatchCore(backbone="efficientnet_lite0", weights="random", image_size=64, device="cpu")
    gen = torch.Generator().manual_seed(0)
    det.memory_bank_ = torch.randn(50, det._embedding_dim(), generator=gen)
    det.normal_scores_ = torch.rand(10, generator=gen).numpy()
    det.grid_ = (8, 8)
    det.fitted_ = True
    det.set_threshold(1.5)
    return det.save(folder / "m.anomap")


# float32 results of one computation done two ways (BatchNorm folded or not, another memory layout,
# another number of threads or vector width) differ by rounding that grows with the depth of the
# network and with the magnitude of the values, not with each element's own size: compare the
# largest difference with the largest magnitude. 1e-4 is about 800 float32 ulps of that magnitude.
SCALED_TOLERANCE = 1e-4


def assert_close_scaled(actual, expected, rel: float = SCALED_TOLERANCE) -> None:
    """max |actual - expected| <= rel * max |expected|, for torch tensors or numpy arrays."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"shapes {a.shape} and {e.shape}"
    err, scale = float(np.abs(a - e).max(initial=0)), float(np.abs(e).max(initial=0))
    assert err <= rel * scale, f"largest difference {err:.3g} exceeds {rel:g} x largest magnitude {scale:.3g}"
