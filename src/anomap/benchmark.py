"""The benchmark: every method on every category under the evaluation protocol, in up to four
settings, for one or more seeds.

- `clean`: fit on the train split, threshold on the val split, evaluate on the test split
  (`anomap.protocol`);
- `shift`: the same model and threshold, evaluated on the shifted copy of the test split
  (`anomap.shift`, written under `<out>/shifted/seed<seed>/`);
- `shift_adapted`: fit on the shifted train split, threshold on the shifted val split, evaluate
  on the shifted test split;
- `unified`: one model per method fitted on the pooled train splits of all categories (no class
  labels); its threshold is calibrated per category on that category's val split, because score
  scales differ between products, then it is evaluated per category.

A seed fixes the split, the shift and the detector's own `seed` parameter (for methods that have
one). Outputs in `<out>`: `results.csv`, `results.json` (configuration, split counts, one row per
category x method x setting x seed, and the summary), `splits/<category>_seed<seed>.csv`,
`report.html` (`anomap.report.write_benchmark_report`) and per row a run folder, written like
`anomap evaluate --out` writes one (`anomap.evaluation.write_run`), under
`runs/<category>/<method>/<setting>/seed<seed>/`. The results are
rewritten after each row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import metrics
from ._io import write_text
from .data import MVTecAD, Sample
from .detectors import Detector, create, methods
from .errors import AnomapError
from .evaluation import evaluate, write_run
from .metric_table import METRICS, SUMMARY
from .protocol import THRESHOLDS, Split, calibrate, split_category, write_split_csv
from .report import run_folder, write_benchmark_report
from .shift import shift_samples

__all__ = ["COLUMNS", "SETTINGS", "format_splits", "format_table", "run_benchmark", "summarize"]

log = logging.getLogger(__name__)

SETTINGS = ("clean", "shift", "shift_adapted", "unified")
COLUMNS = (
    "category",
    "method",
    "setting",
    "seed",
    "threshold_method",
    *(m.key for m in METRICS),
    "confusion_matrix",
    "n_train",
    "n_val",
    "n_test",
)


def _fit(
    method: str, params: dict, seed: int, train: Sequence[Sample], val: Sequence[Sample]
) -> tuple[Detector, float]:
    """Fit a detector, seeding it when the method takes a seed. Returns it and the seconds taken.
    `auto` selects on `val` (`anomap.selection`); its record is kept as the detector's `selection_`."""
    if method == "auto":
        from .selection import select

        start = time.perf_counter()
        det, record = select(Split(list(train), list(val), []), **{"seed": seed, **params})
        det.selection_ = record
        return det, time.perf_counter() - start
    det = create(method, **params)
    if "seed" in det.get_params() and "seed" not in params:
        det = create(method, **params, seed=seed)
    start = time.perf_counter()
    det.fit(list(train))
    return det, time.perf_counter() - start


def _measure(det: Detector, test: Sequence[Sample], folder: Path, title: str) -> dict:
    """Every metric on `test` at the detector's threshold, the oracle F1 and the prediction time;
    writes the run folder (`anomap.evaluation.write_run`) into `folder`."""
    start = time.perf_counter()
    pred = det.predict(list(test))
    ms = 1000 * (time.perf_counter() - start) / len(test)
    ev = evaluate(det, test, pred)
    labels = np.array([s.label for s in test])
    oracle = metrics.classification_report(labels, pred.scores, metrics.f1_optimal_threshold(labels, pred.scores))
    write_run(folder, det, ev, title)
    if getattr(det, "selection_", None) is not None:
        write_text(folder / "selection.json", json.dumps(det.selection_, indent=2))
    return {**ev.metrics, "oracle_f1": oracle["f1"], "predict_ms_per_image": ms}


class _Run:
    """The rows measured so far and the files they are written to."""

    def __init__(self, out: Path, config: dict) -> None:
        self.out, self.config = out, config
        self.rows: list[dict] = []
        self.splits: dict[str, dict] = {}

    def add(self, key: dict, det: Detector, fit_seconds: float, split: Split, test: Sequence[Sample]) -> dict:
        title = f"{key['category']} / {key['method']} / {key['setting']} / seed {key['seed']}"
        measured = _measure(det, test, self.out / run_folder(key), title)
        row = {
            **key,
            "threshold_method": self.config["threshold"],
            **measured,
            "fit_seconds": fit_seconds,
            "n_train": len(split.train),
            "n_val": len(split.val),
            "n_test": len(test),
        }
        row = {name: row.get(name) for name in COLUMNS}
        self.rows.append(row)
        log.info(
            "%s %s %s seed %s: image AUROC %.3f, F1 %.3f",
            key["category"],
            key["method"],
            key["setting"],
            key["seed"],
            row["image_auroc"],
            row["f1"],
        )
        self.write()
        return row

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "confusion_matrix": json.dumps(row["confusion_matrix"])})
        write_text(self.out / "results.csv", buf.getvalue())
        doc = {"config": self.config, "splits": self.splits, "rows": self.rows, "summary": summarize(self.rows)}
        write_text(self.out / "results.json", json.dumps(doc, indent=2))
        write_benchmark_report(self.out)


def _check(categories: Sequence[str], method_names: Sequence[str], seeds: Sequence[int], threshold: str) -> None:
    if not categories or not method_names or not seeds:
        raise AnomapError("the benchmark needs at least one category, one method and one seed")
    unknown = [m for m in method_names if m not in methods() and m != "auto"]
    if unknown:
        raise AnomapError(f"unknown method {unknown[0]!r}; choose from {', '.join(methods())}")
    if threshold not in THRESHOLDS:
        raise AnomapError(f"unknown threshold method {threshold!r}; use one of {', '.join(THRESHOLDS)}")


