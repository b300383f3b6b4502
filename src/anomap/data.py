"""Datasets (MVTec AD layout and plain folders), image and mask loading, preprocessing, batching."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._images import (
    DECODE_THREADS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_SIDE,
    SUFFIXES_TEXT,
    Preprocess,
    image_size,
    is_image_file,
    list_images,
    load_image,
    load_mask,
)
from .errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_SIDE",
    "ImageFolder",
    "MVTecAD",
    "Preprocess",
    "Sample",
    "categories",
    "describe",
    "image_size",
    "iter_batches",
    "list_images",
    "load_image",
    "load_mask",
    "load_masks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image: label 0 is normal, 1 anomalous; `mask_path` None means an all-zero mask."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"{folder}: cannot list the folder ({err.strerror})") from err


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted; hidden and other files are skipped."""
    return [p for p in _listdir(folder) if is_image_file(p)]


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in _listdir(folder) if not p.name.startswith(".") and p.is_dir()]


def _pair_masks(images: list[Path], masks: list[Path], image_dir: Path) -> dict[Path, Path]:
    """Match masks to the images of `image_dir` by file stem: `<stem>_mask.<ext>` or `<stem>.<ext>`.

    Raises:
        DataError: two images share a stem, a mask matches no image or two images, or an
            image has two masks.
    """
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise DataError(
                f"{image} and {by_stem[image.stem]} share a file stem, so masks cannot be matched to them; rename one"
            )
        by_stem[image.stem] = image
    pairs: dict[Path, Path] = {}
    for mask in masks:
        stems = sorted({mask.stem, mask.stem.removesuffix("_mask")} & by_stem.keys())
        if not stems:
            raise DataError(
                f"{mask}: no image in {image_dir} is named "
                f"{mask.stem.removesuffix('_mask')}.*; remove the mask or add its image"
            )
        if len(stems) > 1:
            raise DataError(f"{mask}: matches both {by_stem[stems[0]]} and {by_stem[stems[1]]}; rename one of them")
        image = by_stem[stems[0]]
        if image in pairs:
            raise DataError(f"{image} has two masks, {pairs[image]} and {mask}; keep one")
        pairs[image] = mask
    return pairs


def _anomalous_samples(image_dir: Path, defect: str, mask_dir: Path | None, hint: str) -> list[Sample]:
    """Samples of label 1; with `mask_dir`, every image must have exactly one mask there."""
    images = _images_in(image_dir)
    if mask_dir is None:
        return [Sample(p, 1, defect, None) for p in images]
    masks = _images_in(mask_dir) if mask_dir.is_dir() else []
    pairs = _pair_masks(images, masks, image_dir)
    missing = [p for p in images if p not in pairs]
    if missing:
        more = f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
        raise DataError(
            f"{missing[0]}: no mask {mask_dir / (missing[0].stem + '_mask.png')}{more}; add the masks, or {hint}"
        )
    return [Sample(p, 1, defect, pairs[p]) for p in images]


class MVTecAD:
    """One category of a dataset in MVTec AD layout.

    `<root>/<category>/train/good/*` are the training images; `test/<defect>/*` the test images
    (label 0 for `good`); `ground_truth/<defect>/<stem>_mask.png` their masks, paired by stem.
    Without a `ground_truth` folder the category has no masks (`has_masks` False) and every
    `mask_path` is None; `ground_truth/good`, if present, is ignored.

    Raises:
        DataError: a missing folder, an empty `train/good`, an anomalous image without mask
            or a mask without image.
    """

    def __init__(self, root: str | Path, category: str) -> None:
        self.root = Path(root)
        self.category = category
        folder = self.root / category
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found")
        if not folder.is_dir():
            known = ", ".join(categories(self.root)) or "none"
            raise DataError(f"{folder}: no such category; categories found: {known}")
        self.has_masks = (folder / "ground_truth").is_dir()
        self.train = self._train(folder / "train" / "good")
        self.test = self._test(folder)
        log.debug("%s: %d train, %d test images", folder, len(self.train), len(self.test))

    @staticmethod
    def _train(good: Path) -> list[Sample]:
        if not good.is_dir():
            raise DataError(f"{good}: training folder not found; MVTec AD layout needs train/good")
        images = _images_in(good)
        if not images:
            raise DataError(f"{good}: no training images ({SUFFIXES_TEXT})")
        return [Sample(p, 0, "good", None) for p in images]

    def _test(self, folder: Path) -> list[Sample]:
        test, truth = folder / "test", folder / "ground_truth"
        if not test.is_dir():
            return []
        samples = []
        for defect_dir in _subfolders(test):
            defect = defect_dir.name
            if defect == "good":
                samples += [Sample(p, 0, "good", None) for p in _images_in(defect_dir)]
            else:
                mask_dir = truth / defect if self.has_masks else None
                hint = f"delete {truth} to use the category without masks"
                samples += _anomalous_samples(defect_dir, defect, mask_dir, hint)
        if self.has_masks:
            for mask_dir in _subfolders(truth):
                masks = _images_in(mask_dir)
                if mask_dir.name != "good" and masks and not (test / mask_dir.name).is_dir():
                    raise DataError(f"{masks[0]}: no folder {test / mask_dir.name} holds its image")
        return samples


def categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under `root` that hold `train/good`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return [p.name for p in _subfolders(root) if (p / "train" / "good").is_dir()]


