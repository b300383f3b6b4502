"""The run folder and its HTML report.

A run folder holds the saved results of one evaluation; `write_report` turns them into one
self-contained page (inline CSS and JS, pictures as relative links, works offline):

    metrics.json        the dict of `anomap.metrics.evaluate` (required)
    predictions.json    {"title": str, "threshold": float | null, "images": [record, ...]} (required);
                        a record is {"path": str, "label": 0 | 1, "score": float} plus optional
                        "defect": str, "decision": "normal" | "anomalous" | null and
                        "picture": path of its inspection picture, relative to the run folder
    pixel_curves.json   thinned pixel ROC and PRO curves, `anomap.plots.pixel_curves` (optional)
    model.json          the model's metadata: method, params, threshold, anomap_version (optional)
    pictures/           one inspection picture per test image (`anomap.pictures.inspection_picture`)
    images/             scores.csv, heatmap overlays and masks at full size (`runs.write_predictions`)
    plots/              per-run plots, drawn by `write_report`
    report.html         written by `write_report`

`save_run` writes predictions.json, pixel_curves.json, model.json and pictures/ for a detector;
other producers only need metrics.json and predictions.json. `write_zip` archives a run folder.
"""

from __future__ import annotations

import html
import json
import zipfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from . import __version__
from ._io import atomic_path, write_text
from .data import Sample, load_image
from .detectors import Detector, Prediction
from .errors import DataError
from .pictures import aligned_image, inspection_picture, save_png
from .plots import pixel_curves, write_plots

OUTCOMES = {"tp": "true positive", "tn": "true negative", "fp": "false positive", "fn": "false negative"}
METRICS = (("image_auroc", "image AUROC"), ("image_auprc", "image AUPRC"), ("pixel_auroc", "pixel AUROC"),
           ("aupro", "AUPRO (FPR <= 0.3)"), ("f1", "F1 at the threshold"), ("precision", "precision"),
           ("recall", "recall"), ("accuracy", "accuracy"), ("threshold", "threshold"))


def _outcome(label: int, decision: str | None) -> str:
    """'tp', 'tn', 'fp', 'fn' at the threshold, or '' without a decision."""
    if decision is None:
        return ""
    return ("t" if (decision == "anomalous") == bool(label) else "f") + ("p" if decision == "anomalous" else "n")


def _dump(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=1, default=str))


def _picture_title(sample: Sample, score: float, threshold: float, decision: str) -> tuple[str, str]:
    label = "anomalous" if sample.label else "normal"
    outcome = OUTCOMES[_outcome(sample.label, decision)]
    cmp = ">=" if decision == "anomalous" else "<"
    return (f"score {score:.4g} {cmp} threshold {threshold:.4g}: {decision}",
            f"{sample.defect}/{Path(sample.path).name}: truly {label}, {outcome}")


def save_run(out: Path, det: Detector, samples: Sequence[Sample], pred: Prediction,
             masks: np.ndarray | None, title: str) -> None:
    """Write predictions.json, model.json, pixel_curves.json (with masks) and pictures/.

    Args:
        pred: the prediction for `samples`, with a threshold.
        masks: (N, S, S) bool ground truth aligned with `pred.maps`, or None.
    """
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    vmin, vmax = float(pred.maps.min()), float(pred.maps.max())
    records = []
    for i, sample in enumerate(tqdm(samples, desc="pictures", unit="image", leave=False)):
        score, decision = float(pred.scores[i]), "anomalous" if pred.labels[i] else "normal"
        picture = f"pictures/{i:04d}_{Path(sample.path).stem}.png"
        truth = None if masks is None or sample.mask_path is None else masks[i]
        image = aligned_image(load_image(sample.path), det.preprocess_)
        lines = _picture_title(sample, score, pred.threshold, decision)
        save_png(out / picture, inspection_picture(image, pred.maps[i], vmin, vmax, pred.threshold, truth, lines))
        records.append({"path": str(sample.path), "label": int(sample.label), "defect": sample.defect,
                        "score": score, "decision": decision, "picture": picture})
    _dump(out / "predictions.json", {"title": title, "threshold": pred.threshold, "images": records})
    _dump(out / "model.json", {"method": det.method, "params": det.get_params(),
                               "threshold": det.threshold_, "anomap_version": __version__})
    if masks is not None and (curves := pixel_curves(masks, pred.maps)) is not None:
        _dump(out / "pixel_curves.json", curves)


def _read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: not found; a run folder needs metrics.json and predictions.json "
                            "(run `anomap evaluate ... --out DIR` first)")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err}); rerun the evaluation to write it again") from None


def _records(predictions: dict, path: Path) -> list[dict]:
    """The image records sorted by score, highest first; checks the required keys."""
    records = predictions.get("images") if isinstance(predictions, dict) else None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: no 'images' list; see anomap.report for the expected format")
    for i, rec in enumerate(records):
        missing = [k for k in ("path", "label", "score") if k not in rec]
        if missing:
            raise DataError(f"{path}: image {i} lacks {', '.join(missing)}")
    return sorted(records, key=lambda r: -float(r["score"]))


def asset(name: str) -> str:
    """The text of `templates/<name>` (page templates and the shared report.css)."""
    return resources.files("anomap").joinpath(f"templates/{name}").read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _href(relative: str) -> str:
    return _e(quote(Path(relative).as_posix()))


def _number(value: object, spec: str = ".4f") -> str:
    return "n/a" if value is None else _e(format(value, spec)) if isinstance(value, float) else _e(value)


