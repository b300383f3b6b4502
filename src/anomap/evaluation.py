"""One evaluation of a detector on labelled images, and the run folder it is written to.

`evaluate` scores the images and computes every metric once, into an `Evaluation`; `write_run`
writes the run folder that `anomap.report` describes (metrics, predictions, model, pixel curves,
pictures, plots and report.html), decoding each image once for all of its pictures. The CLI's
`evaluate` and `demo` and every row of the benchmark go through these two functions.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import __version__, metrics
from ._io import write_text
from .data import Sample, load_image, load_masks
from .detectors import Detector, Prediction
from .pictures import PictureQueue, aligned_image, heat_range, inspection_picture, save_png, write_pictures
from .plots import pixel_curves
from .report import write_report


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation measured.

    Attributes:
        samples: the N labelled images.
        prediction: their scores (N,) and maps (N, S, S), with the detector's threshold.
        masks: (N, S, S) bool ground truth aligned with the maps, or None when no sample has a mask.
        metrics: the dict of `anomap.metrics.evaluate`.
    """

    samples: list[Sample]
    prediction: Prediction
    masks: np.ndarray | None
    metrics: dict


def evaluate(det: Detector, samples: Sequence[Sample], pred: Prediction | None = None) -> Evaluation:
    """Predict `samples` (unless their prediction `pred` is given) and compute every metric at the
    detector's threshold."""
    samples = list(samples)
    pred = det.predict(samples) if pred is None else pred
    labels = np.array([s.label for s in samples])
    masks = load_masks(samples, det.preprocess_) if any(s.mask_path is not None for s in samples) else None
    result = metrics.evaluate(
        labels, pred.scores, det.threshold_, masks=masks, maps=None if masks is None else pred.maps
    )
    return Evaluation(samples, pred, masks, result)


def picture_stem(index: int, path: str | Path) -> str:
    """`NNNN_<stem>`, NNNN the image's row: images with one name in different folders never collide."""
    return f"{index:04d}_{Path(path).stem[:50]}"  # names are limited to 255 bytes, 4 per character


def write_scores(path: Path, paths: Sequence[Path], scores: np.ndarray, threshold: float | None) -> Path:
    """Write the CSV of (path, score, decision), decision empty without a threshold."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "score", "decision"])
    for image, score in zip(paths, scores):
        decision = "" if threshold is None else ("anomalous" if score >= threshold else "normal")
        writer.writerow([str(image), f"{score:.6g}", decision])
    write_text(path, buf.getvalue())
    return path


def _titles(sample: Sample, score: float, threshold: float) -> tuple[str, str]:
    """The two title lines of an inspection picture: the decision, and whether it is right."""
    flagged = score >= threshold
    outcome = f"{'true' if flagged == bool(sample.label) else 'false'} {'positive' if flagged else 'negative'}"
    return (
        f"score {score:.4g} {'>=' if flagged else '<'} threshold {threshold:.4g}: "
        f"{'anomalous' if flagged else 'normal'}",
        f"{sample.defect}/{Path(sample.path).name}: truly {'anomalous' if sample.label else 'normal'}, {outcome}",
    )


def _record(sample: Sample, score: float, threshold: float, picture: str) -> dict:
    return {
        "path": str(sample.path),
        "label": int(sample.label),
        "defect": sample.defect,
        "score": score,
        "decision": "anomalous" if score >= threshold else "normal",
        "picture": picture,
    }


def write_run(out: Path, det: Detector, ev: Evaluation, title: str) -> Path:
    """Write the run folder of `ev` (see `anomap.report`) and its report.html. Returns the page.

    Each image is decoded once, for its inspection picture (`pictures/`) and its full-size heatmap
    and mask (`images/`, with `images/scores.csv`); pictures are drawn by two threads.
    """
    pred, stems = ev.prediction, [picture_stem(i, s.path) for i, s in enumerate(ev.samples)]
    write_text(out / "metrics.json", json.dumps(ev.metrics, indent=2))
    write_scores(out / "images" / "scores.csv", [s.path for s in ev.samples], pred.scores, pred.threshold)
    scale = heat_range(det.normal_scores_)
    with PictureQueue(workers=2) as queue:
        for i, sample in enumerate(tqdm(ev.samples, desc="pictures", unit="img", leave=False, disable=None)):
            truth = None if ev.masks is None or sample.mask_path is None else ev.masks[i]
            queue.submit(_draw, out, stems[i], sample, pred.maps[i], float(pred.scores[i]), truth, scale, det)
    records = [
        _record(s, float(pred.scores[i]), pred.threshold, f"pictures/{stems[i]}.png") for i, s in enumerate(ev.samples)
    ]
    _dump(out / "predictions.json", {"title": title, "threshold": pred.threshold, "images": records})
    _dump(
        out / "model.json",
        {
            "method": det.method,
            "params": det.get_params(),
            "threshold": det.threshold_,
            "anomap_version": __version__,
            "selection": getattr(det, "selection_", None),
        },
    )
    if ev.masks is not None and (curves := pixel_curves(ev.masks, pred.maps)) is not None:
        _dump(out / "pixel_curves.json", curves)
    return write_report(out)


def _draw(
    out: Path,
    stem: str,
    sample: Sample,
    amap: np.ndarray,
    score: float,
    truth: np.ndarray | None,
    scale: tuple[float, float],
    det: Detector,
) -> None:
    """One image's pictures: decoded once, drawn aligned with the map and at full size."""
    image, threshold = load_image(sample.path), det.threshold_
    lines = _titles(sample, score, threshold)
    aligned = aligned_image(image, det.preprocess_)
    picture = inspection_picture(aligned, amap, *scale, threshold, truth, lines)
    save_png(out / "pictures" / f"{stem}.png", picture, runs=True, durable=False)
    write_pictures(out / "images", stem, image, amap, scale, threshold)


def _dump(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=1, default=str))
