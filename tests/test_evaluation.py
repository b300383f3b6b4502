"""One way through an evaluation: the record, the run folder written from it (each image decoded
once), and the same pictures as `anomap predict` draws."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anomap import evaluation, load
from anomap.cli import main
from anomap.data import MVTecAD

from conftest import patchcore_file


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return patchcore_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def run(model, toy_root, tmp_path_factory, request):
    """(the run folder written by `write_run`, the evaluation, the images `write_run` decoded)."""
    det, test = load(model), MVTecAD(toy_root, "toy").test
    ev = evaluation.evaluate(det, test)
    decoded, real = [], evaluation.load_image
    patch = pytest.MonkeyPatch()
    patch.setattr(evaluation, "load_image", lambda path: decoded.append(Path(path)) or real(path))
    request.addfinalizer(patch.undo)
    out = tmp_path_factory.mktemp("run") / "run"
    evaluation.write_run(out, det, ev, title="toy")
    patch.undo()
    return out, ev, decoded


def test_the_record_holds_prediction_masks_and_metrics(run):
    _, ev, _ = run
    assert len(ev.samples) == len(ev.prediction.scores) == len(ev.masks) == 6
    assert ev.masks[[s.label == 0 for s in ev.samples]].sum() == 0 and ev.masks.any()
    assert ev.metrics["confusion_matrix"][0][0] + ev.metrics["confusion_matrix"][0][1] == 3


def test_each_image_is_decoded_once_for_all_its_pictures(run):
    out, ev, decoded = run
    assert sorted(decoded) == sorted(Path(s.path) for s in ev.samples)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "metrics.json",
        "predictions.json",
        "model.json",
        "pixel_curves.json",
        "report.html",
        "images/scores.csv",
        "plots/roc.png",
    } <= names
    for kind in ("pictures/*.png", "images/*_heatmap.png", "images/*_mask.png"):
        assert len(list(out.glob(kind))) == 6, kind
    records = json.loads((out / "predictions.json").read_text())["images"]
    assert [r["picture"] for r in records] == [
        f"pictures/{evaluation.picture_stem(i, s.path)}.png" for i, s in enumerate(ev.samples)
    ]
    assert json.loads((out / "metrics.json").read_text()) == ev.metrics


def test_run_pictures_are_the_pictures_predict_draws(run, model, tmp_path):
    out, ev, _ = run
    paths = [str(s.path) for s in ev.samples]
    assert main(["predict", str(model), *paths, "--out", str(tmp_path / "p")]) == 0
    rows = list(csv.reader((tmp_path / "p" / "scores.csv").open()))
    assert rows == list(csv.reader((out / "images" / "scores.csv").open()))
    for i, path in enumerate(paths):
        stem = evaluation.picture_stem(i, path)
        for kind in ("heatmap", "mask"):
            name = f"{stem}_{kind}.png"
            assert (tmp_path / "p" / name).read_bytes() == (out / "images" / name).read_bytes()
    assert np.allclose([float(r[1]) for r in rows[1:]], ev.prediction.scores, rtol=1e-5)
