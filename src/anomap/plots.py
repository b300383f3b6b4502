"""Per-run plots, written as PNG with matplotlib's Agg renderer: ROC, precision-recall and PRO
curves, score distributions and the confusion matrix.

Figures are built with `matplotlib.figure.Figure`, not pyplot, so no global state or GUI backend
is involved and plotting is safe in any process. matplotlib and scipy.stats are imported when a
plot is drawn: `pixel_curves` and `thin_curve` need numpy only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import metrics
from ._io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NORMAL_COLOUR, ANOMALOUS_COLOUR, THRESHOLD_COLOUR = "tab:blue", "tab:red", "black"
MAX_POINTS = 2000


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most about `max_points` points of a curve, evenly spaced along its length.

    Both axes are scaled to their range first, so steps on either axis survive. The first and
    last points are always kept. Returns (x, y), each (M,), M <= max_points + 2.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) <= max_points:
        return x, y
    sx, sy = np.ptp(x) or 1.0, np.ptp(y) or 1.0
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x) / sx, np.diff(y) / sy))))
    keep = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    keep = np.unique(np.concatenate(([0], keep.clip(0, len(x) - 1), [len(x) - 1])))
    return x[keep], y[keep]


def pixel_curves(masks: np.ndarray, maps: np.ndarray, max_points: int = MAX_POINTS) -> dict | None:
    """Thinned pixel ROC and PRO (up to FPR 0.3) curves as JSON-ready lists.

    Args:
        masks: (N, H, W) bool ground truth; maps: (N, H, W) anomaly maps.

    Returns:
        {"roc": {"fpr", "tpr"}, "pro": {"fpr", "pro"}}, or None when the masks do not hold both
        normal and anomalous pixels.
    """
    if not masks.any() or masks.all():
        return None
    # rates, clipped to [0, 1]: averaging overlaps can round a full overlap to 1 + 5e-14
    roc = np.clip(thin_curve(*metrics.roc_curve(masks.ravel(), maps.ravel()), max_points), 0, 1)
    pro = np.clip(thin_curve(*metrics.pro_curve(masks, maps, fpr_limit=0.3), max_points), 0, 1)
    return {
        "roc": {"fpr": roc[0].tolist(), "tpr": roc[1].tolist()},
        "pro": {"fpr": pro[0].tolist(), "pro": pro[1].tolist()},
    }


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_roc(
    path: Path,
    labels: np.ndarray,
    scores: np.ndarray,
    image_auroc: float | None,
    pixel: dict | None = None,
    pixel_auroc: float | None = None,
) -> Path:
    """Image ROC curve of `labels`/`scores` (N,), plus the pixel one from `pixel_curves` if given."""
    fig = _figure((5, 4.5))
    ax = fig.add_subplot()
    fpr, tpr = metrics.roc_curve(labels, scores)
    ax.plot(fpr, tpr, drawstyle="steps-post", label=f"image (AUROC {_fmt(image_auroc)})")
    if pixel is not None:
        ax.plot(pixel["roc"]["fpr"], pixel["roc"]["tpr"], label=f"pixel (AUROC {_fmt(pixel_auroc)})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(-0.01, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pr(path: Path, labels: np.ndarray, scores: np.ndarray, auprc: float | None) -> Path:
    """Image precision-recall curve; the dotted line is the share of anomalous images."""
    fig = _figure((5, 4.5))
    ax = fig.add_subplot()
    recall, precision = metrics.pr_curve(labels, scores)
    ax.plot(recall, precision, drawstyle="steps-post", label=f"image (AUPRC {_fmt(auprc)})")
    ax.axhline(np.mean(labels), ls=":", color="grey", label="chance")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1.01), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_pro(path: Path, pixel: dict, aupro: float | None) -> Path:
    """PRO against pixel FPR up to 0.3, from `pixel_curves`."""
    fig = _figure((5, 4.5))
    ax = fig.add_subplot()
    ax.plot(pixel["pro"]["fpr"], pixel["pro"]["pro"], label=f"AUPRO@0.3 {_fmt(aupro)}")
    ax.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title="PRO", xlim=(0, 0.3), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _save(fig, path)


def _kde(ax, values: np.ndarray, grid: np.ndarray, colour: str, label: str) -> None:
    """Gaussian KDE of `values`, skipped when it is undefined (fewer than 2 distinct values, or
    values so close that their variance is zero in floating point)."""
    if len(np.unique(values)) < 2:
        return
    from scipy import stats

    try:
        density = stats.gaussian_kde(values)(grid)
    except np.linalg.LinAlgError:
        return
    ax.plot(grid, density, color=colour, label=label)
    ax.fill_between(grid, density, color=colour, alpha=0.15)


def plot_scores(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> Path:
    """Scores of normal vs anomalous images as histogram, KDE and box plot, threshold dashed."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    groups = [(scores[~labels], NORMAL_COLOUR, "normal"), (scores[labels], ANOMALOUS_COLOUR, "anomalous")]
    groups = [g for g in groups if len(g[0])]
    fig = _figure((12, 4))
    hist, kde, box = fig.subplots(1, 3)
    lo, hi = min(scores.min(), threshold or scores.min()), max(scores.max(), threshold or scores.max())
    pad = 0.1 * (hi - lo or 1.0)
    bins = np.linspace(lo - pad, hi + pad, 31)
    grid = np.linspace(lo - 3 * pad, hi + 3 * pad, 400)
    for values, colour, label in groups:
        hist.hist(values, bins=bins, color=colour, alpha=0.55, label=f"{label} ({len(values)})")
        _kde(kde, values, grid, colour, label)
    box.boxplot([g[0] for g in groups])
    box.set_xticks(range(1, len(groups) + 1), [g[2] for g in groups])
    if threshold is not None:
        for ax in (hist, kde):
            ax.axvline(threshold, color=THRESHOLD_COLOUR, ls="--", label=f"threshold {threshold:.4g}")
        box.axhline(threshold, color=THRESHOLD_COLOUR, ls="--")
    hist.set(xlabel="image score", ylabel="images", title="Histogram")
    from matplotlib.ticker import MaxNLocator

    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    kde.set(xlabel="image score", ylabel="density", title="Kernel density")
    box.set(ylabel="image score", title="Box plot")
    hist.legend()
    kde.legend()
    return _save(fig, path)


