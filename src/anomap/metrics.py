"""Evaluation metrics: image- and pixel-level AUROC, AUPRC, AUPRO, thresholds and F1.

Conventions shared by every function:

- ``labels`` (N,) and ``masks`` (N, H, W) hold 0/1 or True/False, 1 marking an anomaly;
  ``scores`` (N,) and ``maps`` (N, H, W) are finite, higher meaning more anomalous.
  Lists are accepted wherever arrays are.
- A score ``s`` is predicted anomalous at threshold ``t`` when ``s >= t``.
- Curves are exact, with one step per distinct score: no threshold grid.
- Values become the smallest float type that holds them exactly (float32 maps stay
  float32), so pixel metrics over many maps need only a few copies of the maps.
- Inconsistent or non-finite inputs raise :class:`~anomap.errors.ScoreError`.
"""

import numpy as np
from scipy import ndimage

from anomap.errors import ScoreError

__all__ = [
    "aupro",
    "classification_report",
    "evaluate",
    "f1_optimal_threshold",
    "image_auprc",
    "image_auroc",
    "pixel_auroc",
    "pr_curve",
    "pro_curve",
    "roc_curve",
    "sigma_threshold",
]

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


def _as_finite(values, name: str) -> np.ndarray:
    """Returns `values` as the smallest float array holding them exactly; rejects NaN/inf."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ScoreError(f"{name} must be numeric, got an array of dtype {arr.dtype}.")
    arr = arr.astype(np.result_type(arr.dtype, np.float32), copy=False)
    # min/max propagate NaN and expose inf without allocating a mask the size of the maps.
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ScoreError(
            f"{name} contain {bad} NaN or infinite value(s) out of {arr.size}; "
            "fix the scoring step that produced them before computing metrics."
        )
    return arr


def _as_binary(values, name: str) -> np.ndarray:
    """Returns `values` as a bool array; rejects anything but 0/1 or True/False."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ScoreError(f"{name} must hold 0/1 or True/False values, got dtype {arr.dtype}.")
    binary = arr == 1
    if not np.all(binary | (arr == 0)):
        raise ScoreError(f"{name} must hold only 0/1 or True/False values; binarize them first (e.g. mask > 0).")
    return binary


def _check_image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validates image-level inputs. Returns labels (N,) bool and scores (N,) float."""
    labels = _as_binary(labels, "labels")
    scores = _as_finite(scores, "scores")
    if labels.ndim != 1 or scores.ndim != 1:
        raise ScoreError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}.")
    if len(labels) != len(scores):
        raise ScoreError(
            f"labels and scores differ in length ({len(labels)} vs {len(scores)}); pass one score per labelled image."
        )
    if len(labels) == 0:
        raise ScoreError("labels and scores are empty; metrics need at least one image.")
    return labels, scores


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    """Raises ScoreError unless `labels` holds both True and False."""
    if labels.all() or not labels.any():
        raise ScoreError(
            f"{what} needs both normal (0) and anomalous (1) ground truth, but all "
            f"{labels.size} values are {int(labels.flat[0])}; evaluate on a set with both."
        )


def _check_pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Validates pixel-level inputs. Returns masks (N, H, W) bool and maps (N, H, W) float."""
    masks = _as_binary(masks, "masks")
    maps = _as_finite(maps, "maps")
    if masks.ndim != 3 or masks.shape != maps.shape or masks.size == 0:
        raise ScoreError(
            f"masks and maps must have the same non-empty (N, H, W) shape, got {masks.shape} "
            f"and {maps.shape}; resize the maps to the mask resolution first."
        )
    return masks, maps


