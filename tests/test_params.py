"""Parameters are declared once and checked at construction, on the command line and at load: a
bad value is one clear error naming what is allowed, before anything is allocated."""

from __future__ import annotations

import json
import math
import resource

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomap import ConvAE, PatchCore, create, load, methods
from anomap.cli import main
from anomap.detectors.model_file import REGISTRY, read_model_file, write_model_file
from anomap.errors import AnomapError, ModelFileError, ParamError
from anomap.params import MAX_IMAGE_SIZE, declared

from conftest import patchcore_file

BAD = [
    ("patchcore", "image_size", 0),
    ("patchcore", "image_size", -5),
    ("patchcore", "image_size", 100000),
    ("patchcore", "image_size", 8),
    ("patchcore", "image_size", 12.5),
    ("patchcore", "crop", 0),
    ("patchcore", "seed", 99999999999999999999999),
    ("patchcore", "seed", "abc"),
    ("patchcore", "seed", -5),
    ("patchcore", "batch_size", 0),
    ("patchcore", "threshold_images", 0),
    ("patchcore", "k", -1),
    ("patchcore", "target_dim", 0),
    ("patchcore", "project_dim", -1),
    ("patchcore", "blur_sigma", math.nan),
    ("patchcore", "blur_sigma", math.inf),
    ("patchcore", "coreset_ratio", 0),
    ("patchcore", "reweight", 1),
    ("patchcore", "layers", "layer2"),
    ("patchcore", "layers", ["layer2", "layer2"]),
    ("patchcore", "device", "tpu"),
    ("patchcore", "backbone", "vgg"),
    ("patchcore", "weights", ""),
    ("padim", "eps", 0),
    ("psfe", "stats", []),
    ("conv_ae", "width", 4000),
    ("global_ae", "hidden", 10**6),
    ("dfr", "variance", 1.5),
    ("global_ae", "lr", 0),
]


@pytest.mark.parametrize("method, name, value", BAD)
def test_constructor_refuses_with_what_is_allowed(method, name, value):
    with pytest.raises(ParamError, match=rf"^{name} must be .+, got "):
        create(method, **{name: value})


def test_cross_field_checks():
    with pytest.raises(ParamError, match="crop must be at most image_size"):
        PatchCore(image_size=64, crop=128)
    with pytest.raises(ParamError, match="multiple of 16"):
        ConvAE(image_size=120)
    with pytest.raises(ParamError, match="n_features must be between 1 and"):
        create("padim", backbone="efficientnet_lite0", n_features=4000)


def test_every_parameter_is_declared_with_help():
    for method in methods():
        fields = declared(REGISTRY[method])
        assert fields, method
        for name, f in fields.items():
            assert f.metadata["help"].strip(), (method, name)
            det = create(method)
            assert getattr(det, name) == f.metadata["check"](f.default)  # defaults pass their own check


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--image-size", "0"], "image_size must be an integer from 32 to"),
        (["--image-size", "100000"], "image_size must be an integer from 32 to"),
        (["--crop", "0"], "crop must be null or an integer"),
        (["--seed", "99999999999999999999999"], "seed must be an integer from 0 to"),
        (["--param", "batch_size=0"], "batch_size must be"),
        (["--param", "k=-1"], "k must be"),
        (["--param", "image_size=12.5"], "image_size must be an integer"),
        (["--param", 'seed="abc"'], "seed must be an integer"),
        (["--param", "blur_sigma=NaN"], "blur_sigma must be a finite number"),
        (["--param", "no_such=1"], "no_such"),
    ],
)
def test_cli_gives_one_line(tmp_path, capsys, toy_root, args, expected):
    out = tmp_path / "m.anomap"
    code = main(["fit", "--data", str(toy_root), "--category", "toy", "--out", str(out), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not out.exists()
    assert err.startswith("anomap: error:") and "\n" not in err, err
    assert expected in err


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return patchcore_file(tmp_path_factory.mktemp("params"))


def _edited(tmp_path, path, params=None, state=None, raw_params=None):
    """The model re-signed with some parameters or state entries replaced (anyone can do this)."""
    meta, tensors = read_model_file(path)
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    if params is not None:
        meta["params"] = json.dumps({**json.loads(meta["params"]), **params})
    if raw_params is not None:
        meta["params"] = raw_params
    if state is not None:
        meta["state"] = json.dumps({**json.loads(meta["state"]), **state})
    return write_model_file(tmp_path / "edited.anomap", tensors, meta)


def test_huge_network_refused_at_load_before_building(tmp_path):
    meta = {
        "format": "anomap",
        "format_version": "4",
        "anomap_version": "0",
        "method": "conv_ae",
        "params": json.dumps({"width": 4000}),
        "state": json.dumps({"threshold": 1.0, "train_losses": [1.0]}),
    }
    path = write_model_file(tmp_path / "tiny.anomap", {"normal_scores": torch.ones(3)}, meta)
    assert path.stat().st_size < 1024
    with pytest.raises(ModelFileError, match="width must be an integer from 1 to 512"):
        load(path)


def test_huge_image_size_refused_at_load(tmp_path, small_model):
    with pytest.raises(ModelFileError, match=f"image_size must be an integer from 32 to {MAX_IMAGE_SIZE}"):
        load(_edited(tmp_path, small_model, params={"image_size": 30000}))


@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000, '{"seed": ' + "9" * 5000 + "}"])
def test_hostile_metadata_json(tmp_path, small_model, raw):
    with pytest.raises(ModelFileError, match="damaged metadata"):
        load(_edited(tmp_path, small_model, raw_params=raw))


