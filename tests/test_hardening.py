"""Bad input through the `anomap` command: one clear line on stderr and exit 2, or the bad file
skipped and counted where asked; existing outputs never replaced silently; reruns are identical."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.backbones import efficientnet_lite0_classifier
from anomap.cli import main

from conftest import make_category, patchcore_file, texture

FAST = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--device", "cpu"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("anomap: error: ")
    for name in names:
        assert name in err, (name, err)


def good_image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(texture(np.random.default_rng(seed))).save(path)
    return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header claims side x side RGB pixels, without any pixel data."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    return path


def bad_images(folder: Path) -> dict[str, Path]:
    """One unusable image of every kind, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(texture(np.random.default_rng(1))).save(png, "PNG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    bomb_png(folder / "bomb.png")
    return {p.stem: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def model(toy_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "toy.anomap"
    assert main(["fit", "--data", str(toy_root), "--category", "toy", "--out", str(path), *FAST, "--seed", "0"]) == 0
    return path


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()))


# ---- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "tiny", "bomb"])
def test_predict_stops_at_a_bad_image_with_one_line(capsys, tmp_path, model, kind):
    good_image(tmp_path / "in" / "a.png")
    bad = bad_images(tmp_path / "bad")[kind]
    shutil.copy(bad, tmp_path / "in" / bad.name)
    code, _, err = run(capsys, "predict", model, tmp_path / "in", "--out", tmp_path / "out")
    assert_one_line_error(code, err, bad.name)
    assert not (tmp_path / "out" / "scores.csv").exists()


def test_predict_debug_shows_the_traceback(tmp_path, model):
    from anomap.errors import DataError

    with pytest.raises(DataError, match="empty.png"):
        main(["--debug", "predict", str(model), str(bad_images(tmp_path)["empty"]), "--out", str(tmp_path / "o")])


def test_unreadable_image(capsys, tmp_path, model, monkeypatch):
    locked = good_image(tmp_path / "locked.png")
    real_open = open

    def deny(file, *args, **kw):  # tests run as root, where chmod 000 does not stop reading
        if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr("builtins.open", deny)
    code, _, err = run(capsys, "predict", model, locked, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "locked.png", "permission")


def test_skip_bad_skips_counts_and_lists(capsys, caplog, tmp_path, model):
    folder = tmp_path / "in"
    bad = bad_images(folder)
    good = [good_image(folder / f"good{i}.png", i) for i in range(2)]
    code, out, err = run(capsys, "predict", model, folder, "--out", tmp_path / "out", "--skip-bad")
    assert code == 0, err
    assert "scored 2 images" in out and f"skipped {len(bad)} unusable images" in out
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert [Path(r[0]) for r in rows[1:]] == sorted(good)
    skipped = read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped[0] == ["path", "reason"] and {Path(r[0]) for r in skipped[1:]} == set(bad.values())
    assert all(Path(r[0]).name in r[1] for r in skipped[1:])  # each reason names its file
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "skipped" in r.getMessage()]
    assert len(warnings) == len(bad)
    # the same scores as without the bad files: skipping does not disturb the others
    code, _, _ = run(capsys, "predict", model, *good, "--out", tmp_path / "clean")
    assert [r[1] for r in read_csv(tmp_path / "clean" / "scores.csv")] == [r[1] for r in rows]


def test_skip_bad_with_only_bad_images_is_an_error(capsys, tmp_path, model):
    bad_images(tmp_path / "in")
    code, _, err = run(capsys, "predict", model, tmp_path / "in", "--out", tmp_path / "out", "--skip-bad")
    assert_one_line_error(code, err, "unusable")