def _shifted_split(split: Split, root: Path, dst: Path, seed: int) -> Split:
    return Split(*(shift_samples(part, root, dst, seed) for part in (split.train, split.val, split.test)))


def run_benchmark(
    root: str | Path,
    categories: Sequence[str],
    method_names: Sequence[str],
    out: str | Path,
    *,
    params: dict | None = None,
    seeds: Sequence[int] = (42,),
    shift: bool = False,
    unified: bool = False,
    threshold: str = "f1",
    k: float = 3.0,
) -> dict:
    """Run the benchmark (module docstring) and write its outputs into `out`.

    Args:
        root: data root in MVTec AD layout.
        categories, method_names: what to run.
        out: output folder (created).
        params: detector parameters given to every method (e.g. backbone, image_size, device).
        seeds: one run per seed.
        shift: add the `shift` and `shift_adapted` settings.
        unified: add the `unified` setting.
        threshold: "f1" or "sigma" (`anomap.protocol.threshold_from_scores`); k: the sigma multiplier.

    Returns:
        {"config", "splits", "rows", "summary"}, as written to `results.json`.
    """
    _check(categories, method_names, seeds, threshold)
    root, out, params = Path(root), Path(out), dict(params or {})
    (out / "splits").mkdir(parents=True, exist_ok=True)
    config = {
        "data": str(root),
        "categories": list(categories),
        "methods": list(method_names),
        "params": params,
        "seeds": list(seeds),
        "shift": shift,
        "unified": unified,
        "threshold": threshold,
        "k": k,
    }
    run = _Run(out, config)
    for seed in seeds:
        splits = {}
        for cat in categories:
            splits[cat] = split_category(MVTecAD(root, cat), seed)
            write_split_csv(splits[cat], out / "splits" / f"{cat}_seed{seed}.csv", root)
            run.splits[f"{cat}/seed{seed}"] = splits[cat].counts()
            log.info("%s seed %d: %s", cat, seed, {n: c["total"] for n, c in splits[cat].counts().items()})
        shifted = (
            {cat: _shifted_split(splits[cat], root, out / "shifted" / f"seed{seed}", seed) for cat in categories}
            if shift
            else {}
        )
        for method in method_names:
            for cat in categories:
                key = {"category": cat, "method": method, "seed": seed}
                det, seconds = _fit(method, params, seed, splits[cat].train, splits[cat].val)
                calibrate(det, splits[cat].val, threshold, k)
                run.add({**key, "setting": "clean"}, det, seconds, splits[cat], splits[cat].test)
                if shift:
                    run.add({**key, "setting": "shift"}, det, seconds, splits[cat], shifted[cat].test)
                    det, seconds = _fit(method, params, seed, shifted[cat].train, shifted[cat].val)
                    calibrate(det, shifted[cat].val, threshold, k)
                    run.add({**key, "setting": "shift_adapted"}, det, seconds, shifted[cat], shifted[cat].test)
            if unified:
                pooled = [s for cat in categories for s in splits[cat].train]
                det, seconds = _fit(method, params, seed, pooled, [s for cat in categories for s in splits[cat].val])
                for cat in categories:
                    calibrate(det, splits[cat].val, threshold, k)
                    key = {"category": cat, "method": method, "seed": seed, "setting": "unified"}
                    run.add(key, det, seconds, Split(pooled, splits[cat].val, splits[cat].test), splits[cat].test)
    run.write()
    return {"config": config, "splits": run.splits, "rows": run.rows, "summary": summarize(run.rows)}


def _mean_std(values: list) -> tuple[float | None, float | None]:
    arr = np.array([np.nan if v is None else v for v in values], dtype=float)
    if np.isnan(arr).all():
        return None, None
    return float(np.nanmean(arr)), float(np.nanstd(arr))


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Mean and std across seeds of the summary metrics (`anomap.metric_table.SUMMARY`), per
    setting, method and category, plus a macro row per setting and method (category "macro": the
    per-seed mean over categories)."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["method"], row["category"]), {}).setdefault(row["seed"], []).append(row)
        groups.setdefault((row["setting"], row["method"], "macro"), {}).setdefault(row["seed"], []).append(row)
    summary = []
    for (setting, method, category), by_seed in groups.items():
        entry = {"setting": setting, "method": method, "category": category, "seeds": len(by_seed)}
        for name in (m.key for m in SUMMARY):
            per_seed = [_mean_std([r[name] for r in seed_rows])[0] for seed_rows in by_seed.values()]
            entry[name], entry[f"{name}_std"] = _mean_std(per_seed)
        summary.append(entry)
    order = {s: i for i, s in enumerate(SETTINGS)}
    return sorted(summary, key=lambda e: (order.get(e["setting"], 99), e["method"], e["category"] == "macro"))


def format_splits(splits: dict[str, dict]) -> str:
    """One line per category and seed: normal + anomalous images of each split part."""
    return "\n".join(
        f"{key}: " + ", ".join(f"{part} {c['normal']}+{c['anomalous']}" for part, c in parts.items())
        for key, parts in splits.items()
    )


def format_table(summary: Sequence[dict]) -> str:
    """Plain-text table of `summarize`'s output: mean (and +- std across seeds when several)."""
    lines = [["setting", "method", "category", *(m.key for m in SUMMARY)]]
    for entry in summary:
        several = entry["seeds"] > 1
        lines.append(
            [
                entry["setting"],
                entry["method"],
                entry["category"],
                *(
                    m.format(entry[m.key])
                    + (f"±{m.format(entry[f'{m.key}_std'])}" if several and entry[m.key] is not None else "")
                    for m in SUMMARY
                ),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
