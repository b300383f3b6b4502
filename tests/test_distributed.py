"""anomap.distributed on a real local Ray runtime (2 CPUs on 127.0.0.1, one for the whole module): scoring a
folder, restart after a killed run, scores identical to the single-process ones, and a fit whose
bank equals the single-process fit's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from anomap import PatchCore, distributed, load
from anomap.data import MVTecAD, list_images
from anomap.errors import AnomapError, DataError, ModelFileError

from conftest import make_category, texture

# 64 patches an image at 64 px: blocks of 3 images (4 blocks for the 10 training images), and
# batches of 2 that straddle the block boundaries
PARAMS = {"backbone": "efficientnet_lite0", "image_size": 64, "device": "cpu", "coreset_chunk": 192, "batch_size": 2}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runtime():
    """One local Ray runtime for the module, on 127.0.0.1 only, without the dashboard; its address."""
    with pytest.MonkeyPatch.context() as env:
        # read when Ray is imported, here and in the processes it starts: one local node on the
        # loopback interface (else Ray registers the machine's external address and listens on
        # every interface); no usage reports
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        ray.init(
            num_cpus=2,
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            object_store_memory=300 * 2**20,
            logging_level="WARNING",
        )
        try:
            assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
            address = ray.get_runtime_context().gcs_address
            assert address.startswith("127.0.0.1:")
            yield address
        finally:
            ray.shutdown()


@pytest.fixture
def one_thread():
    """Run this process's share of the work (the driver) on one thread, as the workers do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("dist"), n_train=10, n_good=3, n_bad=3, seed=5) / "toy"


