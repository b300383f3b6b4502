import argparse
import csv
import json

import numpy as np
import pytest
from PIL import Image

from anomap import load
from anomap.cli import build_parser, main
from anomap.detectors import methods

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
    args = [
        "fit",
        "--data",
        str(toy_root),
        "--category",
        "toy",
        "--out",
        str(out),
        *FAST,
        "--param",
        "sampler=random",
        "--param",
        "k=2",
    ]
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
    for key in (
        "image_auroc",
        "image_auprc",
        "pixel_auroc",
        "aupro",
        "f1",
        "precision",
        "recall",
        "accuracy",
        "threshold",
    ):
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


def all_parsers(parser: argparse.ArgumentParser, name: str = "anomap"):
    """(command name, parser) of the parser and every subcommand, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_a_help_string():
    commands = dict(all_parsers(build_parser()))
    assert {"anomap fit", "anomap predict", "anomap evaluate", "anomap benchmark"} <= commands.keys()
    bare = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, parser in commands.items()
        for action in parser._actions
        if not (action.help and action.help.strip())
    ]
    assert bare == []
    for parser in commands.values():
        assert parser.format_help()  # every %(...)s in a help string expands


def test_method_choices_are_the_registered_methods(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--data", "d", "--category", "c", "--out", "m", "--method", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(m in err for m in methods())


@pytest.fixture(scope="module")
def both(model, toy_root, tmp_path_factory):
    """The predict folder of the toy test images with the default pictures (both)."""
    out = tmp_path_factory.mktemp("predicted") / "both"
    assert main(["predict", str(model), str(toy_root / "toy" / "test"), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("which", ["none", "mask", "heatmap"])
def test_predict_writes_only_the_pictures_asked_for_with_the_same_scores(model, toy_root, both, tmp_path, which):
    out = tmp_path / which
    assert main(["predict", str(model), str(toy_root / "toy" / "test"), "--out", str(out), "--pictures", which]) == 0
    assert list(csv.reader((out / "scores.csv").open())) == list(csv.reader((both / "scores.csv").open()))
    for kind in ("mask", "heatmap"):
        written = sorted(p.name for p in out.glob(f"*_{kind}.png"))
        if kind == which:
            assert written == sorted(p.name for p in both.glob(f"*_{kind}.png")) and len(written) == 6
            assert all((out / n).read_bytes() == (both / n).read_bytes() for n in written)
        else:
            assert written == []


def test_a_picture_does_not_depend_on_the_other_images_scored(model, toy_root, both, tmp_path):
    one = toy_root / "toy" / "test" / "blob" / "001.png"
    assert main(["predict", str(model), str(one), "--out", str(tmp_path / "alone")]) == 0
    assert list(csv.reader((both / "scores.csv").open()))[2][0] == str(one)  # row 1 of the whole test folder
    for kind in ("heatmap", "mask"):
        alone = np.asarray(Image.open(tmp_path / "alone" / f"0000_001_{kind}.png"), np.int16)
        among = np.asarray(Image.open(both / f"0001_001_{kind}.png"), np.int16)
        # the network's float sums may round differently for a batch of 1 and of 6 (another
        # kernel blocking), which can move a pixel across one colour level or the threshold;
        # a dependence on the other images (a batch-wide scale) would change most pixels
        changed = np.abs(alone - among).reshape(len(alone), len(alone[0]), -1).max(-1)
        assert kind == "mask" or changed.max() <= 4  # a mask pixel is either kept or flipped
        assert (changed > 0).mean() <= 0.01


def test_sign_key_and_key_options(toy_root, tmp_path, capsys):
    """`fit --sign-key` signs; `--key` accepts that model, refuses an unsigned or otherwise signed
    one in one line, and `calibrate --key` keeps the rewritten file signed."""
    key, other, short = tmp_path / "key", tmp_path / "other", tmp_path / "short"
    key.write_bytes(b"0123456789abcdef-secret\n")
    other.write_bytes(b"another secret of 32 bytes......")
    short.write_bytes(b"tiny")
    signed, plain = tmp_path / "signed.anomap", tmp_path / "plain.anomap"
    fit = ["fit", "--data", str(toy_root), "--category", "toy", *FAST]
    assert main([*fit, "--out", str(signed), "--sign-key", str(key)]) == 0
    assert main([*fit, "--out", str(plain), "--sign-key", str(short)]) == 2  # refused before fitting
    assert not plain.exists() and "at least 16 bytes" in capsys.readouterr().err
    assert load(signed, key=b"0123456789abcdef-secret").threshold_ is not None
    evaluate = ["evaluate", "--data", str(toy_root), "--category", "toy", "--json"]
    assert main([*evaluate[:1], str(signed), *evaluate[1:], "--key", str(key)]) == 0
    capsys.readouterr()
    for wrong in (other, tmp_path / "missing"):
        assert main(["predict", str(signed), str(toy_root), "--out", str(tmp_path / "p"), "--key", str(wrong)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("not signed with this key" in err or "cannot read the key file" in err)
    assert main(["calibrate", str(signed), "--data", str(toy_root), "--category", "toy", "--key", str(key)]) == 0
    assert load(signed, key=b"0123456789abcdef-secret").threshold_ is not None
    assert main(["calibrate", str(signed), "--data", str(toy_root), "--category", "toy", "--key", str(other)]) == 2
