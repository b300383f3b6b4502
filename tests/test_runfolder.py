"""Run folders are untrusted input to `anomap report`: archives and plots stay inside the folder,
picture paths resolve inside it, and tampered values give one clear error."""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from anomap import metrics, report
from anomap.cli import main
from anomap.errors import AnomapError, DataError
from anomap.pictures import save_png
from anomap.report import write_report, write_zip, zip_path

SECRET = "top secret, outside the run folder"


def make_run(folder: Path) -> Path:
    """A valid run folder of four images with pictures, as `anomap evaluate` would leave it."""
    labels, scores = [0, 0, 1, 1], [0.2, 0.9, 0.5, 0.8]
    images = []
    (folder / "pictures").mkdir(parents=True)
    for i, (label, score) in enumerate(zip(labels, scores)):
        picture = f"pictures/{i}.png"
        save_png(folder / picture, np.full((8, 8, 3), 60 * i, np.uint8))
        images.append(
            {
                "path": f"/data/{i}.png",
                "label": label,
                "defect": "good" if label == 0 else "blob",
                "score": score,
                "decision": "anomalous" if score >= 0.6 else "normal",
                "picture": picture,
            }
        )
    result = metrics.evaluate(np.array(labels), np.array(scores), 0.6)
    (folder / "metrics.json").write_text(json.dumps(result))
    (folder / "predictions.json").write_text(json.dumps({"title": "run", "threshold": 0.6, "images": images}))
    model = {
        "method": "patchcore",
        "params": {"backbone": "efficientnet_lite0", "layers": ["layer2"]},
        "threshold": 0.6,
        "anomap_version": "0.0",
    }
    (folder / "model.json").write_text(json.dumps(model))
    return folder


def predictions(run: Path) -> dict:
    return json.loads((run / "predictions.json").read_text())


def tamper(run: Path, name: str, doc: object) -> None:
    (run / name).write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")


