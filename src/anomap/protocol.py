"""The evaluation protocol: seeded train/validation/test splits of a category and thresholds
calibrated on the validation split, then applied unchanged to the test split. (Fitting on a
split and calibrating a saved model are jobs of `anomap.runs`.)

Splits of one category, for a seed:

- train: about `train_fraction` (80%) of `train/good`, the only images a detector is fitted on;
- val: the rest of `train/good` (the normals that the `sigma` threshold is computed from) plus
  `val_fraction` (30%) of each defect type's test images (which the `f1` threshold needs);
- test: every other test image, so all of `test/good`, and the remaining anomalous images with
  their masks. `test/good` is not drawn from: the held-out part of `train/good` already gives
  the validation normals, and the test split keeps every normal test image.

Files are sorted by path and shuffled by a NumPy generator seeded from the seed, the category
name and the part being split (through SHA-256, never Python's `hash()`), so a seed gives the
same files on every machine.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import metrics
from ._io import write_text
from ._rng import stable_rng
from .data import MVTecAD, Sample, describe
from .errors import AnomapError

if TYPE_CHECKING:
    from .detectors import Detector

__all__ = ["THRESHOLDS", "Split", "calibrate", "split_category", "threshold_from_scores", "write_split_csv"]

THRESHOLDS = ("f1", "sigma")


@dataclass(frozen=True)
class Split:
    """The three disjoint parts of one category's images."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def parts(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def counts(self) -> dict[str, dict]:
        """`anomap.data.describe` of each part."""
        return {name: describe(samples) for name, samples in self.parts().items()}


def _take(samples: list[Sample], fraction: float, rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """Split samples (sorted by path first) into a random `fraction` and the rest, both path-sorted.

    With two or more samples both parts get at least one.
    """
    samples = sorted(samples, key=lambda s: str(s.path))
    n = len(samples)
    k = int(round(fraction * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    chosen = set(rng.permutation(n)[:k].tolist())
    return ([s for i, s in enumerate(samples) if i in chosen], [s for i, s in enumerate(samples) if i not in chosen])


def split_category(data: MVTecAD, seed: int = 42, train_fraction: float = 0.8, val_fraction: float = 0.3) -> Split:
    """Seeded train/val/test split of one category (see the module docstring).

    Args:
        data: the category.
        seed: same seed, same files.
        train_fraction: share of `train/good` fitted on; the rest are validation normals.
        val_fraction: share of each defect type's test images moved to validation.

    Raises:
        AnomapError: a fraction outside (0, 1), or fewer than two training images.
    """
    for name, value in (("train_fraction", train_fraction), ("val_fraction", val_fraction)):
        if not 0 < value < 1:
            raise AnomapError(f"{name} must be between 0 and 1 (exclusive), got {value}")
    if len(data.train) < 2:
        raise AnomapError(
            f"{data.root / data.category}: a split needs at least 2 training images, found {len(data.train)}"
        )
    train, val = _take(data.train, train_fraction, stable_rng(seed, data.category, "train/good"))
    test = [s for s in data.test if s.label == 0]
    for defect in sorted({s.defect for s in data.test if s.label == 1}):
        of_defect = [s for s in data.test if s.label == 1 and s.defect == defect]
        to_val, to_test = _take(of_defect, val_fraction, stable_rng(seed, data.category, "test", defect))
        val += to_val
        test += to_test
    return Split(train, val, test)


def write_split_csv(split: Split, path: str | Path, root: str | Path) -> Path:
    """Write the split as CSV (path relative to `root`, split, label, defect, mask), atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "split", "label", "defect", "mask"])
    for name, samples in split.parts().items():
        for s in samples:
            mask = "" if s.mask_path is None else Path(s.mask_path).relative_to(root).as_posix()
            writer.writerow([Path(s.path).relative_to(root).as_posix(), name, s.label, s.defect, mask])
    write_text(path, buf.getvalue())
    return Path(path)


def threshold_from_scores(labels: np.ndarray, scores: np.ndarray, method: str = "f1", k: float = 3.0) -> float:
    """Decision threshold from validation scores.

    Args:
        labels: (N,) 0 normal, 1 anomalous.
        scores: (N,) image scores.
        method: "f1" (a threshold maximizing F1, halfway between the lowest score flagged and the
            highest score not flagged; needs both labels) or "sigma" (mean + k
            standard deviations of the normal images' scores).
        k: the sigma multiplier.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if method == "f1":
        # Halfway to the highest score left normal: the same validation decisions, with the
        # margin split between the two classes instead of sitting on the lowest flagged score.
        best = metrics.f1_optimal_threshold(labels, scores)
        below = scores[scores < best]
        return float((best + below.max()) / 2) if below.size else best
    if method == "sigma":
        return metrics.sigma_threshold(scores[labels == 0], k)
    raise AnomapError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLDS)}")


def calibrate(det: Detector, val: Sequence[Sample], method: str = "f1", k: float = 3.0) -> float:
    """Score `val`, compute the threshold with `threshold_from_scores`, set it on `det`; return it."""
    if method not in THRESHOLDS:
        raise AnomapError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLDS)}")
    scores = det.predict(list(val)).scores
    threshold = threshold_from_scores(np.array([s.label for s in val]), scores, method, k)
    det.set_threshold(threshold)
    return threshold