def test_unusual_but_valid_images_load(capsys, tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = texture(np.random.default_rng(3))
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "png_inside.jpg", format="PNG")
    tall = Image.fromarray(rgb[:, :64])  # 128 high, 64 wide; shown 64 high, 128 wide
    exif = tall.getexif()
    exif[0x0112] = 6
    tall.save(folder / "rotated.jpg", exif=exif.tobytes())
    code, out, err = run(capsys, "predict", model, folder, "--out", tmp_path / "out")
    assert code == 0, err
    assert len(read_csv(tmp_path / "out" / "scores.csv")) == 6
    heat = next((tmp_path / "out").glob("*_rotated_heatmap.png"))
    assert Image.open(heat).size == (128, 64)


def test_odd_file_names(capsys, tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [
        "with space.png",
        "ünïcødé_图.png",
        "<img src=x>.png",
        os.fsdecode(b"latin1_\xe9\xff.png"),
        "long_" + "x" * 200 + ".png",
    ]
    for i, name in enumerate(names):
        good_image(folder / name, i)
    code, out, err = run(capsys, "predict", model, folder, "--out", tmp_path / "out")
    assert code == 0, err
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert sorted(Path(r[0]).name for r in rows[1:]) == sorted(names)
    assert len(list((tmp_path / "out").glob("*_heatmap.png"))) == len(names)


def test_bad_training_image_stops_fit(capsys, tmp_path):
    root = make_category(tmp_path / "data", n_train=3, n_good=1, n_bad=1)
    (root / "toy/train/good/002.png").write_bytes(b"")
    code, _, err = run(capsys, "fit", "--data", root, "--category", "toy", "--out", tmp_path / "m.anomap", *FAST)
    assert_one_line_error(code, err, "002.png", "empty")
    assert not (tmp_path / "m.anomap").exists()


# ---- folders and masks ----------------------------------------------------------------------------


def _category(tmp_path: Path) -> Path:
    return make_category(tmp_path / "data", n_train=2, n_good=2, n_bad=2) / "toy"


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("empty root", "no such category"),
        ("no train/good", "train/good"),
        ("empty train/good", "no training images"),
    ],
)
def test_fit_folder_problems(capsys, tmp_path, breakage, expected):
    cat = _category(tmp_path)
    if breakage == "empty root":
        shutil.rmtree(cat)
    elif breakage == "no train/good":
        shutil.rmtree(cat / "train")
    else:
        for p in (cat / "train/good").iterdir():
            p.unlink()
    code, _, err = run(capsys, "fit", "--data", cat.parent, "--category", "toy", "--out", tmp_path / "m", *FAST)
    assert_one_line_error(code, err, expected)


def test_predict_empty_folder_and_symlink_loop(capsys, tmp_path, model):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "predict", model, tmp_path / "empty", "--out", tmp_path / "o1")
    assert_one_line_error(code, err, "no images", "empty")
    good_image(tmp_path / "loop" / "a.png")
    os.symlink(tmp_path / "loop", tmp_path / "loop" / "again")
    code, _, err = run(capsys, "predict", model, tmp_path / "loop", "--out", tmp_path / "o2")
    assert code == 0, err
    assert len(read_csv(tmp_path / "o2" / "scores.csv")) == 2


def _evaluate(capsys, model: Path, cat: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "evaluate", model, "--data", cat.parent, "--category", cat.name, "--json", *extra)


def test_evaluate_mask_problems(capsys, tmp_path, model):
    cat = _category(tmp_path)
    (cat / "ground_truth/blob/001_mask.png").unlink()
    assert_one_line_error(*_evaluate(capsys, model, cat)[::2], "001.png", "no mask")
    Image.new("L", (128, 128)).save(cat / "ground_truth/blob/001_mask.png")
    Image.new("L", (128, 128)).save(cat / "ground_truth/blob/007_mask.png")
    assert_one_line_error(*_evaluate(capsys, model, cat)[::2], "007_mask.png")
    (cat / "ground_truth/blob/007_mask.png").unlink()
    Image.new("L", (64, 128)).save(cat / "ground_truth/blob/001_mask.png")
    assert_one_line_error(*_evaluate(capsys, model, cat)[::2], "001_mask.png", "64x128")


