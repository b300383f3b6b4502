"""Exported files in use: their metadata, OpenVINO IR and fp16, graph options (crop, batches,
external data, exact search), errors and atomic writes, the CLI on `.onnx` models, the
torch-free runtime (with torch blocked, and installed alone in a fresh virtual environment)
and the README's plain onnxruntime example."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

import onnx_ir as ir  # noqa: E402

from anomap import create, runtime  # noqa: E402
from anomap import export as export_module  # noqa: E402
from anomap.cli import main  # noqa: E402
from anomap.data import MVTecAD, load_image  # noqa: E402
from anomap.errors import DataError, ExportError, ModelFileError, ParamError  # noqa: E402
from anomap.export import export, export_file  # noqa: E402
from test_export import DEMO, ROOT, assert_half_parity, assert_parity, method_params  # noqa: E402

# a meta-path finder that makes `import torch` fail, put in front of a subprocess's own code
BLOCK_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked here")

sys.meta_path.insert(0, _NoTorch())
"""
# scores the images named on the command line with anomap.runtime; prints them as JSON
SCORE_SCRIPT = """
import json, sys
from anomap import runtime
model = runtime.load(sys.argv[1], threads=1)
pred = model.predict(sys.argv[2:])
try:
    import torch
    torch_found = True
except ImportError:
    torch_found = False
print(json.dumps({"scores": pred.scores.tolist(), "labels": pred.labels.tolist(), "torch": torch_found,
                  "torch_loaded": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def hazelnut() -> MVTecAD:
    return MVTecAD(DEMO, "hazelnut_toy")


@pytest.fixture(scope="module")
def patchcore(hazelnut, tmp_path_factory) -> dict:
    """A PatchCore model file fitted on hazelnut_toy and its ONNX export, made by `anomap export`."""
    folder = tmp_path_factory.mktemp("patchcore")
    det = create("patchcore", **method_params("patchcore")).fit(hazelnut.train)
    model, onnx_file = det.save(folder / "m.anomap"), folder / "m.onnx"
    assert main(["export", str(model), "--out", str(onnx_file)]) == 0
    return {"det": det, "model": model, "onnx": onnx_file, "ref": det.predict(hazelnut.test)}


def test_metadata_says_what_a_caller_needs(patchcore):
    det, info = patchcore["det"], runtime.load(patchcore["onnx"]).info
    assert (info.method, info.input_size, info.crop, info.precision, info.batch_size) == (
        "patchcore",
        128,
        None,
        "fp32",
        1,
    )
    assert info.threshold == det.threshold_
    assert info.source_sha256 == hashlib.sha256(patchcore["model"].read_bytes()).hexdigest()
    raw = ir.load(patchcore["onnx"]).metadata_props
    assert set(raw) == set(runtime.METADATA)
    assert (raw["colour_mode"], raw["resize"], raw["anomap_format"]) == ("RGB", "square", runtime.EXPORT_FORMAT)
    assert json.loads(raw["params"]) == json.loads(json.dumps({**det.get_params(), "search": "exact"}))


def test_openvino_ir_in_fp16(patchcore, hazelnut, tmp_path):
    xml = export_file(patchcore["model"], tmp_path / "m.xml", format="openvino", precision="fp16")
    assert xml.with_suffix(".bin").stat().st_size < 0.6 * patchcore["onnx"].stat().st_size
    model = runtime.load(xml)
    assert model.info.precision == "fp16" and model.info.threshold == patchcore["det"].threshold_
    assert_half_parity(model.predict(hazelnut.test), patchcore["ref"])


def test_crop_batches_external_data_and_exact_search(hazelnut, tmp_path, monkeypatch):
    det = create("patchcore", **method_params("patchcore"), crop=112).fit(hazelnut.train[:10])
    test = hazelnut.test[:7]
    ref = det.predict(test)
    det.search = "ivf"  # approximate in torch; the graph searches exactly
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 1000)
    path = export(det, tmp_path / "c.onnx", batch_size=4)
    data = tmp_path / "c.onnx.data"
    assert data.is_file() and path.stat().st_size < 0.1 * data.stat().st_size
    for engine in ("onnxruntime", "openvino"):
        model = runtime.load(path, engine=engine)
        assert model.info.params["search"] == "exact" and model.info.crop == 112
        pred = model.predict(test)  # two batches of 4, the second padded
        assert pred.maps.shape == (7, 112, 112)
        assert_parity(pred, ref)
        # anomap's torch pipelines hand over cropped, normalized tensors: undone exactly
        batch = torch.stack([model.preprocess_.image(load_image(s.path)) for s in test])
        scores, maps = model.score_batch(batch)
        np.testing.assert_array_equal(scores.numpy(), pred.scores)
        np.testing.assert_array_equal(maps.numpy(), pred.maps)


def test_medians_translate_to_onnx():
    """PSFE's reference="none" takes medians, which torch's exporter cannot translate by itself."""
    import onnxruntime as ort

    class Medians(torch.nn.Module):
        def forward(self, x):
            return x.median(1).values, x.median(2, keepdim=True).values  # odd and even lengths

    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(0))
    table = {torch.ops.aten.median.dim: export_module._median_dim}
    program = torch.onnx.export(Medians().eval(), (x,), dynamo=True, verbose=False, custom_translation_table=table)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for got, expected in zip(session.run(None, {session.get_inputs()[0].name: x.numpy()}), Medians()(x)):
        np.testing.assert_array_equal(got, expected.numpy())


def test_damaged_foreign_or_missing_models_are_refused(patchcore, tmp_path):
    damaged = tmp_path / "damaged.anomap"
    data = bytearray(patchcore["model"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    foreign = tmp_path / "foreign.anomap"
    foreign.write_bytes(b"not a model at all")
    for model in (damaged, foreign, tmp_path / "missing.anomap"):
        with pytest.raises(ModelFileError):
            export_file(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_bad_options_are_refused(patchcore, tmp_path):
    for kwargs in ({"format": "tflite"}, {"precision": "int8"}, {"batch_size": 0}, {"format": "openvino"}):
        with pytest.raises(ParamError):
            export_file(patchcore["model"], tmp_path / "m.onnx", **kwargs)


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(patchcore, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")

    def fail(model, path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_trace", lambda det, batch: ir.load(patchcore["onnx"]))
    monkeypatch.setattr(export_module, "_save_onnx", fail)
    with pytest.raises(OSError):
        export_file(patchcore["model"], target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_the_runtime_refuses_foreign_damaged_or_other_version_files(patchcore, tmp_path):
    foreign = ir.load(patchcore["onnx"])
    foreign.metadata_props.clear()
    ir.save(foreign, tmp_path / "foreign.onnx")
    other = ir.load(patchcore["onnx"])
    other.metadata_props["format_version"] = "99"
    ir.save(other, tmp_path / "other.onnx")
    (tmp_path / "cut.onnx").write_bytes(patchcore["onnx"].read_bytes()[:5000])
    (tmp_path / "cut.xml").write_text("<net>")
    cases = {
        "foreign": "not an anomap export",
        "other": "version '99'",
        "cut": "not a readable ONNX",
        "missing": "no such",
    }
    for name, message in cases.items():
        with pytest.raises(ModelFileError, match=message):
            runtime.load(tmp_path / f"{name}.onnx")
    with pytest.raises(ModelFileError, match="not a readable OpenVINO"):
        runtime.load(tmp_path / "cut.xml")
    with pytest.raises(ExportError, match="engine"):
        runtime.load(patchcore["onnx"], engine="tensorrt")
    edited = ir.load(patchcore["onnx"])
    edited.metadata_props["threshold"] = "-1e9"  # every image anomalous by the metadata, not by the graph
    ir.save(edited, tmp_path / "edited.onnx")
    with pytest.raises(ModelFileError, match="another threshold"):
        runtime.load(tmp_path / "edited.onnx").predict([DEMO / "hazelnut_toy/test/good/04.jpg"])


def test_the_runtime_checks_its_inputs(patchcore, tmp_path):
    model = runtime.load(patchcore["onnx"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        model.predict([bad])
    with pytest.raises(ValueError, match="uint8"):
        model.score_pixels(np.zeros((1, 64, 64, 3), np.uint8))
    image = np.asarray(Image.open(DEMO / "hazelnut_toy" / "test" / "good" / "04.jpg").convert("RGB"))
    assert model.predict([image]).scores[0] == model.predict([DEMO / "hazelnut_toy/test/good/04.jpg"]).scores[0]


def test_cli_export_refuses_to_replace_and_reports_errors_in_one_line(patchcore, tmp_path, capsys):
    assert main(["export", str(patchcore["model"]), "--out", str(patchcore["onnx"])]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.anomap"
    bad.write_bytes(b"junk")
    assert main(["export", str(bad), "--format", "openvino", "--out", str(tmp_path / "m.xml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anomap: error:") and err.count("\n") == 1


def _scores_csv(folder: Path) -> list[list[str]]:
    with open(folder / "scores.csv", newline="") as fh:
        return list(csv.reader(fh))


def test_cli_predict_and_evaluate_accept_an_onnx_model(patchcore, tmp_path, capsys):
    images = str(DEMO / "hazelnut_toy" / "test")
    outs = {kind: tmp_path / kind for kind in ("model", "onnx")}
    for kind, out in outs.items():
        assert main(["predict", str(patchcore[kind]), images, "--out", str(out / "predict")]) == 0
        assert (
            main(
                [
                    "evaluate",
                    str(patchcore[kind]),
                    "--data",
                    str(DEMO),
                    "--category",
                    "hazelnut_toy",
                    "--out",
                    str(out / "evaluate"),
                ]
            )
            == 0
        )
    files = [sorted(p.relative_to(out) for p in out.rglob("*")) for out in outs.values()]
    assert files[0] == files[1]
    rows = [_scores_csv(out / "predict") for out in outs.values()]
    assert [(r[0], r[2]) for r in rows[0]] == [(r[0], r[2]) for r in rows[1]]  # paths and decisions
    np.testing.assert_allclose([float(r[1]) for r in rows[1][1:]], [float(r[1]) for r in rows[0][1:]], rtol=1e-4)
    metrics = [json.loads((out / "evaluate" / "metrics.json").read_text()) for out in outs.values()]
    assert metrics[0].keys() == metrics[1].keys()
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "confusion_matrix"):
        np.testing.assert_allclose(metrics[1][key], metrics[0][key], atol=1e-4)
    assert main(["predict", str(patchcore["onnx"]), images, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 2
    assert "CPU" in capsys.readouterr().err


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, **kwargs)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_runtime_needs_no_torch(patchcore):
    images = [str(p) for p in sorted((DEMO / "hazelnut_toy" / "test" / "colour").iterdir())[:4]]
    out = json.loads(
        _run([sys.executable, "-c", BLOCK_TORCH + SCORE_SCRIPT, str(patchcore["onnx"]), *images], cwd=ROOT).stdout
    )
    assert not out["torch"] and not out["torch_loaded"]
    expected = runtime.load(patchcore["onnx"], threads=1).predict(images)
    assert out["scores"] == expected.scores.tolist() and out["labels"] == expected.labels.tolist()


def readme_example() -> str:
    """The README's plain onnxruntime example: the python block that imports onnxruntime."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "import onnxruntime" in b]
    assert len(found) == 1, "README.md should hold one python example that imports onnxruntime"
    return found[0]


