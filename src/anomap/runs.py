"""Whole jobs behind the `anomap` command: fit a category, predict a folder, evaluate, the demo.
Each writes its outputs into one folder and returns what it measured."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from . import metrics, report
from ._io import write_text
from .data import MVTecAD, Sample, list_images, load_image, load_masks
from .detectors import Detector, Prediction, create
from .errors import AnomapError, DataError, ScoreError
from .pictures import save_heatmap, save_segmentation

log = logging.getLogger(__name__)


def fit_category(root: str | Path, category: str, method: str = "patchcore", **params) -> Detector:
    """Fit a detector of `method` on `<root>/<category>/train/good`."""
    data = MVTecAD(root, category)
    return create(method, **params).fit(data.train)


def evaluate(
    det: Detector, samples: Sequence[Sample], pred: Prediction | None = None
) -> tuple[dict, Prediction, np.ndarray | None]:
    """Predict `samples` (unless their prediction `pred` is given) and compute every metric at the
    detector's threshold.

    Returns:
        (metrics dict as in `anomap.metrics.evaluate`, the prediction, the (N, S, S) ground-truth
        masks or None when no sample has a mask).
    """
    pred = det.predict(samples) if pred is None else pred
    labels = np.array([s.label for s in samples])
    has_masks = any(s.mask_path is not None for s in samples)
    masks = load_masks(samples, det.preprocess_) if has_masks else None
    result = metrics.evaluate(labels, pred.scores, det.threshold_, masks=masks, maps=pred.maps if has_masks else None)
    return result, pred, masks


def write_predictions(out: Path, paths: Sequence[Path], pred: Prediction, pictures: bool = True) -> Path:
    """Write `scores.csv` (path, score, decision) and per image a heatmap overlay and a binary mask.

    Picture names are `NNNN_<stem>_heatmap.png` / `NNNN_<stem>_mask.png`, NNNN the row number, so
    images with the same name in different folders never collide. Returns the CSV path.
    """
    out.mkdir(parents=True, exist_ok=True)
    labels = pred.labels
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "score", "decision"])
    for i, path in enumerate(paths):
        decision = "" if labels is None else ("anomalous" if labels[i] else "normal")
        writer.writerow([str(path), f"{pred.scores[i]:.6g}", decision])
    write_text(out / "scores.csv", buf.getvalue())
    if pictures:
        vmin, vmax = float(pred.maps.min()), float(pred.maps.max())
        for i, path in enumerate(paths):
            stem = f"{i:04d}_{Path(path).stem[:50]}"  # names are limited to 255 bytes, 4 per character
            image = load_image(path)
            save_heatmap(out / f"{stem}_heatmap.png", image, pred.maps[i], vmin, vmax)
            if pred.threshold is not None:
                save_segmentation(out / f"{stem}_mask.png", pred.maps[i] >= pred.threshold, image.shape[:2])
    return out / "scores.csv"


def predict_paths(det: Detector, inputs: Sequence[str | Path], out: Path,
                  skip_bad: bool = False) -> tuple[Path, Prediction, list[tuple[Path, str]]]:
    """Score image files and folders; write the CSV and pictures into `out`.

    Without `skip_bad` the first unusable image raises its DataError. With it, unusable images
    are logged, left out and listed with the reason in `out/skipped.csv`.

    Returns:
        (CSV path, prediction of the kept images, skipped (path, reason) pairs).
    """
    paths = list_images(inputs)
    if skip_bad:
        paths, pred, skipped = _predict_skipping(det, paths)
    else:
        pred, skipped = det.predict(paths), []
    _require_finite(pred)
    if skipped:
        buf = io.StringIO()
        csv.writer(buf).writerows([["path", "reason"], *([str(p), r] for p, r in skipped)])
        write_text(out / "skipped.csv", buf.getvalue())
    return write_predictions(out, paths, pred), pred, skipped


def _predict_skipping(det: Detector, paths: list[Path], chunk: int = 256):
    """Predict `chunk` images at a time; a chunk that fails is checked image by image and rerun
    without its unusable images (`predict` is batch-independent, so scores do not change)."""
    kept, preds, skipped = [], [], []
    for start in range(0, len(paths), chunk):
        part = paths[start:start + chunk]
        try:
            preds.append(det.predict(part))
        except DataError:
            bad = {p: reason for p, reason in map(_unusable, part) if reason}
            for reason in bad.values():
                log.warning("skipped %s", reason)
            skipped += bad.items()
            part = [p for p in part if p not in bad]
            if part:
                preds.append(det.predict(part))
        kept += part
    if not kept:
        raise DataError(f"all {len(paths)} images are unusable; the first: {skipped[0][1]}")
    maps = np.concatenate([p.maps for p in preds])
    return kept, Prediction(np.concatenate([p.scores for p in preds]), maps, det.threshold_), skipped


def _unusable(path: Path) -> tuple[Path, str]:
    """(path, why it cannot be used) or (path, "") when it decodes."""
    try:
        load_image(path)
    except DataError as err:
        return path, str(err)
    return path, ""


def _require_finite(pred: Prediction) -> None:
    bad = ~np.isfinite(pred.scores)
    if bad.any():
        raise ScoreError(f"{int(bad.sum())} of {len(bad)} scores are NaN or infinite; the model file or "
                         "the backbone weights are broken, refit the model")


def evaluate_to_folder(det: Detector, root: str | Path, category: str, out: Path | None) -> dict:
    """Evaluate on `<root>/<category>/test`; with `out`, also write the run folder described in
    `anomap.report` (metrics.json, predictions, pictures, plots) and its `report.html`."""
    if det.threshold_ is None:
        raise AnomapError("the model has no threshold; fit it with anomap or calibrate it first")
    data = MVTecAD(root, category)
    _require_both_classes(data.test, Path(root) / category / "test")
    result, pred, masks = evaluate(det, data.test)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "metrics.json", json.dumps(result, indent=2))
        write_predictions(out / "images", [s.path for s in data.test], pred)
        report.save_run(out, det, data.test, pred, masks, title=category)
        report.write_report(out)
    return result


def _require_both_classes(samples: Sequence[Sample], folder: Path) -> None:
    """Image metrics (AUROC, AUPRC) are undefined without both normal and anomalous images."""
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        what = "no images" if not labels else "only anomalous images" if labels == {1} else "no anomalous images"
        raise DataError(f"{folder}: {what}; evaluation needs test/good and at least one test/<defect> "
                        "folder (use `anomap predict` to just score images)")


def demo_root() -> Path:
    """Folder of the bundled demo data (MVTec layout, category `hazelnut_toy`)."""
    return Path(str(resources.files("anomap") / "demo_data"))


def demo(out: Path, device: str = "auto", root: str | Path | None = None, category: str = "hazelnut_toy") -> dict:
    """Fit PatchCore with the offline efficientnet_lite0 backbone and evaluate it.

    Uses the bundled data unless `root`/`category` name another MVTec-layout category.
    Writes `model.anomap`, `metrics.json` and pictures into `out`. Returns the metrics.
    """
    root = demo_root() if root is None else root
    out.mkdir(parents=True, exist_ok=True)
    det = fit_category(root, category, backbone="efficientnet_lite0", device=device)
    det.save(out / "model.anomap")
    return evaluate_to_folder(det, root, category, out)
