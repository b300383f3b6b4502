"""The HTML pages, from saved results: a run folder's `report.html` and the benchmark's.

A run folder holds the saved results of one evaluation (written by `anomap.evaluation.write_run`);
`write_report` turns them into one self-contained page (inline CSS and JS, pictures as relative
links, works offline):

    metrics.json        the dict of `anomap.metrics.evaluate` (required)
    predictions.json    {"title": str, "threshold": float | null, "images": [record, ...]} (required);
                        a record is {"path": str, "label": 0 | 1, "score": float} plus optional
                        "defect": str, "decision": "normal" | "anomalous" | null and
                        "picture": path of its inspection picture, relative to the run folder
    pixel_curves.json   thinned pixel ROC and PRO curves, `anomap.plots.pixel_curves` (optional)
    model.json          the model's metadata: method, params, threshold, anomap_version (optional)
    pictures/           one inspection picture per test image (`anomap.pictures.inspection_picture`)
    images/             scores.csv, heatmap overlays and masks at full size (`anomap.pictures.write_pictures`)
    plots/              per-run plots, drawn by `write_report`
    report.html         written by `write_report`

Other producers only need metrics.json and predictions.json. `write_zip` archives a run folder.
The benchmark folder's page (`write_benchmark_report`) is built from its `results.json`
(`anomap.benchmark`) and links each row's run folder, `run_folder(row)`.

Pages are Jinja2 templates (`templates/*.html`) with autoescaping: every value from the results
is escaped once, by the template engine.
"""

from __future__ import annotations

import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import jinja2
import numpy as np

from ._io import atomic_path, write_text
from .errors import DataError
from .metric_table import RUN, SUMMARY, Metric
from .plots import write_plots
from .runfolder import archive_files, candidate_label, output_folder, read_results, read_run

OUTCOMES = {"tp": "true positive", "tn": "true negative", "fp": "false positive", "fn": "false negative"}
SPLIT_PARTS = ("train", "val", "test")
SELECTION_FIGURES = ("image_auroc", "pixel_auroc", "aupro", "score")  # validation figures of each candidate


def _outcome(label: int, decision: str | None) -> str:
    """'tp', 'tn', 'fp', 'fn' at the threshold, or '' without a decision."""
    if decision is None:
        return ""
    return ("t" if (decision == "anomalous") == bool(label) else "f") + ("p" if decision == "anomalous" else "n")


@lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("anomap", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["href"] = lambda relative: quote(os.fsencode(Path(relative).as_posix()))  # the name's own bytes
    return env


def _render(template: str, **context: object) -> str:
    return _templates().get_template(template).render(**context)


def _json_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _model(model: dict | None) -> dict | None:
    """The model.json table: a one-line description and (name, value) rows."""
    if not model:
        return None
    params = model.get("params") or {}
    items = [("method", model.get("method")), ("anomap version", model.get("anomap_version")), *sorted(params.items())]
    about = ", ".join(str(v) for v in (model.get("method"), params.get("backbone")) if v)
    rows = [(k, _json_text(v)) for k, v in items if v is not None]
    return {"about": about, "n_params": len(params), "rows": rows, "selection": _selection(model.get("selection"))}


def _selection(record: dict | None) -> dict | None:
    """The `--method auto` record (checked by `anomap.runfolder`): candidates with their validation
    figures and weights, those the chosen model uses marked."""
    if not record:
        return None
    chosen = (record["chosen"]["method"], record["chosen"]["backbone"])

    def used(c: dict) -> bool:
        if "score_weight" in c:
            return c["score_weight"] > 0 or c["map_weight"] > 0
        return (c["method"], c["backbone"]) == chosen

    rows = [
        {
            "chosen": used(c),
            "cells": [
                candidate_label(c),
                c["backbone"],
                *(_figure(c.get(k)) for k in SELECTION_FIGURES),
                *(f"{c[k]:g}" if k in c else "" for k in ("score_weight", "map_weight")),
            ],
        }
        for c in record["candidates"]
    ]
    return {
        "criterion": record.get("criterion"),
        "chosen": " on ".join(chosen),
        "note": record.get("note"),
        "rows": rows,
    }


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _tile(rec: dict) -> dict:
    truth = "anomalous" if int(rec["label"]) else "normal"
    outcome = _outcome(int(rec["label"]), rec.get("decision"))
    return {
        "truth": truth,
        "outcome": outcome,
        "outcome_text": OUTCOMES.get(outcome, ""),
        "name": f"{rec.get('defect') or truth}/{Path(str(rec['path'])).name}",
        "path": rec["path"],
        "picture": rec.get("picture"),
        "score": f"{float(rec['score']):.4g}",
    }


def _filters(records: list[dict]) -> list[tuple[str, str, int]]:
    """(filter key, button text, images it shows)."""
    truths = [("anomalous" if int(r["label"]) else "normal") for r in records]
    outcomes = [_outcome(int(r["label"]), r.get("decision")) for r in records]
    return [
        ("all", "all", len(records)),
        ("normal", "normal", truths.count("normal")),
        ("anomalous", "anomalous", truths.count("anomalous")),
        ("fp", "false positives", outcomes.count("fp")),
        ("fn", "false negatives", outcomes.count("fn")),
    ]


def write_report(run_dir: str | Path) -> Path:
    """Draw the plots into `run_dir/plots` and write `run_dir/report.html` from the saved results,
    read as untrusted input (`anomap.runfolder`).

    Raises:
        DataError: a file or value of the run folder breaks the rules of `anomap.runfolder`.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    result, records = run.metrics, run.records
    labels = np.array([r["label"] for r in records])
    scores = np.array([r["score"] for r in records])
    plots = write_plots(output_folder(run_dir, "plots"), labels, scores, result, run.pixel_curves)
    threshold = result.get("threshold", run.threshold)
    summary = f"{len(records)} test images ({int((labels == 0).sum())} normal, {int(labels.sum())} anomalous)" + (
        "" if threshold is None else f"; decision threshold {threshold:.4g}"
    )
    text = _render(
        "report.html",
        title=run.title or run_dir.resolve().name,
        summary=summary,
        metrics=[(m.label, m.format(result[m.key])) for m in RUN if m.key in result],
        confusion=result.get("confusion_matrix", [[0, 0], [0, 0]]),
        model=_model(run.model),
        plots=[(title, path.relative_to(run_dir)) for title, path in plots.items()],
        filters=_filters(records),
        tiles=[_tile(rec) for rec in records],
    )
    write_text(run_dir / "report.html", text)
    return run_dir / "report.html"


def zip_path(run_dir: str | Path) -> Path:
    """Where `write_zip` puts the archive of `run_dir`: `<run_dir>.zip`, next to the folder."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + ".zip")


def write_zip(run_dir: str | Path, overwrite: bool = False) -> Path:
    """Archive the run folder at `zip_path(run_dir)`, atomically; an existing archive is replaced
    only with `overwrite`.

    Every regular file is included under `<folder name>/` except model files (`*.anomap`, whose
    metadata is in model.json), hidden files and anything reached through a symbolic link
    (`anomap.runfolder.archive_files`).
    """
    run_dir, target = Path(run_dir).resolve(), zip_path(run_dir)
    if not (run_dir / "report.html").is_file():
        raise DataError(f"{run_dir}: no report.html; run `anomap report {run_dir}` first")
    files = archive_files(run_dir)
    with atomic_path(target, overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in files:
                kind = zipfile.ZIP_STORED if path.suffix == ".png" else zipfile.ZIP_DEFLATED
                archive.write(path, f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}", compress_type=kind)
    return target


def run_folder(row: dict) -> str:
    """The run folder of a benchmark results row, relative to the benchmark folder."""
    return f"runs/{row['category']}/{row['method']}/{row['setting']}/seed{row['seed']}"


def _mean_std(entry: dict, metric: Metric) -> str:
    mean, std = entry.get(metric.key), entry.get(f"{metric.key}_std")
    several = std is not None and mean is not None and entry.get("seeds", 1) > 1
    return metric.format(mean) + (f" ± {metric.format(std)}" if several else "")


def _run_row(row: dict, out: Path) -> dict:
    page = f"{run_folder(row)}/report.html"
    return {
        **{k: row[k] for k in ("category", "method", "setting", "seed")},
        "cells": [m.format(row.get(m.key)) for m in SUMMARY],
        "page": page if (out / page).is_file() else None,
    }


def write_benchmark_report(out: str | Path) -> Path:
    """Write `out/report.html` from `out/results.json`: the summary of `anomap.benchmark.summarize`
    (per category and the macro average per setting and method, mean ± std across seeds), a link to
    each row's run report, the configuration and the split sizes.

    Raises:
        DataError: results.json is missing, malformed or holds a value out of its range
            (`anomap.runfolder.read_results`).
    """
    out = Path(out)
    doc = read_results(out, tuple(m.key for m in SUMMARY), SPLIT_PARTS)
    config, rows = doc["config"], doc["rows"]
    summary = (
        f"{len(rows)} runs: {len(config.get('categories', []))} categories, methods "
        f"{', '.join(map(str, config.get('methods', [])))}, seeds {', '.join(map(str, config.get('seeds', [])))}"
        f", threshold {config.get('threshold')}"
    )
    results = [
        {
            **{k: e[k] for k in ("setting", "method", "category")},
            "macro": e["category"] == "macro",
            "cells": [_mean_std(e, m) for m in SUMMARY],
        }
        for e in doc["summary"]
    ]
    splits = [
        (key, [(c.get(p, {}).get("normal"), c.get(p, {}).get("anomalous")) for p in SPLIT_PARTS])
        for key, c in (doc.get("splits") or {}).items()
    ]
    text = _render(
        "benchmark.html",
        title=out.resolve().name,
        summary=summary,
        metrics=SUMMARY,
        results=results,
        runs=[_run_row(row, out) for row in rows],
        config=[(k, _json_text(v)) for k, v in config.items()],
        parts=SPLIT_PARTS,
        splits=splits,
    )
    write_text(out / "report.html", text)
    return out / "report.html"