def test_the_readme_example_runs_without_anomap(patchcore, tmp_path):
    code = readme_example()
    assert "anomap" not in code and len(code.splitlines()) <= 20
    source = DEMO / "hazelnut_toy" / "test" / "colour" / "03.jpg"
    Image.open(source).save(tmp_path / "image.png")
    (tmp_path / "model.onnx").write_bytes(patchcore["onnx"].read_bytes())
    printed = _run([sys.executable, "-c", BLOCK_TORCH + code], cwd=tmp_path).stdout
    pred = runtime.load(patchcore["onnx"]).predict([source])
    decision = "anomalous" if pred.labels[0] else "normal"
    assert f"score {pred.scores[0]:.4f}" in printed and printed.strip().endswith(decision)


def test_an_inference_only_install_scores_images(patchcore, tmp_path):
    """A fresh virtual environment with anomap (no dependencies), numpy, Pillow and onnxruntime."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", str(ROOT)], timeout=300)
    _run([*pip, "numpy", "pillow", "onnxruntime"], timeout=300)
    images = [str(DEMO / "hazelnut_toy" / "test" / "good" / "04.jpg")]
    out = json.loads(_run([python, "-c", SCORE_SCRIPT, str(patchcore["onnx"]), *images], cwd=tmp_path).stdout)
    assert not out["torch"]
    assert out["scores"] == runtime.load(patchcore["onnx"], threads=1).predict(images).scores.tolist()
