"""The benchmark command end to end on two tiny categories, and its summary maths."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import zipfile
from urllib.parse import unquote

import pytest

from anomap.benchmark import COLUMNS, format_splits, format_table, summarize
from anomap.cli import main
from anomap.metric_table import SUMMARY
from anomap.report import run_folder, write_benchmark_report, zip_path

from conftest import make_category

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    make_category(root, "a", n_train=5, n_good=2, n_bad=3, seed=1)
    make_category(root, "b", n_train=5, n_good=2, n_bad=3, seed=2)
    out = tmp_path_factory.mktemp("bench") / "run"
    args = [
        "benchmark",
        "--data",
        str(root),
        "--categories",
        "a,b",
        "--methods",
        "patchcore",
        *FAST,
        "--shift",
        "--unified",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return root, out, args


def test_one_row_per_category_setting_with_every_metric(run):
    _, out, _ = run
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["category"], r["setting"]) for r in rows} == {
        (c, s) for c in "ab" for s in ("clean", "shift", "shift_adapted", "unified")
    }
    assert len(rows) == 8 and tuple(rows[0]) == COLUMNS
    for r in rows:
        for key in (
            "image_auroc",
            "image_auprc",
            "pixel_auroc",
            "aupro",
            "f1",
            "precision",
            "recall",
            "accuracy",
            "oracle_f1",
        ):
            assert 0.0 <= float(r[key]) <= 1.0, key
        assert float(r["fit_seconds"]) > 0 and float(r["predict_ms_per_image"]) > 0
        tn_fp, fn_tp = json.loads(r["confusion_matrix"])
        assert sum(tn_fp) + sum(fn_tp) == int(r["n_test"])
        assert r["method"] == "patchcore" and r["seed"] == "42" and r["threshold_method"] == "f1"
    unified = [r for r in rows if r["setting"] == "unified"]
    assert all(r["n_train"] == "8" for r in unified)  # 4 + 4 pooled train-clean images


def test_shift_without_adaptation_keeps_the_clean_threshold(run):
    _, out, _ = run
    rows = json.loads((out / "results.json").read_text())["rows"]
    by = {(r["category"], r["setting"]): r for r in rows}
    for cat in "ab":
        assert by[cat, "shift"]["threshold"] == by[cat, "clean"]["threshold"]
        assert by[cat, "shift_adapted"]["threshold"] != by[cat, "clean"]["threshold"]


def test_outputs_splits_shifted_copy_and_summary(run):
    root, out, _ = run
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) == {"config", "splits", "rows", "summary"}
    assert doc["splits"]["a/seed42"]["test"]["total"] == 2 + 2
    assert format_splits(doc["splits"]).splitlines()[0] == "a/seed42: train 4+0, val 1+1, test 2+2"
    assert (out / "splits" / "a_seed42.csv").is_file()
    assert (out / "shifted" / "seed42" / "b" / "ground_truth" / "blob").is_dir()
    macro = [e for e in doc["summary"] if e["category"] == "macro"]
    assert {e["setting"] for e in macro} == {"clean", "shift", "shift_adapted", "unified"}
    assert not list(out.rglob(".*.tmp"))


def test_existing_results_are_not_replaced(run, capsys):
    _, _, args = run
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_summary_mean_and_std_across_seeds():
    rows = []
    for seed, values in ((1, (0.8, 0.6)), (2, (1.0, 0.8))):
        for cat, v in zip("xy", values):
            rows.append(
                {
                    "setting": "clean",
                    "method": "m",
                    "category": cat,
                    "seed": seed,
                    "image_auroc": v,
                    "pixel_auroc": None,
                    "aupro": None,
                    "f1": v,
                    "oracle_f1": v,
                    "fit_seconds": 1.0,
                    "predict_ms_per_image": 2.0,
                }
            )
    summary = {e["category"]: e for e in summarize(rows)}
    assert summary["x"]["image_auroc"] == pytest.approx(0.9) and summary["x"]["image_auroc_std"] == pytest.approx(0.1)
    # macro: per-seed means 0.7 and 0.9 -> 0.8 +- 0.1
    assert summary["macro"]["image_auroc"] == pytest.approx(0.8)
    assert summary["macro"]["image_auroc_std"] == pytest.approx(0.1)
    assert summary["macro"]["pixel_auroc"] is None and not math.isnan(summary["macro"]["fit_seconds"])
    table = format_table(summarize(rows))
    assert "macro" in table and "0.8000±0.1000" in table and "n/a" in table


def cells(table: str) -> list[list[str]]:
    """The text of the td cells of every body row of an HTML table."""
    body = table.split("<tbody>")[1]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def test_report_links_every_row_to_its_run_report(run):
    _, out, _ = run
    rows = json.loads((out / "results.json").read_text())["rows"]
    page = (out / "report.html").read_text(encoding="utf-8")
    links = [unquote(html.unescape(h)) for h in re.findall(r'<a class="run" href="([^"]+)"', page)]
    assert links == [f"{run_folder(r)}/report.html" for r in rows]
    for row, link in zip(rows, links):
        run_page = (out / link).read_text(encoding="utf-8")
        assert f"{row['category']} / patchcore / {row['setting']} / seed 42" in run_page
        assert len(re.findall(r'<figure class="tile', run_page)) == row["n_test"]
        assert json.loads((out / link).with_name("metrics.json").read_text())["f1"] == row["f1"]


def test_report_table_matches_results_json(run):
    _, out, _ = run
    doc = json.loads((out / "results.json").read_text())
    results = cells((out / "report.html").read_text(encoding="utf-8").split("<table")[1])
    assert len(results) == len(doc["summary"]) == 4 * 3  # (a, b, macro) x 4 settings
    for got, entry in zip(results, doc["summary"]):
        assert got[:3] == [entry["setting"], entry["method"], entry["category"]]
        assert [m.key for m in SUMMARY][:4] == ["image_auroc", "pixel_auroc", "aupro", "f1"]
        assert got[3] == f"{entry['image_auroc']:.4f}" and got[6] == f"{entry['f1']:.4f}"
        if entry["category"] == "macro":
            per_row = [r["image_auroc"] for r in doc["rows"] if r["setting"] == entry["setting"]]
            assert float(got[3]) == pytest.approx(sum(per_row) / 2, abs=5e-4)


def test_report_command_rebuilds_the_benchmark_page_and_its_archive(run, capsys):
    _, out, _ = run
    before = (out / "report.html").read_text(encoding="utf-8")
    (out / "report.html").unlink()
    assert main(["report", str(out), "--zip"]) == 0
    assert (out / "report.html").read_text(encoding="utf-8") == before
    names = zipfile.ZipFile(zip_path(out)).namelist()
    assert "run/report.html" in names and "run/runs/a/patchcore/unified/seed42/report.html" in names
    assert "archive:" in capsys.readouterr().out


def test_benchmark_page_escapes_names_and_marks_missing_runs(tmp_path):
    evil = "<b>x<b>"  # a folder name: no "/"
    row = {
        "category": evil,
        "method": "m",
        "setting": "clean",
        "seed": 1,
        "image_auroc": 0.5,
        "pixel_auroc": None,
        "aupro": None,
        "f1": 0.5,
        "oracle_f1": 0.5,
        "threshold": 1.0,
        "fit_seconds": 1.0,
        "predict_ms_per_image": 2.0,
    }
    doc = {
        "config": {"data": f"/d/{evil}", "categories": [evil], "methods": ["m"], "seeds": [1]},
        "splits": {f"{evil}/seed1": {"train": {"normal": 3, "anomalous": 0}}},
        "rows": [row],
        "summary": summarize([row]),
    }
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page = write_benchmark_report(tmp_path).read_text(encoding="utf-8")
    assert evil not in page and page.count("&lt;b&gt;x&lt;b&gt;") >= 4
    assert 'class="run"' not in page and "no report" in page


def _tampered_results(tmp_path, change) -> int:
    row = {"category": "a", "method": "m", "setting": "clean", "seed": 1, "threshold": 1.0}
    row |= dict.fromkeys(("image_auroc", "pixel_auroc", "aupro", "f1", "oracle_f1"), 0.5)
    row |= {"fit_seconds": 1.0, "predict_ms_per_image": 2.0}
    doc = {"config": {"categories": ["a"], "seeds": [1]}, "splits": {}, "rows": [row], "summary": summarize([row])}
    change(doc)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return main(["report", str(tmp_path)])


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["rows"][0].update(category="../../elsewhere"),
        lambda d: d["rows"][0].update(seed="1"),
        lambda d: d["rows"][0].update(image_auroc="0.5"),
        lambda d: d["rows"].append("not an object"),
        lambda d: d["summary"][0].update(seeds="3"),
        lambda d: d["summary"][0].pop("method"),
        lambda d: d["config"].update(categories=7),
        lambda d: d.update(splits={"a/seed1": {"train": {"normal": -1}}}),
        lambda d: d.update(splits={"a/seed1": []}),
        lambda d: d["rows"][0].update(deep=json.loads("[" * 40 + "]" * 40)),  # nested too deep
    ],
)
def test_report_refuses_tampered_benchmark_results_in_one_line(tmp_path, capsys, change):
    assert _tampered_results(tmp_path, change) == 2
    err = capsys.readouterr().err
    assert err.startswith("anomap: error: ") and err.count("\n") == 1 and "results.json" in err
    assert not (tmp_path / "report.html").exists()


def test_report_accepts_untampered_benchmark_results(tmp_path, capsys):
    assert _tampered_results(tmp_path, lambda d: None) == 0 and (tmp_path / "report.html").is_file()