def plot_confusion(path: Path, matrix: list[list[int]]) -> Path:
    """Confusion matrix [[tn, fp], [fn, tp]] with counts in the cells."""
    counts = np.asarray(matrix)
    fig = _figure((4.2, 3.8))
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    for (row, col), n in np.ndenumerate(counts):
        ax.text(
            col, row, str(n), ha="center", va="center", fontsize=16, color="white" if n > counts.max() / 2 else "black"
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["normal", "anomalous"],
        yticklabels=["normal", "anomalous"],
        xlabel="decision",
        ylabel="truth",
        title="Confusion matrix",
    )
    return _save(fig, path)


def write_plots(
    folder: Path, labels: np.ndarray, scores: np.ndarray, result: dict, pixel: dict | None = None
) -> dict[str, Path]:
    """Draw every per-run plot that the data allows into `folder`.

    Args:
        labels, scores: (N,) image ground truth (1 = anomalous) and scores.
        result: metrics as from `anomap.metrics.evaluate` (threshold, AUROCs, confusion matrix).
        pixel: `pixel_curves` output, or None without masks.

    Returns:
        Plot title -> PNG path, in display order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels, bool)
    plots = {}
    if labels.any() and not labels.all():
        plots["ROC"] = plot_roc(
            folder / "roc.png", labels, scores, result.get("image_auroc"), pixel, result.get("pixel_auroc")
        )
        plots["Precision-recall"] = plot_pr(folder / "pr.png", labels, scores, result.get("image_auprc"))
    if pixel is not None:
        plots["PRO"] = plot_pro(folder / "pro.png", pixel, result.get("aupro"))
    plots["Score distributions"] = plot_scores(folder / "scores.png", labels, scores, result.get("threshold"))
    plots["Confusion matrix"] = plot_confusion(folder / "confusion.png", result["confusion_matrix"])
    return plots