def _metrics_table(result: dict) -> str:
    rows = "".join(f"<tr><th>{_e(name)}</th><td class=\"num\">"
                   f"{_number(result.get(key), '.4g' if key == 'threshold' else '.4f')}</td></tr>"
                   for key, name in METRICS if key in result)
    (tn, fp), (fn, tp) = result.get("confusion_matrix", [[0, 0], [0, 0]])
    rows += f"<tr><th>confusion</th><td class=\"note\">TN {tn}, FP {fp}, FN {fn}, TP {tp}</td></tr>"
    return f"<table class=\"metrics\"><tbody>{rows}</tbody></table>"


def _model_table(model: dict | None) -> str:
    if not model:
        return ""
    params = model.get("params") or {}
    items = [("method", model.get("method")), ("anomap version", model.get("anomap_version")), *sorted(params.items())]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                   for k, v in items if v is not None)
    about = ", ".join(_e(v) for v in (model.get("method"), params.get("backbone")) if v)
    return (f"<details class=\"model\"><summary>model: {about} ({len(params)} parameters)</summary>"
            f"<table><tbody>{rows}</tbody></table></details>")


def _plots_html(plots: dict[str, Path], run_dir: Path) -> str:
    return "\n".join(f"<a href=\"{_href(p.relative_to(run_dir))}\"><img src=\"{_href(p.relative_to(run_dir))}\" "
                     f"alt=\"{_e(title)}\" title=\"{_e(title)}\"></a>" for title, p in plots.items())


def _tile(rank: int, rec: dict) -> str:
    truth = "anomalous" if int(rec["label"]) else "normal"
    outcome = _outcome(int(rec["label"]), rec.get("decision"))
    name = f"{rec.get('defect') or truth}/{Path(str(rec['path'])).name}"
    picture = rec.get("picture")
    image = (f"<a href=\"{_href(picture)}\"><img src=\"{_href(picture)}\" alt=\"{_e(name)}\" decoding=\"async\"></a>"
             if picture else "<div class=\"nopic\">no picture</div>")
    badge = f"<span class=\"badge {outcome}\">{_e(OUTCOMES[outcome])}</span>" if outcome else ""
    return (f"<figure class=\"tile {outcome}\" data-truth=\"{truth}\" data-outcome=\"{outcome}\">{image}"
            f"<figcaption><span class=\"rank\">#{rank}</span><span class=\"name\" title=\"{_e(rec['path'])}\">"
            f"{_e(name)}</span><span>score {float(rec['score']):.4g}</span>{badge}</figcaption></figure>")


def _filters(records: list[dict]) -> str:
    truths = [("anomalous" if int(r["label"]) else "normal") for r in records]
    outcomes = [_outcome(int(r["label"]), r.get("decision")) for r in records]
    choices = [("all", "all", len(records)), ("normal", "normal", truths.count("normal")),
               ("anomalous", "anomalous", truths.count("anomalous")),
               ("fp", "false positives", outcomes.count("fp")), ("fn", "false negatives", outcomes.count("fn"))]
    return "\n".join(f"<button type=\"button\" data-filter=\"{key}\" aria-pressed=\"false\">{text} ({n})</button>"
                     for key, text, n in choices)


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots into `run_dir/plots` and write `run_dir/report.html` from the saved results.

    Raises:
        DataError: metrics.json or predictions.json is missing or malformed.
    """
    run_dir = Path(run_dir)
    result = _read_json(run_dir / "metrics.json")
    predictions = _read_json(run_dir / "predictions.json")
    records = _records(predictions, run_dir / "predictions.json")
    labels = np.array([int(r["label"]) for r in records])
    scores = np.array([float(r["score"]) for r in records])
    plots = write_plots(run_dir / "plots", labels, scores, result, _read_json(run_dir / "pixel_curves.json", False))
    threshold = result.get("threshold", predictions.get("threshold"))
    summary = (f"{len(records)} test images ({int((labels == 0).sum())} normal, {int(labels.sum())} anomalous)"
               + ("" if threshold is None else f"; decision threshold {threshold:.4g}"))
    text = Template(asset("report.html")).substitute(
        style=asset("report.css"), title=_e(predictions.get("title") or run_dir.resolve().name),
        summary=_e(summary),
        metrics=_metrics_table(result), model=_model_table(_read_json(run_dir / "model.json", False)),
        plots=_plots_html(plots, run_dir), filters=_filters(records),
        tiles="\n".join(_tile(k + 1, rec) for k, rec in enumerate(records)))
    write_text(run_dir / "report.html", text)
    return run_dir / "report.html"


def zip_path(run_dir: str | Path) -> Path:
    """Where `write_zip` puts the archive of `run_dir`: `<run_dir>.zip`, next to the folder."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + ".zip")


def write_zip(run_dir: str | Path) -> Path:
    """Archive the run folder at `zip_path(run_dir)`, atomically, replacing an older archive.

    Every file is included under `<folder name>/` except model files (`*.anomap`, whose metadata
    is in model.json) and hidden files.
    """
    run_dir, target = Path(run_dir).resolve(), zip_path(run_dir)
    if not (run_dir / "report.html").is_file():
        raise DataError(f"{run_dir}: no report.html; run `anomap report {run_dir}` first")
    files = sorted(p for p in run_dir.rglob("*")
                   if p.is_file() and p.suffix != ".anomap" and not p.name.startswith("."))
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in files:
                kind = zipfile.ZIP_STORED if path.suffix == ".png" else zipfile.ZIP_DEFLATED
                archive.write(path, f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}", compress_type=kind)
    return target
