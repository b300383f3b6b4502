"""The run folder and its HTML report: contents, ordering, escaping, archives and the CLI."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from anomap import metrics
from anomap.cli import main
from anomap.errors import DataError
from anomap.pictures import save_png
from anomap.report import write_report, write_zip, zip_path

from conftest import make_category

EVIL = "<img src=x onerror=alert(1)>"


def evil_category(root: Path) -> Path:
    """The toy category with one anomalous image (and its mask) named like an HTML tag."""
    make_category(root, "evil")
    blob, truth = root / "evil/test/blob", root / "evil/ground_truth/blob"
    (blob / "000.png").rename(blob / f"{EVIL}.png")
    (truth / "000_mask.png").rename(truth / f"{EVIL}_mask.png")
    return root


def synthetic_run(folder: Path) -> Path:
    """A run folder as another producer would write it: metrics.json and predictions.json only."""
    folder.mkdir()
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.2, 0.9, 0.5, 0.8])
    names = ["a.png", "b.png", f"{EVIL}.png", "d & e.png"]
    images = []
    for i, (name, label, score) in enumerate(zip(names, labels, scores)):
        picture = f"pictures/{i}_{Path(name).stem}.png"
        (folder / "pictures").mkdir(exist_ok=True)
        save_png(folder / picture, np.full((8, 24, 3), 40 * i, np.uint8))
        images.append(
            {
                "path": f"/data/{name}",
                "label": int(label),
                "defect": "good" if label == 0 else "blob",
                "score": float(score),
                "decision": "anomalous" if score >= 0.6 else "normal",
                "picture": picture,
            }
        )
    (folder / "metrics.json").write_text(json.dumps(metrics.evaluate(labels, scores, 0.6)))
    (folder / "predictions.json").write_text(json.dumps({"title": f"run {EVIL}", "threshold": 0.6, "images": images}))
    (folder / "model.anomap").write_bytes(b"tensors")
    return folder


def tiles(page: str) -> list[str]:
    return re.findall(r'<figure class="tile[^"]*"[^>]*>', page)


def test_report_sorts_escapes_and_links(tmp_path):
    run = synthetic_run(tmp_path / "run")
    page = write_report(run).read_text(encoding="utf-8")
    assert EVIL not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "d &amp; e.png" in page
    found = tiles(page)
    assert len(found) == 4
    assert [re.search(r'data-outcome="(\w*)"', t).group(1) for t in found] == ["fp", "tp", "fn", "tn"]  # by score
    assert 'href="pictures/2_%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.png"' in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert not src.startswith(("http:", "https:", "//"))
    for name in ("roc.png", "pr.png", "scores.png", "confusion.png"):
        assert (run / "plots" / name).is_file()
    assert not (run / "plots" / "pro.png").exists()  # no pixel curves saved


def test_report_needs_the_saved_results(tmp_path):
    run = synthetic_run(tmp_path / "run")
    (run / "predictions.json").unlink()
    with pytest.raises(DataError, match="predictions.json"):
        write_report(run)
    (run / "predictions.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        write_report(run)


def test_zip_holds_the_run_without_model_tensors(tmp_path):
    run = synthetic_run(tmp_path / "run")
    with pytest.raises(DataError, match="report"):
        write_zip(run)
    write_report(run)
    archive = write_zip(run)
    assert archive == zip_path(run) == tmp_path / "run.zip"
    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
    expected = {
        "run/report.html",
        "run/metrics.json",
        "run/predictions.json",
        "run/plots/roc.png",
        f"run/pictures/2_{EVIL}.png",
    }
    assert expected <= names
    assert not any(n.endswith(".anomap") for n in names)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(run folder to write, data root with the category `evil` whose file name looks like HTML)."""
    root = evil_category(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "demo"
    return out, root


def test_demo_evaluate_and_report_commands(demo_run, capsys):
    out, root = demo_run
    args = ["--data", str(root), "--category", "evil", "--device", "cpu"]
    assert main(["demo", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.html'}"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert len(tiles(page)) == 6 and EVIL not in page
    saved = json.loads((out / "predictions.json").read_text())
    assert all((out / rec["picture"]).is_file() for rec in saved["images"])
    assert {"method", "params", "threshold"} <= json.loads((out / "model.json").read_text()).keys()
    assert (out / "plots/pro.png").is_file() and (out / "pixel_curves.json").is_file()

    evaluated = out.parent / "evaluated"
    assert main(["evaluate", str(out / "model.anomap"), "--out", str(evaluated), "--zip", *args[:4]]) == 0
    with zipfile.ZipFile(zip_path(evaluated)) as zf:
        assert {"evaluated/report.html", "evaluated/model.json"} <= set(zf.namelist())

    (out / "report.html").unlink()
    assert main(["report", str(out), "--zip"]) == 0
    assert (out / "report.html").read_text(encoding="utf-8") == page
    assert zip_path(out).is_file()


def test_zip_needs_an_out_folder(toy_root, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none.anomap"), "--data", str(toy_root), "--category", "toy", "--zip"]) == 2
    assert "--zip" in capsys.readouterr().err