def report_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["report", *map(str, argv)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("anomap: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


# ---- nothing outside the folder is read or written ----------------------------------------------


def test_zip_does_not_follow_symlinks(tmp_path, secret):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").symlink_to(secret)
    (run / "more").symlink_to(secret.parent, target_is_directory=True)
    (run / "real.txt").write_text("mine")
    write_report(run)
    with zipfile.ZipFile(write_zip(run)) as zf:
        names = set(zf.namelist())
        contents = b"".join(zf.read(n) for n in names)
    assert "run/real.txt" in names and "run/report.html" in names
    assert not any(n.startswith(("run/notes.txt", "run/more")) for n in names), names
    assert SECRET.encode() not in contents


def test_plots_are_not_written_through_a_symlinked_folder(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "plots").symlink_to(elsewhere, target_is_directory=True)
    code, err = report_cli(capsys, run)
    assert_one_line_error(code, err, "plots")
    assert list(elsewhere.iterdir()) == []


def test_report_files_that_are_symlinks_are_replaced_not_followed(tmp_path, secret):
    run = make_run(tmp_path / "run")
    (run / "report.html").symlink_to(secret)
    write_report(run)
    assert secret.read_text() == SECRET and not (run / "report.html").is_symlink()


OUTSIDE_PICTURES = [
    "//host/x.png",
    "http://host/x.png",
    "https://host/x.png",
    "file:///etc/passwd",
    "../outside/secret.txt",
    "pictures/../../outside/secret.txt",
    "ABSOLUTE",
    "pictures\\0.png",
    "C:/pictures/0.png",
    "C:\\pictures\\0.png",
    "\\\\host\\share\\x.png",
    "",
    "pictures//0.png",
    "./pictures/0.png",
    "pictures/",
    "pictures/link.png",
    "pictures/missing.png",
    "pictures",
    "pictures/0.png\n",
    "javascript:alert(1)",
]


@pytest.mark.parametrize("picture", OUTSIDE_PICTURES)
def test_picture_paths_must_resolve_inside_the_folder(tmp_path, secret, picture, capsys):
    run = make_run(tmp_path / "run")
    (run / "pictures/link.png").symlink_to(secret)
    doc = predictions(run)
    doc["images"][2]["picture"] = str(secret) if picture == "ABSOLUTE" else picture
    tamper(run, "predictions.json", doc)
    code, err = report_cli(capsys, run)
    assert_one_line_error(code, err, "predictions.json", "picture")
    assert not (run / "report.html").exists()


def test_picture_names_with_odd_characters_inside_the_folder_are_linked(tmp_path):
    run = make_run(tmp_path / "run")
    doc = predictions(run)
    odd = "pictures/12:30 #1 ?x=ü.png"
    save_png(run / odd, np.zeros((8, 8, 3), np.uint8))
    doc["images"][0]["picture"] = odd
    doc["images"][1]["picture"] = None
    tamper(run, "predictions.json", doc)
    page = write_report(run).read_text(encoding="utf-8")
    assert 'src="pictures/12%3A30%20%231%20%3Fx%3D%C3%BC.png"' in page
    assert "no picture" in page


# ---- tampered values: one clear error -----------------------------------------------------------


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def with_record(key: str, value: object):
    def edit(doc: dict) -> str:
        doc["images"][1][key] = value
        return json.dumps(doc)

    return edit


def whole(text: str):
    return lambda doc: text


PREDICTIONS = {
    "label is a string": with_record("label", "1"),
    "label is 2": with_record("label", 2),
    "label is true": with_record("label", True),
    "label is 0.5": with_record("label", 0.5),
    "score is a string": with_record("score", "high"),
    "score is null": with_record("score", None),
    "score is a list": with_record("score", [1.0]),
    "score is NaN": lambda doc: json.dumps(doc).replace('"score": 0.9', '"score": NaN'),
    "score is Infinity": lambda doc: json.dumps(doc).replace('"score": 0.9', '"score": -Infinity'),
    "score overflows": lambda doc: json.dumps(doc).replace('"score": 0.9', '"score": 1e999'),
    "score of 5000 digits": lambda doc: json.dumps(doc).replace('"score": 0.9', '"score": ' + "9" * 5000),
    "path is a number": with_record("path", 12),
    "path is empty": with_record("path", ""),
    "path holds a lone surrogate": lambda doc: json.dumps(doc).replace('"/data/1.png"', '"/data/\\ud800.png"'),
    "defect is a dict": with_record("defect", {"a": 1}),
    "decision is unknown": with_record("decision", "maybe"),
    "picture is a number": with_record("picture", 3),
    "record is a list": lambda doc: json.dumps({**doc, "images": [*doc["images"][:3], [1, 2]]}),
    "record is null": lambda doc: json.dumps({**doc, "images": [None, *doc["images"]]}),
    "record lacks score": lambda doc: json.dumps({**doc, "images": [{"path": "a.png", "label": 0}]}),
    "images is an object": lambda doc: json.dumps({**doc, "images": {"0": doc["images"][0]}}),
    "images is empty": lambda doc: json.dumps({**doc, "images": []}),
    "top level is a list": lambda doc: json.dumps([doc]),
    "title is a list": lambda doc: json.dumps({**doc, "title": ["a"]}),
    "threshold is a string": lambda doc: json.dumps({**doc, "threshold": "0.5"}),
    "deeply nested": lambda doc: json.dumps(doc)[:-1] + ', "extra": ' + deep(100_000) + "}",
    "nested 1000 deep": lambda doc: json.dumps(doc)[:-1] + ', "extra": ' + deep(1000) + "}",
    "not UTF-8": lambda doc: "\udcff",
    "duplicate keys": lambda doc: json.dumps(doc)[:-1] + ', "images": []}',
}


@pytest.mark.parametrize("case", PREDICTIONS)
def test_tampered_predictions_give_one_clear_error(tmp_path, capsys, case):
    run = make_run(tmp_path / "run")
    text = PREDICTIONS[case](predictions(run))
    (run / "predictions.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    code, err = report_cli(capsys, run)
    assert_one_line_error(code, err, "predictions.json")
    assert not (run / "report.html").exists()


OTHER_FILES = {
    "metrics.json": [
        [1, 2],
        {"image_auroc": "high"},
        {"image_auroc": float("nan")},
        {"threshold": [0.5]},
        {"confusion_matrix": "x"},
        {"confusion_matrix": [[1, 2], [3]]},
        {"confusion_matrix": [[1, 2], [3, -4]]},
        {"confusion_matrix": [[1, 2], [3, 4.5]]},
        {"f1": True},
    ],
    "pixel_curves.json": [
        [],
        {"roc": {"fpr": [0, 1]}},
        {"roc": {"fpr": [0, 1], "tpr": [0]}, "pro": {"fpr": [0], "pro": [0]}},
        {"roc": {"fpr": ["a"], "tpr": [0]}, "pro": {"fpr": [0], "pro": [0]}},
        {"roc": {"fpr": [0, 2], "tpr": [0, 1]}, "pro": {"fpr": [0], "pro": [0]}},
    ],
    "model.json": [[], {"params": [1, 2]}, {"method": 5}, {"anomap_version": {"x": 1}}, {"threshold": "x"}],
}


@pytest.mark.parametrize("name,doc", [(n, d) for n, docs in OTHER_FILES.items() for d in docs])
def test_tampered_metrics_curves_and_model_give_one_clear_error(tmp_path, capsys, name, doc):
    run = make_run(tmp_path / "run")
    if name == "metrics.json":
        doc = doc if not isinstance(doc, dict) else {**json.loads((run / name).read_text()), **doc}
    (run / name).write_text(json.dumps(doc))  # NaN is written as the bare token NaN
    code, err = report_cli(capsys, run)
    assert_one_line_error(code, err, name)


def test_json_files_must_be_small_regular_files_inside_the_folder(tmp_path, secret, capsys, monkeypatch):
    run = make_run(tmp_path / "run")
    (run / "model.json").unlink()
    (run / "model.json").symlink_to(secret)
    assert_one_line_error(*report_cli(capsys, run), "model.json", "symbolic link")
    (run / "model.json").unlink()
    os.mkfifo(run / "pixel_curves.json")  # a reader that opened it would wait for a writer forever
    done = []
    worker = threading.Thread(target=lambda: done.append(report_cli(capsys, run)), daemon=True)
    worker.start()
    worker.join(30)
    assert done, "reading a FIFO named pixel_curves.json blocked"
    assert_one_line_error(*done[0], "pixel_curves.json", "not a regular file")
    (run / "pixel_curves.json").unlink()
    from anomap import runfolder

    monkeypatch.setattr(runfolder, "MAX_JSON_BYTES", (run / "metrics.json").stat().st_size)
    assert_one_line_error(*report_cli(capsys, run), "predictions.json", "larger than")


def test_scores_up_to_the_declared_magnitude_give_a_report(tmp_path, capsys):
    from anomap.runfolder import MAX_MAGNITUDE

    run = make_run(tmp_path / "run")
    doc = predictions(run)
    for rec, score in zip(doc["images"], [-MAX_MAGNITUDE, MAX_MAGNITUDE, 1.0, 0.0]):
        rec["score"] = score
    tamper(run, "predictions.json", doc)
    assert f"{MAX_MAGNITUDE:.4g}" in write_report(run).read_text(encoding="utf-8")
    doc["images"][0]["score"] = 1e308  # finite, but the plots' ranges would overflow
    tamper(run, "predictions.json", doc)
    assert_one_line_error(*report_cli(capsys, run), "predictions.json", "images[0].score")


# ---- the generic property: any tampered value gives a report or one DataError -------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True)
    | st.text(st.characters(exclude_categories=()), max_size=12)
    | st.sampled_from(["pictures/0.png", "//h/x", "../x", "0", ""])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "path",
        "label",
        "score",
        "defect",
        "decision",
        "picture",
        "title",
        "threshold",
        "images",
        "image_auroc",
        "confusion_matrix",
        "f1",
        "method",
        "params",
        "anomap_version",
        "extra",
    ]
)
FILES = ("predictions.json", "metrics.json", "model.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A run folder for the fuzz test, with the untampered text of its JSON files."""
    run = make_run(tmp_path_factory.mktemp("fuzz") / "run")
    return run, {name: (run / name).read_text() for name in FILES}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["record", *FILES]), index=st.integers(0, 3), key=KEYS, value=JSON_VALUES)
