"""Model selection on the validation split: the test split is never read, the best candidate by
the stated criterion is kept and recorded, the default is taken without anomalous validation
images, and the record travels in the model file."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from anomap import PaDiM, Prediction, evaluation, load, metrics, runfolder, runs, selection
from anomap.cli import main
from anomap.data import MVTecAD
from anomap.detectors.model_file import read_model_file, write_model_file
from anomap.errors import AnomapError, DataError, ModelFileError
from anomap.protocol import split_category
from anomap.report import write_report

from conftest import make_category

FAST = {"image_size": 64, "device": "cpu", "seed": 0}


def _poison(paths) -> None:
    for path in paths:
        path.write_bytes(b"not an image")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A category whose test-split images and masks are unreadable: only train and val are usable."""
    root = make_category(tmp_path_factory.mktemp("poisoned"), n_bad=4)
    split = split_category(MVTecAD(root, "toy"), 5)
    _poison([s.path for s in split.test] + [s.mask_path for s in split.test if s.mask_path is not None])
    return root


@pytest.fixture(scope="module")
def selected(poisoned):
    return selection.fit_auto(poisoned, "toy", 5, **FAST)


def test_selection_never_reads_the_test_split(selected):
    det, record = selected  # fitting and ranking all candidates on the poisoned root succeeded
    assert record["n_val_anomalous"] >= 1 and record["n_val_normal"] >= 1
    assert len(record["candidates"]) == len(selection.BACKBONES) * len(selection.VARIANTS)


def test_poisoning_would_be_noticed(poisoned, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(poisoned, root)
    split = split_category(MVTecAD(root, "toy"), 5)
    _poison([split.val[-1].path])  # the control: a poisoned validation image is read, and fails
    with pytest.raises(DataError):
        selection.fit_auto(root, "toy", 5, backbone="efficientnet_lite0", **FAST)


def test_the_weighted_choice_is_kept_with_its_recorded_figures(selected, poisoned):
    det, record = selected
    cands = record["candidates"]
    used = [c for c in cands if c["score_weight"] or c["map_weight"]]
    assert sum(c["score_weight"] for c in cands) >= 1 and sum(c["map_weight"] for c in cands) >= 1
    if len(used) == 1:
        assert (det.method, det.backbone) == (used[0]["method"], used[0]["backbone"])
        assert getattr(det, "border", None) == used[0].get("border")
    else:
        assert det.method == "ensemble"
        specs = [{**c, "method": c["method"]} for c in used]
        assert [
            (m["method"], m["backbone"], m.get("border"), m["score_weight"], m["map_weight"]) for m in det.members
        ] == [(c["method"], c["backbone"], c.get("border"), c["score_weight"], c["map_weight"]) for c in specs]
    assert record["chosen"] == {"method": det.method, "backbone": det.backbone}
    for c in cands:
        assert c["aupro"] is not None and c["pixel_auroc"] is not None  # the toy's anomalies have masks
        assert c["score"] == pytest.approx((c["image_auroc"] + c["pixel_auroc"] + c["aupro"]) / 3)
    val = split_category(MVTecAD(poisoned, "toy"), 5).val
    labels = np.array([s.label for s in val])
    again = selection.validation_figures(labels, selection._val_masks(val, det), det.predict(val))
    assert again["score"] == pytest.approx(record["validation"]["score"], abs=1e-4)
    assert record["validation"]["score"] >= max(c["image_auroc"] for c in cands) / 3  # a sanity floor


def test_forward_select_adds_the_best_addition_until_none_helps():
    # value: how close the weight shares come to (0.5, 0.25, 0.25, 0); ties go to the higher tiebreak
    target = np.array([0.5, 0.25, 0.25, 0.0])

    def value(counts):
        return -np.abs(np.array(counts) / sum(counts) - target).sum()

    assert selection.forward_select(4, value, [0, 0, 0, 0]) == [2, 1, 1, 0]
    assert selection.forward_select(4, value, [0, 0, 0, 0], steps=1) == [1, 0, 0, 0]
    flat = selection.forward_select(3, lambda counts: 1.0, [0.2, 0.9, 0.9])
    assert flat == [0, 1, 0]  # all equal: one step, the higher tiebreak, then the earlier one


def test_fuse_is_the_weighted_mean_of_standardised_predictions():
    rng = np.random.default_rng(1)
    preds = [Prediction(rng.random(5, np.float32), rng.random((5, 3, 3), np.float32), None) for _ in range(2)]
    normal = [rng.random(6), rng.random(6) * 10]
    fused = selection.fuse([selection.standardized(p, n) for p, n in zip(preds, normal)], [3, 1], [0, 2])

    def z(v, n):
        return (v - n.mean()) / n.std(ddof=1)

    np.testing.assert_allclose(
        fused.scores, (3 * z(preds[0].scores, normal[0]) + z(preds[1].scores, normal[1])) / 4, rtol=1e-5
    )
    np.testing.assert_allclose(fused.maps, z(preds[1].maps, normal[1]), rtol=1e-5, atol=1e-6)


def test_without_masks_the_score_is_image_auroc():
    pred = Prediction(np.array([0.1, 0.9, 0.4], np.float32), np.zeros((3, 4, 4), np.float32), None)
    figures = selection.validation_figures(np.array([0, 1, 1]), None, pred)
    assert figures == {"image_auroc": 1.0, "pixel_auroc": None, "aupro": None, "score": 1.0}


def test_without_anomalous_validation_images_the_default_is_taken(tmp_path, caplog):
    root = make_category(tmp_path, n_bad=1)  # 30% of one defect image rounds to none for validation
    det, record = selection.fit_auto(root, "toy", 0, **FAST)
    assert record["n_val_anomalous"] == 0 and record["candidates"] == []
    assert record["chosen"] == selection.DEFAULT
    assert (det.method, det.backbone) == (selection.DEFAULT["method"], selection.DEFAULT["backbone"])
    assert "no candidate can be ranked" in record["note"] and "no candidate can be ranked" in caplog.text


def test_method_specific_parameters_are_refused():
    with pytest.raises(AnomapError, match="coreset_ratio"):
        selection.select(None, coreset_ratio=0.5)


def test_record_is_kept_in_the_model_file(selected, tmp_path):
    det, record = selected
    path = selection.save_selected(det, record, tmp_path / "auto.anomap")
    assert selection.read_selection(path) == json.loads(json.dumps(record))
    assert load(path).method == det.method
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    plain = PaDiM(**FAST, backbone="efficientnet_lite0").fit(images).save(tmp_path / "plain.anomap")
    assert selection.read_selection(plain) is None


def test_record_survives_calibration_and_any_later_save(selected, poisoned, tmp_path):
    det, record = selected
    path = selection.save_selected(det, record, tmp_path / "auto.anomap")
    runs.calibrate_file(path, poisoned, "toy", seed=5)  # loads, sets the threshold on val, saves again
    assert selection.read_selection(path) == json.loads(json.dumps(record))
    again = load(path).save(tmp_path / "again.anomap")
    assert selection.read_selection(again) == json.loads(json.dumps(record))


def test_damaged_record_in_a_model_file_is_refused(selected, tmp_path):
    det, record = selected
    meta, tensors = read_model_file(selection.save_selected(det, record, tmp_path / "auto.anomap"))
    meta = {k: v for k, v in meta.items() if k != "sha256"} | {"selection": "[1, 2]"}
    with pytest.raises(ModelFileError, match="selection must be a JSON object"):
        load(write_model_file(tmp_path / "damaged.anomap", tensors, meta))


def _run_folder(folder, model: dict):
    """A run folder of two scored images and the given model.json."""
    images = [{"path": f"/d/{i}.png", "label": i, "score": 0.1 + i} for i in (0, 1)]
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics.evaluate(np.array([0, 1]), np.array([0.1, 1.1]), 0.6)))
    (folder / "predictions.json").write_text(json.dumps({"title": "auto", "threshold": 0.6, "images": images}))
    (folder / "model.json").write_text(json.dumps(model))
    return folder