def test_evaluate_non_binary_masks_count_any_non_zero(capsys, tmp_path, model):
    """Policy: every non-zero mask pixel is anomalous, so 0/1 and 0/128 masks equal 0/255 ones."""
    cat = _category(tmp_path)
    code, out, err = _evaluate(capsys, model, cat)
    assert code == 0, err
    for mask in (cat / "ground_truth/blob").iterdir():
        values = np.asarray(Image.open(mask))
        Image.fromarray(np.where(values > 0, 1 if mask.stem.startswith("000") else 128, 0).astype(np.uint8)).save(mask)
    code, out2, err = _evaluate(capsys, model, cat)
    assert code == 0, err
    assert out2 == out


@pytest.mark.parametrize("remove, expected", [("blob", "no anomalous images"), ("good", "only anomalous")])
def test_evaluate_needs_both_classes(capsys, tmp_path, model, remove, expected):
    """Policy: image metrics need normal and anomalous test images, so evaluation refuses to start."""
    cat = _category(tmp_path)
    shutil.rmtree(cat / "test" / remove)
    shutil.rmtree(cat / "ground_truth" / remove, ignore_errors=True)
    assert_one_line_error(*_evaluate(capsys, model, cat)[::2], str(cat / "test"), expected)


def test_nan_backbone_weights(capsys, tmp_path):
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in efficientnet_lite0_classifier("random").state_dict().items()
    }
    torch.save(state, tmp_path / "nan.pth")
    root = make_category(tmp_path / "data", n_train=2, n_good=1, n_bad=1)
    code, _, err = run(
        capsys,
        "fit",
        "--data",
        root,
        "--category",
        "toy",
        "--out",
        tmp_path / "m.anomap",
        *FAST,
        "--weights",
        tmp_path / "nan.pth",
    )
    assert_one_line_error(code, err, "non-finite")


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_pickle_never_runs(capsys, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"x": _Marker(marker)}, tmp_path / "evil.pth")
    (tmp_path / "evil_raw.pth").write_bytes(pickle.dumps({"x": _Marker(marker)}))
    root = make_category(tmp_path / "data", n_train=2, n_good=1, n_bad=1)
    for name in ("evil.pth", "evil_raw.pth"):
        code, _, err = run(
            capsys,
            "fit",
            "--data",
            root,
            "--category",
            "toy",
            "--out",
            tmp_path / "m.anomap",
            *FAST,
            "--weights",
            tmp_path / name,
        )
        assert_one_line_error(code, err, name)
    assert not marker.exists()


# ---- outputs are never replaced silently; reruns are identical ------------------------------------


def test_every_command_refuses_existing_outputs(capsys, tmp_path, model, toy_root):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    image = good_image(tmp_path / "a.png")
    data = ["--data", toy_root, "--category", "toy"]
    for argv in (
        ["fit", *data, "--out", used / "notes.txt", *FAST],
        ["predict", model, image, "--out", used],
        ["evaluate", model, *data, "--out", used],
        ["demo", "--out", used, "--device", "cpu"],
    ):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, str(used), "--overwrite")
    assert [p.name for p in used.iterdir()] == ["notes.txt"] and (used / "notes.txt").read_text() == "keep me"
    code, _, err = run(capsys, "predict", model, image, "--out", used, "--overwrite")
    assert code == 0, err
    assert (used / "notes.txt").read_text() == "keep me"


def test_same_seed_gives_identical_model_files_and_scores(capsys, tmp_path, toy_root, model):
    again = tmp_path / "again.anomap"
    code, _, err = run(capsys, "fit", "--data", toy_root, "--category", "toy", "--out", again, *FAST, "--seed", "0")
    assert code == 0, err
    assert again.read_bytes() == model.read_bytes()
    test_images = toy_root / "toy" / "test"
    for name, path in (("a", model), ("b", again)):
        assert run(capsys, "predict", path, test_images, "--out", tmp_path / name)[0] == 0
    assert (tmp_path / "a" / "scores.csv").read_bytes() == (tmp_path / "b" / "scores.csv").read_bytes()


