"""Damaged, foreign and hostile model files fail with ModelFileError and never run code; a write
killed midway leaves the old file intact."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from anomap import load
from anomap.cli import main
from anomap.detectors.model_file import FORMAT_VERSION, read_model_file, write_model_file
from anomap.errors import ModelFileError

from conftest import patchcore_file


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return patchcore_file(tmp_path_factory.mktemp("model"))


def header_size(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def parts(path: Path) -> tuple[dict, dict]:
    meta, tensors = read_model_file(path)
    return {k: v for k, v in meta.items() if k != "sha256"}, tensors


@pytest.mark.parametrize("keep", [0, 4, 8, 100, "header", "data", -1])
def test_truncated(tmp_path, model, keep):
    data = model.read_bytes()
    n = {"header": header_size(data) - 10, "data": (header_size(data) + len(data)) // 2, -1: len(data) - 1}.get(
        keep, keep
    )
    (tmp_path / "t.anomap").write_bytes(data[:n])
    with pytest.raises(ModelFileError, match="t.anomap"):
        load(tmp_path / "t.anomap")


def test_a_loaded_model_does_not_depend_on_its_file(tmp_path, model):
    """Cutting the file short after `load` (an in-place rewrite by another program) leaves the
    loaded model working: its tensors are copies, not views of the file's memory mapping, which
    would end the process with a bus error. Run in a child process so that such a crash is seen."""
    copy = tmp_path / "copy.anomap"
    copy.write_bytes(model.read_bytes())
    code = textwrap.dedent(f"""
        import os, numpy
        from anomap import load
        det = load({str(copy)!r})
        os.truncate({str(copy)!r}, 100)
        print(det.predict([numpy.zeros((40, 40, 3), "uint8")]).scores[0])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(load(model).predict([np.zeros((40, 40, 3), "uint8")]).scores[0]))


def test_a_saved_model_gets_the_permissions_of_any_new_file(tmp_path, model):
    umask = os.umask(0o027)
    try:
        saved = load(model).save(tmp_path / "shared.anomap")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o640  # 0o666 less the umask, not safetensors' 0o600


def test_every_header_byte_flipped_is_detected(tmp_path, model):
    data = bytearray(model.read_bytes())
    path = tmp_path / "f.anomap"
    for i in range(header_size(data)):
        flipped = data.copy()
        flipped[i] ^= 1 << (i % 8)
        path.write_bytes(flipped)
        with pytest.raises(ModelFileError):
            read_model_file(path)


def test_flipped_tensor_bytes_are_detected(tmp_path, model):
    data = bytearray(model.read_bytes())
    start = header_size(data)
    for i in range(start, len(data), 97):
        flipped = data.copy()
        flipped[i] ^= 0x10
        (tmp_path / "f.anomap").write_bytes(flipped)
        with pytest.raises(ModelFileError, match="checksum"):
            read_model_file(tmp_path / "f.anomap")


@pytest.mark.parametrize("version", [FORMAT_VERSION - 1, FORMAT_VERSION + 1])
def test_other_format_version(tmp_path, model, version):
    meta, tensors = parts(model)
    write_model_file(tmp_path / "v.anomap", tensors, meta | {"format_version": str(version)})
    with pytest.raises(ModelFileError, match=f"version '{version}'.*refit"):
        load(tmp_path / "v.anomap")


class _Marker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_never_runs(capsys, tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "raw.anomap").write_bytes(pickle.dumps(_Marker(marker)))
    torch.save({"memory_bank": _Marker(marker)}, tmp_path / "torch.anomap")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "x.png")
    for name in ("raw.anomap", "torch.anomap"):
        with pytest.raises(ModelFileError, match=name):
            load(tmp_path / name)
        code = main(["predict", str(tmp_path / name), str(images), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and name in err and "Traceback" not in err
    assert not marker.exists()


def _rewritten(tmp_path: Path, model: Path, meta_change: dict, tensor_change: dict) -> Path:
    meta, tensors = parts(model)
    tensors = {k: v for k, v in (tensors | tensor_change).items() if v is not None}
    return write_model_file(tmp_path / "x.anomap", tensors, meta | meta_change)


@pytest.mark.parametrize(
    "meta_change, tensor_change, expected",
    [
        ({}, {"memory_bank": torch.zeros(50, 7)}, "do not match"),
        ({}, {"memory_bank": torch.zeros(50)}, "do not match"),
        ({}, {"normal_scores": None}, "normal_scores"),
        ({}, {"memory_bank": torch.full((50, 136), float("nan"))}, "NaN"),
        ({"method": "nonsense"}, {}, "unknown method"),
        ({"params": '{"no_such_param": 1}'}, {}, "unknown parameters"),
        ({"params": "[1, 2]"}, {}, "damaged metadata"),
        ({"params": "{not json"}, {}, "damaged metadata"),
        ({"state": '{"threshold": "high"}'}, {}, "threshold"),
        ({"state": '{"grid": [8, 8], "threshold": NaN}'}, {}, "threshold"),
        ({"state": '{"threshold": 1.0}'}, {}, "do not match"),
    ],
)
def test_inconsistent_contents(tmp_path, model, meta_change, tensor_change, expected):
    with pytest.raises(ModelFileError, match=expected):
        load(_rewritten(tmp_path, model, meta_change, tensor_change))


def test_foreign_safetensors(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not an anomap model file"):
        load(tmp_path / "w.safetensors")


def test_saving_twice_gives_identical_bytes(tmp_path, model):
    meta, tensors = parts(model)
    a = write_model_file(tmp_path / "a.anomap", tensors, meta)
    b = write_model_file(tmp_path / "b.anomap", tensors, dict(reversed(meta.items())))
    assert a.read_bytes() == b.read_bytes() == model.read_bytes()


# ---- a write killed midway ------------------------------------------------------------------------


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_atomic_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import sys, time
        from anomap._io import atomic_path
        with atomic_path({str(target)!r}) as tmp, open(tmp, "wb") as fh:
            for i in range(10_000):
                fh.write(b"x" * 65536)
                fh.flush()
                if i == 10:
                    print("writing", flush=True)
                time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["out.bin"]


def test_killed_model_save_keeps_a_loadable_file(tmp_path, model):
    target = tmp_path / "m.anomap"
    target.write_bytes(model.read_bytes())
    script = textwrap.dedent(f"""
        import torch
        from anomap import load
        det = load({str(model)!r})
        det.memory_bank_ = torch.randn(300_000, det.memory_bank_.shape[1])  # about 180 MB
        det.save({str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    _kill_when(proc, lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()))
    _, tensors = read_model_file(target)  # the old file, or the complete new one
    assert target.read_bytes() == model.read_bytes() or tensors["memory_bank"].shape[0] == 300_000
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["m.anomap"]
    for leftover in tmp_path.glob(".*.tmp"):  # what the killed process could not clean up
        leftover.unlink()
