"""The feature pipeline of the detectors built on a pretrained backbone: the parameters that
describe it (`FeatureParams`) and the `Encoder` built from them (images -> preprocessing ->
backbone -> named feature maps, on the chosen device, in the chosen precision)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._images import Preprocess
from .backbones import LAYERS, backbone_names, create_extractor
from .errors import AnomapError, ScoreError
from .ops import half_dtype
from .params import Choice, Names, Text, param


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnomapError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


@dataclass(kw_only=True, repr=False, eq=False)
class FeatureParams:
    """The backbone parameters shared by every detector built on pretrained features."""

    backbone: str = param(
        "wide_resnet50_2", Choice(tuple(backbone_names())), "pretrained network whose feature maps are used"
    )
    layers: tuple[str, ...] = param(
        ("layer2", "layer3"), Names(LAYERS), "backbone layers used, the first one sets the feature grid"
    )
    weights: str = param(
        "imagenet", Text(), "backbone weights: imagenet, random, or the path of a .pth/.safetensors state dict"
    )


class Encoder:
    """A frozen backbone with its preprocessing, on one device.

    Args:
        extractor: the backbone (see `anomap.backbones.create_extractor`), already on `device`.
        preprocess: resize, crop and the normalisation the backbone expects.
        device: where the backbone runs.
        precision: "fp32", or "fp16" / "bf16" to run the backbone under autocast; the feature maps
            it returns are float32 either way.
    """

    def __init__(self, extractor, preprocess: Preprocess, device: torch.device, precision: str = "fp32") -> None:
        self.extractor, self.preprocess, self.device, self.precision = extractor, preprocess, device, precision

    @classmethod
    def from_params(cls, det, device: torch.device, precision: str = "fp32") -> Encoder:
        """The encoder of a detector's `FeatureParams` fields and its `image_size` and `crop`."""
        extractor = create_extractor(det.backbone, det.layers, weights=det.weights)
        # channels-last runs the convolutions (depthwise ones especially) faster on CPU and GPU
        extractor = extractor.to(device, memory_format=torch.channels_last)
        preprocess = Preprocess(size=det.image_size, crop=det.crop, mean=extractor.mean, std=extractor.std)
        return cls(extractor, preprocess, device, precision)

    @property
    def size(self) -> int:
        """Side of the square network input, which is also the side of the anomaly maps."""
        return self.preprocess.output_size

    def features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) preprocessed images -> layer name -> (B, C, h, w) float32 feature maps."""
        batch = batch.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        with torch.autocast(self.device.type, dtype=half_dtype(self.precision), enabled=self.precision != "fp32"):
            feats = self.extractor(batch)
        feats = {name: fmap.float() for name, fmap in feats.items()}
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            for name, fmap in feats.items():
                if not torch.isfinite(fmap).all():
                    raise ScoreError(f"the backbone produced non-finite {name} features; check its weights")
        return feats