@pytest.mark.parametrize(
    "state, expected",
    [
        ({"grid": [8]}, "grid"),
        ({"grid": [8, 10**9]}, "grid"),
        ({"grid": "8x8"}, "grid"),
        ({"threshold": True}, "threshold"),
    ],
)
def test_edited_state(tmp_path, small_model, state, expected):
    with pytest.raises(ModelFileError, match=expected):
        load(_edited(tmp_path, small_model, state=state))


def test_nan_never_saved(tmp_path):
    det = PatchCore(backbone="efficientnet_lite0", weights="random", image_size=64, device="cpu")
    det.memory_bank_ = torch.full((4, det._embedding_dim()), math.nan)
    det.normal_scores_, det.grid_, det.fitted_ = torch.rand(4).numpy(), (8, 8), True
    det.set_threshold(1.0)
    with pytest.raises(AnomapError, match="NaN"):
        det.save(tmp_path / "nan.anomap")
    assert not (tmp_path / "nan.anomap").exists()


VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=8)), max_size=4),
    st.sampled_from(["layer1", "layer2", "cpu", "cuda", "coreset", "random", "fp16", "/no/such/weights.pth"]),
)


@settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits=st.dictionaries(st.sampled_from(sorted(declared(PatchCore))), VALUES, min_size=1, max_size=3))
def test_fuzzed_parameters_give_a_model_or_one_clear_error(tmp_path, small_model, edits):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        det = load(_edited(tmp_path, small_model, params=edits), device="cpu")
    except ModelFileError as err:
        assert "\n" not in str(err)
    else:
        assert det.get_params()["image_size"] <= MAX_IMAGE_SIZE
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 500, f"loading grew the peak memory by {grown_mb:.0f} MB"


def test_signed_models(tmp_path, small_model):
    det = load(small_model)
    signed = det.save(tmp_path / "signed.anomap", key=b"secret")
    assert load(signed, key=b"secret").get_params() == det.get_params()
    assert load(signed).threshold_ == det.threshold_  # without a key it loads as any model
    for path, key in ((signed, b"other"), (small_model, b"secret")):
        with pytest.raises(ModelFileError, match="not signed with this key"):
            load(path, key=key)
    meta, tensors = read_model_file(signed)  # edited and re-checksummed by someone without the key
    meta["params"] = json.dumps({**json.loads(meta["params"]), "k": 3})
    edited = write_model_file(tmp_path / "edited.anomap", tensors, {k: v for k, v in meta.items() if k != "sha256"})
    assert load(edited).k == 3
    with pytest.raises(ModelFileError, match="not signed with this key"):
        load(edited, key=b"secret")
