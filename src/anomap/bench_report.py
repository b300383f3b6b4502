"""The benchmark page: `<out>/report.html` built from `<out>/results.json` (`anomap.benchmark`).

One self-contained page (the run report's CSS inline, no script) with the results table of
`anomap.benchmark.summarize` (per category and the macro average per setting and method, mean ±
std across seeds), a link to the run report of every results row, under `run_folder(row)`, and
the configuration and split sizes.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from ._io import write_text
from .errors import DataError
from .report import _e, _href, asset

SUMMARY = (
    ("image_auroc", "image AUROC", 3),
    ("pixel_auroc", "pixel AUROC", 3),
    ("aupro", "AUPRO", 3),
    ("f1", "F1", 3),
    ("oracle_f1", "oracle F1", 3),
    ("fit_seconds", "fit s", 1),
    ("predict_ms_per_image", "ms / image", 1),
)
ROW = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("f1", "F1"),
    ("threshold", "threshold"),
)


def run_folder(row: dict) -> str:
    """The run folder of a results row, relative to the benchmark folder."""
    return f"runs/{row['category']}/{row['method']}/{row['setting']}/seed{row['seed']}"


def _mean_std(entry: dict, name: str, digits: int) -> str:
    mean, std = entry.get(name), entry.get(f"{name}_std")
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and entry.get("seeds", 1) > 1 else "")


def _results_table(summary: list[dict]) -> str:
    head = "".join(f"<th>{_e(t)}</th>" for t in ("setting", "method", "category", *(s[1] for s in SUMMARY)))
    rows = []
    for e in summary:
        cells = "".join(f'<td class="num">{_e(_mean_std(e, name, digits))}</td>' for name, _, digits in SUMMARY)
        macro = ' class="macro"' if e["category"] == "macro" else ""
        rows.append(
            f"<tr{macro}><td>{_e(e['setting'])}</td><td>{_e(e['method'])}</td><td>{_e(e['category'])}</td>{cells}</tr>"
        )
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _runs_table(rows: list[dict], out: Path) -> str:
    head = "".join(
        f"<th>{_e(t)}</th>" for t in ("category", "method", "setting", "seed", *(r[1] for r in ROW), "report")
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{"n/a" if row.get(k) is None else _e(format(row[k], ".4g"))}</td>' for k, _ in ROW
        )
        page = f"{run_folder(row)}/report.html"
        link = (
            f'<a class="run" href="{_href(page)}">report</a>'
            if (out / page).is_file()
            else '<span class="muted">no report</span>'
        )
        body.append(
            f"<tr><td>{_e(row['category'])}</td><td>{_e(row['method'])}</td><td>{_e(row['setting'])}</td>"
            f"<td>{_e(row['seed'])}</td>{cells}<td>{link}</td></tr>"
        )
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _config_table(config: dict) -> str:
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(v if isinstance(v, str) else json.dumps(v))}</td></tr>" for k, v in config.items()
    )
    return f"<table><tbody>{rows}</tbody></table>"


def _splits_table(splits: dict[str, dict]) -> str:
    parts = ("train", "val", "test")
    head = "<th>category/seed</th>" + "".join(f"<th>{p} (normal+anomalous)</th>" for p in parts)
    rows = "".join(
        f"<tr><td>{_e(key)}</td>"
        + "".join(
            f'<td class="num">{_e(c.get(p, {}).get("normal"))}+{_e(c.get(p, {}).get("anomalous"))}</td>' for p in parts
        )
        + "</tr>"
        for key, c in splits.items()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _read_results(out: Path) -> dict:
    path = out / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `anomap benchmark ... --out {out}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err}); rerun the benchmark to write it again") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), t) for k, t in (("config", dict), ("rows", list), ("summary", list))
    ):
        raise DataError(f"{path}: not a benchmark result (needs config, rows and summary)")
    return doc


def write_benchmark_report(out: str | Path) -> Path:
    """Write `out/report.html` from `out/results.json`.

    Raises:
        DataError: results.json is missing or malformed.
    """
    out = Path(out)
    doc = _read_results(out)
    config, rows = doc["config"], doc["rows"]
    summary = (
        f"{len(rows)} runs: {len(config.get('categories', []))} categories, methods "
        f"{', '.join(map(str, config.get('methods', [])))}, seeds {', '.join(map(str, config.get('seeds', [])))}"
        f", threshold {config.get('threshold')}"
    )
    text = Template(asset("benchmark.html")).substitute(
        style=asset("report.css"),
        title=_e(out.resolve().name),
        summary=_e(summary),
        results=_results_table(doc["summary"]),
        runs=_runs_table(rows, out),
        config=_config_table(config),
        splits=_splits_table(doc.get("splits") or {}),
    )
    write_text(out / "report.html", text)
    return out / "report.html"