def test_later_commands_refuse_damaged_models_and_existing_results(capsys, tmp_path, toy_root):
    damaged = tmp_path / "damaged.anomap"
    damaged.write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "calibrate", damaged, "--data", toy_root, "--category", "toy")
    assert_one_line_error(code, err, "damaged.anomap")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text("{}")
    code, _, err = run(capsys, "benchmark", "--data", toy_root, "--categories", "toy", "--out", tmp_path / "bench")
    assert_one_line_error(code, err, "results.json", "--overwrite")
    assert (tmp_path / "bench" / "results.json").read_text() == "{}"


# ---- names and warnings that reach a terminal ---------------------------------------------------

TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title when printed raw


def damaged_exif_jpeg(path: Path) -> Path:
    """A valid JPEG whose EXIF block is cut short: PIL warns while reading it."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 100  # ImageDescription, stored past the end of the cut block
    Image.fromarray(texture(np.random.default_rng(5))).save(path, exif=exif.tobytes()[:-60])
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_undone_as_pil_does(tmp_path, orientation):
    from PIL import ImageOps

    from anomap.data import load_image

    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "x.png", exif=exif.tobytes())
    with Image.open(tmp_path / "x.png") as saved:
        expected = np.asarray(ImageOps.exif_transpose(saved).convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "x.png"), expected)


@pytest.mark.parametrize("name", [f"evil{TITLE}.png", "two\nlines.png", "bidi\u202egnp.exe.png"])
def test_names_in_errors_are_escaped_and_stay_on_one_line(capsys, tmp_path, model, name):
    bad = tmp_path / name
    bad.write_text("not an image")
    code, _, err = run(capsys, "predict", model, bad, "--out", tmp_path / "out")
    assert_one_line_error(code, err, name.encode("unicode_escape").decode())
    assert not any(c in err for c in "\x1b\x07\u202e")


def test_names_in_success_lines_are_escaped(capsys, tmp_path, model):
    good_image(tmp_path / "in" / "good.png")
    out = tmp_path / f"out{TITLE}\nnext"
    code, printed, _ = run(capsys, "predict", model, tmp_path / "in", "--out", out)
    assert code == 0 and printed.count("\n") == 1
    assert not any(c in printed for c in "\x1b\x07") and "out\\x1b]0;pwned\\x07\\nnext" in printed


def test_warnings_and_skipped_names_are_single_escaped_log_lines(tmp_path):
    folder = tmp_path / "in"
    good_image(folder / "good.png")
    damaged_exif_jpeg(folder / "exif.jpg")
    (folder / f"bad{TITLE}\nname.png").write_text("not an image")
    (tmp_path / "model").mkdir()
    model = patchcore_file(tmp_path / "model")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "anomap.cli",
            "predict",
            str(model),
            str(folder),
            "--out",
            str(tmp_path / "out"),
            "--skip-bad",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert all(line.startswith("anomap: ") for line in lines), done.stderr
    assert not any(c in done.stderr for c in "\x1b\x07")
    assert sum("exif.jpg" in line and "damaged metadata" in line for line in lines) >= 1, done.stderr
    assert sum("\\x1b]0;pwned\\x07\\nname.png" in line for line in lines) == 1, done.stderr
    assert "warnings.warn(" not in done.stderr and "UserWarning" not in done.stderr


def test_library_warnings_become_one_log_line(tmp_path, monkeypatch, caplog, capsys):
    from anomap import report

    def warn_and_write(run_dir):
        warnings.warn("first line\nsecond line", UserWarning, stacklevel=2)
        return Path(run_dir) / "report.html"

    monkeypatch.setattr(report, "write_report", warn_and_write)
    assert main(["report", str(tmp_path)]) == 0
    records = [r for r in caplog.records if "first line" in r.getMessage()]
    assert len(records) == 1 and "UserWarning" not in capsys.readouterr().err
    from anomap.cli import _OneLineFormatter

    assert "\n" not in _OneLineFormatter("anomap: %(message)s").format(records[0])