def _count_at_least(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Counts, for each threshold, how many of `sorted_values` (ascending) are >= it."""
    return len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="left")


def _split_sorted(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the scores of positives and of negatives, each sorted ascending."""
    pos, neg = scores[labels], scores[~labels]
    pos.sort()
    neg.sort()
    return pos, neg


def _auroc_from_split(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a positive outscores a negative, ties counting one half.

    Equals the trapezoidal area under the ROC curve. `neg` must be sorted ascending.
    """
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2 * len(pos) * len(neg)))


def _curve_counts(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts per distinct threshold, highest threshold first.

    Returns:
        thresholds (K,), true positives (K,), false positives (K,) at ``score >= threshold``;
        the last entries are the numbers of positives and negatives.
    """
    labels, scores = _check_image_inputs(labels, scores)
    _require_both_classes(labels, what)
    pos, neg = _split_sorted(labels, scores)
    thresholds = np.unique(scores)[::-1]
    return thresholds, _count_at_least(pos, thresholds), _count_at_least(neg, thresholds)


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct score. Returns fpr (K+1,), tpr (K+1,) from (0, 0)."""
    _, tp, fp = _curve_counts(labels, scores, "ROC curve")
    return np.concatenate(([0.0], fp / fp[-1])), np.concatenate(([0.0], tp / tp[-1]))


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve, one point per distinct score after a first point (0, 1).

    Returns:
        recall (K+1,) non-decreasing, precision (K+1,).
    """
    _, tp, fp = _curve_counts(labels, scores, "precision-recall curve")
    return np.concatenate(([0.0], tp / tp[-1])), np.concatenate(([1.0], tp / (tp + fp)))


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve (trapezoidal, so tied scores count one half)."""
    labels, scores = _check_image_inputs(labels, scores)
    _require_both_classes(labels, "image AUROC")
    return _auroc_from_split(*_split_sorted(labels, scores))


def image_auprc(labels, scores) -> float:
    """Area under the precision-recall curve as average precision.

    That is the sum over distinct thresholds of precision times the recall gained there, with
    no interpolation, as scikit-learn's ``average_precision_score``.
    """
    recall, precision = pr_curve(labels, scores)
    return float(np.sum(np.diff(recall) * precision[1:]))


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels of all images: :func:`image_auroc` of the flattened arrays."""
    masks, maps = _check_pixel_inputs(masks, maps)
    _require_both_classes(masks, "pixel AUROC")
    return _auroc_from_split(*_split_sorted(masks, maps))


def _region_weighted_positives(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, ...]:
    """Scores of the anomalous pixels and the PRO of every suffix of them.

    A pixel of a region of S pixels weighs 1 / (S * number of regions), so the weights of the
    pixels above a threshold sum to the mean per-region overlap.

    Returns:
        scores (P,) ascending, pro (P+1,) where ``pro[i]`` is the PRO of ``scores[i:]``.
    """
    scores, weights, n_regions = [], [], 0
    for mask, amap in zip(masks, maps):
        if not mask.any():
            continue
        regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
        sizes = np.bincount(regions.ravel())
        scores.append(amap[mask])
        weights.append(1.0 / sizes[regions[mask]])
        n_regions += count
    scores, weights = np.concatenate(scores), np.concatenate(weights) / n_regions
    order = np.argsort(scores, kind="stable")
    scores, weights = scores[order], weights[order]
    return scores, np.append(np.cumsum(weights[::-1])[::-1], 0.0)


def pro_curve(masks, maps, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against false positive rate, up to `fpr_limit` (MVTec AD).

    Regions are the 8-connected components of each mask. At threshold t, PRO is the mean over
    all regions of all images of the fraction of the region's pixels scoring >= t; FPR is the
    fraction of all normal pixels scoring >= t. Between two consecutive distinct normal scores
    the FPR is constant, so each step is a vertical segment then a corner. The curve starts at
    (0, 0) and ends at ``fpr == fpr_limit``, interpolated linearly.

    Args:
        fpr_limit: Largest FPR of the curve, in (0, 1].

    Returns:
        fpr (M,) and pro (M,), both non-decreasing.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ScoreError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    masks, maps = _check_pixel_inputs(masks, maps)
    _require_both_classes(masks, "pixel AUPRO")
    pos, pro_of_suffix = _region_weighted_positives(masks, maps)
    neg = maps[~masks]
    neg.sort()
    # Only the highest normal scores matter, plus one beyond the limit to interpolate.
    top = neg[::-1][: min(len(neg), int(fpr_limit * len(neg)) + 1)]
    thresholds = top[np.concatenate(([True], top[1:] != top[:-1]))]  # (K,) descending
    fpr = _count_at_least(neg, thresholds) / len(neg)
    pro_at = pro_of_suffix[np.searchsorted(pos, thresholds, side="left")]  # scores >= t
    pro_above = pro_of_suffix[np.searchsorted(pos, thresholds, side="right")]  # scores > t
    # Vertical segments (previous fpr, pro_above) only where PRO rose since the last corner.
    rises = np.flatnonzero(pro_above != np.concatenate(([0.0], pro_at[:-1])))
    where = np.concatenate(([0], rises))
    x = np.insert(fpr, where, np.concatenate(([0.0], np.where(rises > 0, fpr[rises - 1], 0.0))))
    y = np.insert(pro_at, where, np.concatenate(([0.0], pro_above[rises])))
    return _clip_curve(x, y, fpr_limit)


def _clip_curve(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a curve with non-decreasing x at ``x == limit``, interpolating the last point."""
    end = int(np.searchsorted(x, limit, side="right"))
    if end == len(x) or x[end - 1] == limit:
        return x[:end], y[:end]
    y_limit = y[end - 1] + (y[end] - y[end - 1]) * (limit - x[end - 1]) / (x[end] - x[end - 1])
    return np.append(x[:end], limit), np.append(y[:end], y_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Trapezoidal area under :func:`pro_curve`, divided by `fpr_limit`.

    1.0 is a perfect localization, about ``fpr_limit / 2`` a random one.
    """
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    return float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2 / fpr_limit)


def f1_optimal_threshold(labels, scores) -> float:
    """Threshold t maximizing F1 when ``score >= t`` is predicted anomalous.

    Candidates are the distinct scores; among equally good ones the highest is returned.
    """
    thresholds, tp, fp = _curve_counts(labels, scores, "F1-optimal threshold")
    f1 = 2 * tp / (tp + fp + tp[-1])
    return float(thresholds[np.argmax(f1)])


def sigma_threshold(normal_scores, k: float = 3.0) -> float:
    """Mean plus `k` population standard deviations (ddof=0) of normal images' scores (N,)."""
    scores = _as_finite(normal_scores, "normal_scores").astype(np.float64).ravel()
    if scores.size == 0:
        raise ScoreError("normal_scores is empty; score at least one normal image first.")
    if not np.isfinite(k):
        raise ScoreError(f"k must be a finite number, got {k}.")
    return float(scores.mean() + k * scores.std())


def classification_report(labels, scores, threshold: float) -> dict:
    """Binary classification metrics when ``score >= threshold`` is predicted anomalous.

    Precision, recall and F1 are 0.0 when there is no true positive (so also when nothing is
    predicted anomalous), without warnings.

    Returns:
        Dict with ``f1``, ``precision``, ``recall``, ``accuracy`` (floats),
        ``confusion_matrix`` ``[[tn, fp], [fn, tp]]`` (ints) and ``threshold`` (float).
    """
    labels, scores = _check_image_inputs(labels, scores)
    if not np.isfinite(threshold):
        raise ScoreError(f"threshold must be a finite number, got {threshold}.")
    predicted = scores >= threshold
    tp = int(np.count_nonzero(predicted & labels))
    fp = int(np.count_nonzero(predicted & ~labels))
    fn = int(np.count_nonzero(~predicted & labels))
    tn = len(labels) - tp - fp - fn
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "precision": tp / (tp + fp) if tp else 0.0,
        "recall": tp / (tp + fn) if tp else 0.0,
        "accuracy": (tp + tn) / len(labels),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": float(threshold),
    }


def evaluate(labels, scores, threshold: float, masks=None, maps=None) -> dict:
    """Every metric of this module in one JSON-serializable dict.

    Args:
        threshold: Decision threshold of the classification metrics.
        masks: Optional ground truth; without it, or when no mask has an anomalous pixel,
            ``pixel_auroc`` and ``aupro`` are None.
        maps: Anomaly maps, required with `masks`.

    Returns:
        Dict with ``image_auroc``, ``image_auprc``, ``pixel_auroc``, ``aupro`` and the keys of
        :func:`classification_report`.
    """
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_auprc": image_auprc(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
    }
    if masks is not None:
        if maps is None:
            raise ScoreError("masks were given without maps; pass both to get pixel metrics.")
        masks, maps = _check_pixel_inputs(masks, maps)
        if masks.any():
            result["pixel_auroc"] = pixel_auroc(masks, maps)
            result["aupro"] = aupro(masks, maps)
    return result | classification_report(labels, scores, threshold)