class ImageFolder:
    """Images from the user's own folders (images directly inside; sub-folders are not searched).

    Args:
        good: folder of normal images (label 0, defect "good").
        anomalous: folder of anomalous images (label 1, defect = the folder's name).
        masks: folder of masks for the anomalous images, `<stem>_mask.<ext>` or `<stem>.<ext>`;
            every anomalous image needs one.

    Raises:
        DataError: neither folder given, a folder missing or empty, masks not matching.
    """

    def __init__(
        self, good: str | Path | None = None, anomalous: str | Path | None = None, masks: str | Path | None = None
    ) -> None:
        if good is None and anomalous is None:
            raise DataError("ImageFolder needs a folder of good images, of anomalous images, or both")
        if masks is not None and anomalous is None:
            raise DataError(f"{masks}: masks given without a folder of anomalous images")
        self.good = None if good is None else Path(good)
        self.anomalous = None if anomalous is None else Path(anomalous)
        self.masks = None if masks is None else Path(masks)
        self.has_masks = self.masks is not None
        if self.masks is not None and not self.masks.is_dir():
            raise DataError(f"{self.masks}: mask folder not found")
        for folder in (self.good, self.anomalous):
            if folder is not None:
                self._require_images(folder)
        self.samples: list[Sample] = []
        if self.good is not None:
            self.samples += [Sample(p, 0, "good", None) for p in _images_in(self.good)]
        if self.anomalous is not None:
            defect = self.anomalous.resolve().name
            self.samples += _anomalous_samples(self.anomalous, defect, self.masks, "leave the masks folder out")

    @staticmethod
    def _require_images(folder: Path) -> None:
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found")
        if not _images_in(folder):
            raise DataError(f"{folder}: no images ({SUFFIXES_TEXT}) directly inside; sub-folders are not searched")


def _prepared(item: Sample | str | os.PathLike | np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        return preprocess.image(item)
    return preprocess.image(load_image(item.path if isinstance(item, Sample) else item))


def _tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


# decoding threads: two on small machines, up to eight where there are cores to feed a GPU


def _prefetched_batches(items: Sequence, preprocess: Preprocess, batch_size: int) -> Iterator[torch.Tensor]:
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="anomap-data")
    try:

        def submit(k: int) -> list[Future]:
            return [pool.submit(_prepared, x, preprocess) for x in chunks[k]] if k < len(chunks) else []

        pending = submit(0)
        for k in range(len(chunks)):
            current, pending = pending, submit(k + 1)  # decode batch k+1 while batch k is used
            # np.stack is single-threaded; torch.stack's intra-op threads fight the decoders for cores
            yield torch.from_numpy(np.stack([f.result().numpy() for f in current]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(
    images: Sequence[Sample | str | Path | np.ndarray] | torch.Tensor, preprocess: Preprocess, batch_size: int = 32
) -> Iterator[torch.Tensor]:
    """Preprocessed images in order, `batch_size` at a time (the last batch may be smaller).

    Args:
        images: Samples, image paths and (H, W, 3) uint8 arrays, mixed freely; or an
            already preprocessed (N, 3, S, S) float tensor, which is only split into batches.
        preprocess: resizing and normalisation; S is `preprocess.output_size`.
        batch_size: images per batch.

    Yields:
        (B, 3, S, S) float32 tensors. Files are decoded by 2-8 threads (half the cores), one batch ahead.

    Raises:
        DataError: an image file cannot be used (raised when its batch is reached).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(images, torch.Tensor):
        size = preprocess.output_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"expected a (N, 3, {size}, {size}) tensor, got shape {tuple(images.shape)}")
        return _tensor_batches(images, batch_size)
    for i, item in enumerate(images):
        if not isinstance(item, (Sample, str, os.PathLike, np.ndarray)):
            raise TypeError(f"images[{i}] is a {type(item).__name__}; expected a Sample, a path or an array")
    return _prefetched_batches(images, preprocess, batch_size)


def _prepared_mask(sample: Sample, preprocess: Preprocess) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros((preprocess.output_size,) * 2, dtype=bool)
    mask = load_mask(sample.mask_path)
    if mask.shape != image_size(sample.path):
        (mh, mw), (ih, iw) = mask.shape, image_size(sample.path)
        raise DataError(
            f"{sample.mask_path} is {mw}x{mh} pixels but its image {sample.path} is "
            f"{iw}x{ih}; a mask must match its image pixel for pixel"
        )
    return preprocess.mask(mask)


def load_masks(samples: Sequence[Sample], preprocess: Preprocess) -> np.ndarray:
    """Ground-truth masks resized like the images: (N, S, S) bool, all False where `mask_path` is None.

    Raises:
        DataError: a mask cannot be read, or its size differs from its image's.
    """
    size = preprocess.output_size
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="anomap-data") as pool:
        masks = list(pool.map(_prepared_mask, samples, [preprocess] * len(samples)))
    return np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)


def describe(samples: Sequence[Sample]) -> dict:
    """Counts for printing: total, normal, anomalous, with_mask, and per defect (sorted by name)."""
    anomalous = sum(s.label == 1 for s in samples)
    return {
        "total": len(samples),
        "normal": len(samples) - anomalous,
        "anomalous": anomalous,
        "with_mask": sum(s.mask_path is not None for s in samples),
        "defects": dict(sorted(Counter(s.defect for s in samples).items())),
    }