def test_any_tampered_value_gives_a_report_or_one_data_error(pristine, monkeypatch, where, index, key, value):
    """Plots are left out here (they are drawn from the same checked values); see the test above."""
    monkeypatch.setattr(report, "write_plots", lambda folder, labels, scores, result, pixel: {})
    run, docs = pristine[0], {name: json.loads(text) for name, text in pristine[1].items()}
    doc = docs["predictions.json"]
    (doc["images"][index] if where == "record" else docs[where])[key] = value
    for name in FILES:
        tamper(run, name, docs[name])
    try:
        page = write_report(run).read_text(encoding="utf-8", errors="surrogateescape")
    except DataError as err:
        assert "\n" not in str(err) and any(name in str(err) for name in FILES)
        event("refused")
        return
    event("report written")
    assert page.count("<figure") == len(doc["images"])
    for score in (r["score"] for r in doc["images"]):
        assert isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


# ---- DIR.zip is not replaced without --overwrite ------------------------------------------------


def test_existing_archive_is_kept_without_overwrite(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    zip_path(run).write_bytes(b"an older archive")
    assert_one_line_error(*report_cli(capsys, run, "--zip"), "run.zip", "--overwrite")
    assert zip_path(run).read_bytes() == b"an older archive"
    assert main(["report", str(run), "--zip", "--overwrite"]) == 0
    with zipfile.ZipFile(zip_path(run)) as zf:
        assert "run/report.html" in zf.namelist()
    with pytest.raises(AnomapError, match="--overwrite"):
        write_zip(run)


def test_report_help_promises_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in text and "(replaced)" not in text
