"""Every method's exported graph against the torch model it comes from, on real images (the
bundled hazelnut_toy set and a slice of ../shared/data/glass_fabric), through onnxruntime and
OpenVINO, in fp32 and fp16. The export's other behaviour (metadata, OpenVINO IR, external data,
errors, the CLI) and the torch-free runtime are tested in test_runtime.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

import onnx_ir as ir  # noqa: E402

from anomap import create, methods, runtime  # noqa: E402
from anomap import export as export_module  # noqa: E402
from anomap.data import MVTecAD, load_image  # noqa: E402
from anomap.detectors import REGISTRY  # noqa: E402
from anomap.export import export  # noqa: E402
from anomap.params import declared  # noqa: E402
from anomap.prediction import Prediction  # noqa: E402

from conftest import assert_close_scaled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "anomap" / "demo_data"
SHARED = ROOT.parent / "shared" / "data"  # CI keeps a copy of shared/ beside the clone
ENGINES = ("onnxruntime", "openvino")
# scores within 1e-4 of the largest score's magnitude (ensemble z-scores cross zero, so a plain
# per-score relative tolerance would ask for more than float32 gives near zero); maps within
# 1e-3 of their range; fp16 ranks the scores like fp32
SCORE_RTOL, MAP_TOL, SPEARMAN = 1e-4, 1e-3, 0.999


def method_params(method: str, image_size: int = 128) -> dict:
    """Small, quick settings: efficientnet_lite0, a few training epochs."""
    names = declared(REGISTRY[method])
    params = {"image_size": image_size, "device": "cpu"}
    if "backbone" in names:
        params["backbone"] = "efficientnet_lite0"
    if "epochs" in names:
        params["epochs"] = 3
    if method == "ensemble":  # two backbones, PatchCore with reflected edges, unequal weights
        params["members"] = [
            {"method": "patchcore", "border": "reflect", "map_weight": 2},
            {"method": "padim", "backbone": "mobilenet_v2", "score_weight": 0.5},
        ]
    return params


def assert_parity(pred, ref) -> None:
    """fp32 parity: scores within 1e-4, maps within 1e-3 of their range, the same decisions."""
    assert pred.scores.shape == ref.scores.shape and pred.maps.shape == ref.maps.shape
    assert_close_scaled(pred.scores, ref.scores, rel=SCORE_RTOL)
    span = float(ref.maps.max() - ref.maps.min())
    assert np.abs(pred.maps - ref.maps).max() <= MAP_TOL * span
    np.testing.assert_array_equal(pred.labels, ref.labels)


def assert_half_parity(half, full) -> None:
    """fp16 parity: Spearman rank correlation of the scores with fp32 >= 0.999, the same decisions."""
    assert spearmanr(half.scores, full.scores).statistic >= SPEARMAN
    np.testing.assert_array_equal(half.labels, full.labels)


def half_copy(onnx_file: Path) -> Path:
    """The fp16 form of an fp32 export, made from the same trace by the code precision="fp16" runs."""
    model = ir.load(onnx_file)
    export_module._store_half(model)
    model.metadata_props["precision"] = "fp16"
    out = onnx_file.with_name(onnx_file.stem + "-fp16.onnx")
    ir.save(model, out)
    return out


@pytest.fixture(scope="module")
def image_sets() -> dict[str, tuple[list, list]]:
    """Set name -> (training samples, decoded test images): all of hazelnut_toy (28 and 23 images);
    of glass_fabric, when ../shared/data is there, the first 10 training images and the 38 test
    images. Fewer test images would not do: on 20, one swap of two near-equal scores (fp16 moves
    scores by a few 1e-4) already brings the rank correlation to 0.9985."""
    hazelnut = MVTecAD(DEMO, "hazelnut_toy")
    sets = {"hazelnut_toy": (hazelnut.train, hazelnut.test)}
    if (SHARED / "glass_fabric").is_dir():
        glass = MVTecAD(SHARED, "glass_fabric")
        sets["glass_fabric"] = (glass.train[:10], glass.test)
    return {name: (train, [load_image(s.path) for s in test]) for name, (train, test) in sets.items()}


@pytest.fixture(scope="module", params=methods())
def exported(request, image_sets, tmp_path_factory) -> dict:
    """One model of the method fitted on the training images of every set (one export serves
    both sets) at 96 px (the export's cost is mostly tracing; the rest shrinks with the images),
    its threshold moved among the test scores (`splitting_threshold`), exported in fp32 and fp16;
    and the torch model's predictions of each test set."""
    method = request.param
    train = [s for samples, _ in image_sets.values() for s in samples]
    det = create(method, **method_params(method, image_size=96)).fit(train)
    refs = {name: det.predict(test) for name, (_, test) in image_sets.items()}
    det.set_threshold(splitting_threshold(np.concatenate([r.scores for r in refs.values()])))
    refs = {name: Prediction(r.scores, r.maps, det.threshold_) for name, r in refs.items()}
    fp32 = export(det, tmp_path_factory.mktemp(method) / f"{method}.onnx")
    return {"fp32": fp32, "fp16": half_copy(fp32), "refs": refs, "loaded": {}}


def splitting_threshold(scores: np.ndarray) -> float:
    """The middle of the widest gap among the middle third of the sorted scores: decisions go
    both ways and no score lies near the threshold. (With their fit-time thresholds, some of these
    quickly trained models call every image of a set normal, or every one anomalous.)"""
    s = np.sort(scores)
    lo = len(s) // 3
    i = lo + int(np.argmax(np.diff(s[lo : len(s) - lo])))
    return float(s[i] + s[i + 1]) / 2


def loaded(exported: dict, precision: str, engine: str) -> runtime.ExportedModel:
    """The exported file of `precision` opened in `engine`, once per method."""
    key = (precision, engine)
    if key not in exported["loaded"]:
        exported["loaded"][key] = runtime.load(exported[precision], engine=engine)
    return exported["loaded"][key]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["hazelnut_toy", "glass_fabric"])
def test_every_method_matches_its_torch_model(exported, image_sets, engine, name):
    if name not in image_sets:
        pytest.skip(f"{SHARED / name} is not there (a copy of shared/ beside the clone)")
    test = image_sets[name][1]
    full = loaded(exported, "fp32", engine).predict(test)
    assert_parity(full, exported["refs"][name])
    assert_half_parity(loaded(exported, "fp16", engine).predict(test), full)
