"""Nothing lost to a race or a wrong path: outputs are placed exclusively unless --overwrite, a full
disk keeps the old file with one clear line, and no command writes into its own input."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from safetensors import SafetensorError

from anomap import load, runs
from anomap._io import write_bytes, write_text
from anomap.cli import main
from anomap.errors import AnomapError

from conftest import make_category, patchcore_file

FIT = ["--backbone", "efficientnet_lite0", "--weights", "random", "--image-size", "64", "--device", "cpu"]


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    assert err.startswith("anomap: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def data(tmp_path) -> Path:
    return make_category(tmp_path / "data", n_train=3, n_good=1, n_bad=1)


@pytest.fixture
def fitted(tmp_path, monkeypatch):
    """`anomap fit` returns this small detector at once instead of fitting one."""
    (tmp_path / "fitted").mkdir()
    det = load(patchcore_file(tmp_path / "fitted"))  # its tensors map that file: leave it alone
    monkeypatch.setattr(runs, "fit_category", lambda *args, **params: det)
    return det


# ---- exclusive placement ------------------------------------------------------------------------


def test_a_file_created_during_fit_is_not_replaced(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "models" / "m.anomap"
    out.parent.mkdir()
    fit = runs.fit_category

    def fit_while_another_program_writes(*args, **params):
        det = fit(*args, **params)
        out.write_bytes(b"written meanwhile by someone else")
        return det

    monkeypatch.setattr(runs, "fit_category", fit_while_another_program_writes)
    code, err = run(capsys, "fit", "--data", data, "--category", "toy", "--out", out, *FIT)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert out.read_bytes() == b"written meanwhile by someone else"
    assert leftovers(out.parent) == []


def test_two_concurrent_fits_to_one_path_leave_one_whole_model(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.anomap"
    both_fitted = threading.Barrier(2, timeout=120)
    fit = runs.fit_category

    def fit_then_wait(*args, **params):
        det = fit(*args, **params)
        both_fitted.wait()  # both have passed the start-up check; neither has saved
        return det

    monkeypatch.setattr(runs, "fit_category", fit_then_wait)
    codes: dict[int, int] = {}

    def fit_with(seed: int) -> None:
        codes[seed] = main(
            ["fit", "--data", str(data), "--category", "toy", "--out", str(out), *FIT, "--seed", str(seed)]
        )

    threads = [threading.Thread(target=fit_with, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    err = capsys.readouterr().err
    assert sorted(codes.values()) == [0, 2], err
    winner = next(seed for seed, code in codes.items() if code == 0)
    assert load(out).get_params()["seed"] == winner
    assert "already exists" in err and err.count("\n") == 1
    assert leftovers(tmp_path) == []


def test_concurrent_writers_exactly_one_wins(tmp_path):
    target = tmp_path / "out.txt"
    outcomes: dict[int, str] = {}
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        try:
            write_text(target, f"writer {i}\n" * 1000, overwrite=False)
            outcomes[i] = "wrote"
        except AnomapError as err:
            outcomes[i] = str(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if o == "wrote"]
    assert len(winners) == 1, outcomes
    assert target.read_text() == f"writer {winners[0]}\n" * 1000
    assert all("already exists" in o for i, o in outcomes.items() if i != winners[0])
    assert leftovers(tmp_path) == []
    write_text(target, "replaced", overwrite=True)
    assert target.read_text() == "replaced"


def test_temporary_names_are_not_followed(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old, predictable temporary names
        (tmp_path / f".out.txt.{pid}.tmp").symlink_to(secret)
    write_text(tmp_path / "out.txt", "new")
    assert secret.read_text() == "keep" and (tmp_path / "out.txt").read_text() == "new"


# ---- a full disk --------------------------------------------------------------------------------

DISK_FULL = {
    "OSError": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "quota": OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
}


@pytest.mark.parametrize("kind", DISK_FULL)
def test_disk_full_during_fit_overwrite_keeps_the_old_model(data, tmp_path, fitted, monkeypatch, capsys, kind):
    out = tmp_path / "m.anomap"
    out.write_bytes(b"the old model")

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a mod")  # the temporary file is partly written, then the disk is full
        raise DISK_FULL[kind]

    monkeypatch.setattr("anomap.detectors.model_file.save_file", full)
    code, err = run(capsys, "fit", "--data", data, "--category", "toy", "--out", out, "--overwrite", *FIT)
    assert_one_line_error(code, err, str(out))
    assert "no space left on device" in err.lower() if kind != "quota" else "quota" in err.lower()
    assert out.read_bytes() == b"the old model"
    assert leftovers(tmp_path) == []


def test_disk_full_in_any_atomic_write_is_one_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(Path, "write_bytes", full)
    for write in (write_text, write_bytes):
        with pytest.raises(AnomapError, match="no space left on device") as caught:
            write(target, "new" if write is write_text else b"new")
        assert "\n" not in str(caught.value) and str(target) in str(caught.value)
    monkeypatch.undo()
    assert target.read_text() == "old" and leftovers(tmp_path) == []


# ---- outputs never inside inputs ----------------------------------------------------------------


def commands(data: Path, model: Path) -> dict[str, list]:
    cat = data / "toy"
    return {
        "fit into the category": ["fit", "--data", data, "--category", "toy", "--out", cat / "m.anomap", *FIT],
        "fit into the data root": ["fit", "--data", data, "--category", "toy", "--out", data / "m.anomap", *FIT],
        "fit over its weights": [
            "fit",
            "--data",
            data,
            "--category",
            "toy",
            "--out",
            model,
            "--weights",
            model,
            "--backbone",
            "efficientnet_lite0",
            "--device",
            "cpu",
        ],
        "predict into its input": ["predict", model, cat / "test", "--out", cat / "test" / "scored"],
        "predict onto its input": ["predict", model, cat / "test" / "good", "--out", cat / "test" / "good"],
        "evaluate into the data": ["evaluate", model, "--data", data, "--category", "toy", "--out", cat / "eval"],
        "evaluate onto the data": ["evaluate", model, "--data", data, "--category", "toy", "--out", data],
        "demo into the data": ["demo", "--data", data, "--category", "toy", "--out", data / "demo", "--device", "cpu"],
        "benchmark into the data": ["benchmark", "--data", data, "--categories", "toy", "--out", cat / "bench"],
        "calibrate a model inside the data": ["calibrate", cat / "m.anomap", "--data", data, "--category", "toy"],
        "shift onto the data": ["shift", "--data", data, "--category", "toy", "--out", data],
        "shift into the data": ["shift", "--data", data, "--category", "toy", "--out", data / "shifted"],
        "shift onto the category": ["shift", "--data", data / "toy" / "..", "--category", "toy", "--out", data],
        "export over its model": ["export", model, "--out", model],
    }


@pytest.mark.parametrize("name", list(commands(Path("d"), Path("m"))))
@pytest.mark.parametrize("overwrite", [False, True])
def test_no_command_writes_into_its_input(tmp_path, data, capsys, name, overwrite):
    (tmp_path / "model").mkdir()
    model = patchcore_file(tmp_path / "model")
    if name.startswith("calibrate"):
        (data / "toy" / "m.anomap").write_bytes(model.read_bytes())
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    argv = commands(data, model)[name] + (["--overwrite"] if overwrite and not name.startswith("calibrate") else [])
    code, err = run(capsys, *argv)
    assert_one_line_error(code, err, "inside" if "onto" not in name and "over" not in name else "is the input")
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before


def test_outputs_beside_the_input_are_fine(tmp_path, data, fitted, capsys):
    code, err = run(capsys, "fit", "--data", data, "--category", "toy", "--out", tmp_path / "data.anomap", *FIT)
    assert code == 0, err
    code, err = run(capsys, "shift", "--data", data, "--category", "toy", "--out", tmp_path / "data-shifted")
    assert code == 0, err


@pytest.mark.parametrize("durable", [True, False])
def test_only_durable_writes_sync_and_both_are_atomic(tmp_path, monkeypatch, durable):
    """Pictures are written with durable=False: renamed into place like every file, without the
    fsyncs of file and folder (which cost more than drawing one)."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    target = tmp_path / "picture.png"
    target.write_bytes(b"old")
    write_bytes(target, b"new", durable=durable)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["picture.png"]
    assert (len(synced) >= 2) if durable else not synced