def test_report_shows_the_selection_record(selected, tmp_path):
    det, record = selected
    model = {"method": det.method, "params": det.get_params(), "threshold": 0.6, "selection": record}
    page = write_report(_run_folder(tmp_path / "run", model)).read_text()
    assert record["criterion"] in page
    rows = re.findall(r"<tr( class=\"chosen\")?><td>([\w ()]+)</td><td>(\w+)</td>", page)
    cands = record["candidates"]
    assert [(m, b) for _, m, b in rows] == [(runfolder.candidate_label(c), c["backbone"]) for c in cands]
    assert [bool(chosen) for chosen, _, _ in rows] == [bool(c["score_weight"] or c["map_weight"]) for c in cands]
    best = max(cands, key=lambda c: c["score"])
    assert f"{best['score']:.4f}" in page


def test_an_evaluation_of_a_selected_model_reports_its_record(selected, poisoned, tmp_path):
    det, record = selected
    loaded = load(selection.save_selected(det, record, tmp_path / "auto.anomap"))
    val = split_category(MVTecAD(poisoned, "toy"), 5).val  # readable, unlike the poisoned test part
    page = evaluation.write_run(tmp_path / "run", loaded, evaluation.evaluate(loaded, val), "auto").read_text()
    assert json.loads((tmp_path / "run/model.json").read_text())["selection"] == json.loads(json.dumps(record))
    used = sum(1 for c in record["candidates"] if c["score_weight"] or c["map_weight"])
    assert record["criterion"] in page and page.count('<tr class="chosen">') == used


def test_report_refuses_a_damaged_selection_record(selected, tmp_path):
    det, record = selected
    model = {"method": det.method, "selection": {**record, "candidates": [{"method": "padim", "score": "high"}]}}
    with pytest.raises(DataError, match="selection.candidates"):
        write_report(_run_folder(tmp_path / "run", model))


def test_cli_fit_auto(poisoned, tmp_path, capsys):
    out = tmp_path / "auto.anomap"
    args = [
        "fit",
        "--data",
        str(poisoned),
        "--category",
        "toy",
        "--method",
        "auto",
        "--backbone",
        "efficientnet_lite0",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    assert main(args + ["--out", str(out), "--split-seed", "5"]) == 0
    printed = capsys.readouterr().out
    record = selection.read_selection(out)
    assert [c["backbone"] for c in record["candidates"]] == ["efficientnet_lite0"] * len(selection.VARIANTS)
    assert f"chosen: {record['chosen']['method']} on efficientnet_lite0" in printed
    assert record["split_seed"] == 5
    assert main(args + ["--out", str(tmp_path / "no.anomap")]) == 2
    assert "give --split-seed" in capsys.readouterr().err


def test_benchmark_has_an_auto_row(tmp_path):
    root = make_category(tmp_path / "data", n_bad=4)
    out = tmp_path / "bench"
    args = [
        "benchmark",
        "--data",
        str(root),
        "--categories",
        "toy",
        "--methods",
        "patchcore,auto",
        "--backbone",
        "efficientnet_lite0",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["patchcore", "auto"]
    record = json.loads(next(out.glob("runs/toy/auto/clean/*/selection.json")).read_text())
    assert len(record["candidates"]) == len(selection.VARIANTS)
    assert record["chosen"]["backbone"] == "efficientnet_lite0"