@pytest.fixture(scope="module")
def model(tmp_path_factory, data) -> Path:
    """A model fitted in one plain process with one thread (torch and numba alike)."""
    path = tmp_path_factory.mktemp("model") / "single.anomap"
    code = (
        "import sys; from anomap import PatchCore; from anomap.data import MVTecAD; "
        f"PatchCore(**{PARAMS!r}).fit(MVTecAD(sys.argv[1], 'toy').train).save(sys.argv[2])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(data.parent), str(path)],
        check=True,
        env=os.environ | ONE_THREAD,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A folder of 24 images in two subfolders."""
    root, rng = tmp_path_factory.mktemp("many"), np.random.default_rng(3)
    for i in range(24):
        (root / f"line{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(texture(rng)).save(root / f"line{i % 2}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def reference(model, many) -> np.ndarray:
    """Single-process scores of `many`, in listing order, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load(model).predict(list_images([many])).scores
    torch.set_num_threads(before)


def read_scores(out: Path):
    table = pq.read_table(out / "scores.parquet")
    return table["path"].to_pylist(), table["score"].to_numpy(), table["decision"].to_pylist()


def test_fit_bank_equals_single_process_fit(runtime, data, model, one_thread, tmp_path):
    single = load(model)
    assert single.block_images(64, 10) == 3  # several coreset blocks, so the join is exercised
    det = distributed.fit(MVTecAD(data.parent, "toy").train, workers=2, **PARAMS)
    assert torch.equal(det.memory_bank_, single.memory_bank_)
    np.testing.assert_array_equal(det.normal_scores_, single.normal_scores_)
    assert det.threshold_ == single.threshold_
    assert det.save(tmp_path / "ray.anomap").read_bytes() == model.read_bytes()


def test_scores_folder_identically_to_single_process(runtime, model, many, reference, tmp_path):
    summary = distributed.predict(model, [many], tmp_path / "out")
    paths = list_images([many])
    got, scores, decisions = read_scores(tmp_path / "out")
    assert got == [str(p) for p in paths]
    np.testing.assert_array_equal(scores, reference)
    threshold = load(model).threshold_
    assert decisions == ["anomalous" if s >= threshold else "normal" for s in scores]
    assert (summary.scored, summary.skipped, summary.resumed) == (24, 0, 0)
    assert summary.anomalous == decisions.count("anomalous")


def test_restart_after_kill_gives_one_result_per_image(runtime, model, many, reference, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; from anomap import distributed; "
        "distributed.predict(sys.argv[1], [sys.argv[2]], sys.argv[3], batch_size=1, part_size=1, "
        "address=sys.argv[4])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(model), str(many), str(out), runtime],
        env=os.environ | ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(list((out / "parts").glob("part-*.parquet"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "no results written in 90 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "scores.parquet").exists(), "the run ended before it could be stopped"
    written = {int(i) for p in (out / "parts").glob("part-*.parquet") for i in pq.read_table(p)["index"].to_pylist()}
    assert 3 <= len(written) < 24

    summary = distributed.predict(model, [many], out, batch_size=1, part_size=1)
    assert summary.resumed >= len(written) and summary.scored == 24
    paths, scores, _ = read_scores(out)
    assert paths == [str(p) for p in list_images([many])]  # each image exactly once, in input order
    np.testing.assert_array_equal(scores, reference)
    again = distributed.predict(model, [many], out, batch_size=1, part_size=1)  # nothing left to do
    assert again.resumed == 24 and read_scores(out)[1].tolist() == scores.tolist()


def test_inputs_pictures_and_unusable_images(runtime, model, many, tmp_path):
    files = list_images([many])
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(os.path.relpath(p, tmp_path) for p in files[:3]) + "\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    inputs = [listing, str(many / "line1" / "00[57].png"), bad]

    with pytest.raises(DataError, match="broken.png"):
        distributed.predict(model, inputs, tmp_path / "stops")
    summary = distributed.predict(model, inputs, tmp_path / "out", pictures="both", skip_bad=True)
    assert (summary.scored, summary.skipped) == (5, 1)
    assert "broken.png" in (tmp_path / "out" / "skipped.csv").read_text()
    listed = distributed.list_inputs(inputs)
    assert [p.name for p in listed[3:]] == ["005.png", "007.png", "broken.png"]
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == sorted(
        f"{i:04d}_{p.stem}_{kind}.png" for i, p in enumerate(listed[:5]) for kind in ("heatmap", "mask")
    )
    assert np.asarray(Image.open(tmp_path / "out" / names[0])).shape == (128, 128, 3)  # at the image's size
    assert set(np.unique(np.asarray(Image.open(tmp_path / "out" / names[1])))) <= {0, 255}


def test_other_run_in_folder_is_refused(runtime, model, many, tmp_path):
    out = tmp_path / "out"
    distributed.predict(model, [many / "line0"], out)
    with pytest.raises(AnomapError, match="listing_sha256"):
        distributed.predict(model, [many / "line1"], out)
    with pytest.raises(AnomapError, match="batch_size"):
        distributed.predict(model, [many / "line0"], out, batch_size=3)
    summary = distributed.predict(model, [many / "line1"], out, overwrite=True)
    assert summary.resumed == 0 and len(read_scores(out)[0]) == 12
    with pytest.raises(AnomapError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("x")
        distributed.predict(model, [many / "line0"], tmp_path / "other")


def test_cli_engine_ray(runtime, data, model, many, tmp_path, capsys):
    from anomap.cli import main

    out = tmp_path / "pred"
    assert (
        main(["predict", str(model), str(many / "line0"), "--out", str(out), "--engine", "ray", "--workers", "2"]) == 2
    )
    assert "has 2 CPUs; the scoring workers take 2" in capsys.readouterr().err
    assert main(["predict", str(model), str(many / "line0"), "--out", str(out), "--engine", "ray"]) == 0
    assert "scored 12 images" in capsys.readouterr().out
    assert len(read_scores(out)[0]) == 12
    assert main(["predict", str(model), str(many), "--out", str(tmp_path / "x"), "--workers", "2"]) == 2
    assert "only apply with --engine ray" in capsys.readouterr().err
    fitted = tmp_path / "m.anomap"
    assert (
        main(
            [
                "fit",
                "--data",
                str(data.parent),
                "--category",
                "toy",
                "--out",
                str(fitted),
                "--engine",
                "ray",
                "--backbone",
                "efficientnet_lite0",
                "--image-size",
                "64",
                "--device",
                "cpu",
                "--param",
                "coreset_chunk=192",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    assert load(fitted).memory_bank_.shape == load(model).memory_bank_.shape


def test_exported_onnx_model(runtime, model, many, tmp_path):
    from anomap import runtime as exported
    from anomap.export import export_file

    onnx = export_file(model, tmp_path / "m.onnx", batch_size=4)
    summary = distributed.predict(onnx, [many / "line0"], tmp_path / "out")
    paths, scores, _ = read_scores(tmp_path / "out")
    assert summary.scored == len(paths) == 12
    np.testing.assert_array_equal(scores, exported.load(onnx).predict(list_images([many / "line0"])).scores)
    with pytest.raises(AnomapError, match="exported models are scored on CPUs"):
        distributed.predict(onnx, [many / "line0"], tmp_path / "gpu", gpus_per_worker=1)
    with pytest.raises(AnomapError, match="exported files carry no signature"):
        distributed.predict(onnx, [many / "line0"], tmp_path / "keyed", key=b"0123456789abcdef")


def test_a_key_is_checked_before_any_worker_starts(runtime, model, many, tmp_path):
    signed = load(model).save(tmp_path / "signed.anomap", key=b"0123456789abcdef")
    with pytest.raises(ModelFileError, match="not signed with this key"):
        distributed.predict(model, [many / "line0"], tmp_path / "unsigned", key=b"0123456789abcdef")
    assert not (tmp_path / "unsigned").exists()
    summary = distributed.predict(signed, [many / "line0"], tmp_path / "out", key=b"0123456789abcdef")
    assert summary.scored == 12


def test_decoding_on_the_workers_scores_like_the_readers(runtime, model, tmp_path):
    from anomap.runs import demo_root

    folder = demo_root() / "hazelnut_toy" / "test" / "good"
    distributed.predict(model, [folder], tmp_path / "cpu")
    distributed.predict(model, [folder], tmp_path / "gpu", decode="gpu")  # on the workers' CPU here
    (paths, host, _), (same, device, _) = read_scores(tmp_path / "cpu"), read_scores(tmp_path / "gpu")
    assert paths == same and len(paths) > 3
    assert np.abs(device - host).max() < 0.02 * np.abs(host).max()


def test_jpeg_decoding_on_the_device_is_close_to_the_host_path():
    from anomap.distributed.jpeg import decode_jpegs
    from anomap.runs import demo_root

    det = PatchCore(**PARAMS)
    det._setup()
    paths = list_images([demo_root() / "hazelnut_toy" / "test" / "good"])[:3]
    data = [np.fromfile(p, np.uint8) for p in paths]
    got = decode_jpegs(
        np.concatenate(data), np.array([len(d) for d in data]), np.ones(3, int), det.preprocess_, torch.device("cpu")
    )
    want = torch.stack([det.preprocess_.image(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    assert got.shape == want.shape == (3, 3, 64, 64)
    # other JPEG decoder and resize arithmetic: a few 8-bit levels at most, normalised by std ~0.22
    assert (got - want).abs().max() < 6 / (255 * 0.224)
    assert (got - want).abs().mean() < 1 / (255 * 0.224)
