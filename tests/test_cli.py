import csv
import json

import numpy as np
import pytest
from PIL import Image

from anomap import load
from anomap.cli import main

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(toy_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "toy.anomap"
    assert main(["fit", "--data", str(toy_root), "--category", "toy", "--out", str(path), *FAST]) == 0
    return path


def test_fit_writes_a_loadable_model_with_threshold(model):
    det = load(model)
    assert det.method == "patchcore" and det.backbone == "efficientnet_lite0"
    assert det.threshold_ is not None


def test_fit_param_option_reaches_the_detector(toy_root, tmp_path):
    out = tmp_path / "m.anomap"
    args = ["fit", "--data", str(toy_root), "--category", "toy", "--out", str(out), *FAST,
            "--param", "sampler=random", "--param", "k=2"]
    assert main(args) == 0
    det = load(out)
    assert det.sampler == "random" and det.k == 2


def test_predict_writes_scores_and_pictures(model, toy_root, tmp_path):
    out = tmp_path / "pred"
    folder = toy_root / "toy" / "test" / "blob"
    single = toy_root / "toy" / "test" / "good" / "000.png"
    assert main(["predict", str(model), str(folder), str(single), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 4
    assert {r["decision"] for r in rows[:3]} == {"anomalous"}
    assert rows[3]["decision"] == "normal"
    heat = sorted(out.glob("*_heatmap.png"))
    masks = sorted(out.glob("*_mask.png"))
    assert len(heat) == len(masks) == 4
    with Image.open(masks[0]) as im:
        assert im.size == (128, 128) and set(np.unique(np.asarray(im))) <= {0, 255}


def test_evaluate_json_has_every_metric(model, toy_root, capsys):
    assert main(["evaluate", str(model), "--data", str(toy_root), "--category", "toy", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "f1", "precision", "recall",
                "accuracy", "threshold"):
        assert key in result
    assert result["image_auroc"] == 1.0
    assert 0.5 < result["aupro"] <= 1.0


def test_demo_on_tiny_data(toy_root, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--data", str(toy_root), "--category", "toy", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "image_auroc" in text and str(out) in text
    assert (out / "model.anomap").is_file() and (out / "metrics.json").is_file()


def test_existing_model_is_not_overwritten(model, toy_root, capsys):
    before = model.read_bytes()
    code = main(["fit", "--data", str(toy_root), "--category", "toy", "--out", str(model), *FAST])
    err = capsys.readouterr().err
    assert code != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert model.read_bytes() == before


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    code = main(["fit", "--data", str(tmp_path), "--category", "missing", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
