"""The feature pipeline shared by the detectors built on a pretrained backbone:
images -> preprocessing -> backbone -> named feature maps, in batches, on the chosen device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..backbones import create_extractor
from ..data import Preprocess, iter_batches
from ..errors import AnomapError, ScoreError
from ..ops import PRECISIONS, half_dtype


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnomapError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise AnomapError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


class Encoder:
    """A frozen backbone with its preprocessing.

    Args:
        backbone: backbone name (see `anomap.backbones.backbone_names()`).
        layers: feature layers to return.
        weights: "imagenet", "random" or a path to a weights file.
        image_size: resize target; `crop`: optional center crop.
        device: "cpu", "cuda" or "auto".
        batch_size: images per forward pass.
        precision: "fp32", or "fp16" / "bf16" to run the backbone under autocast (mixed precision);
            the feature maps it returns are float32 either way.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        weights: str,
        image_size: int,
        crop: int | None,
        device: str,
        batch_size: int,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise AnomapError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(device)
        self.precision = precision
        self.layers = tuple(layers)
        # channels-last runs the convolutions (depthwise ones especially) faster on CPU and GPU
        self.extractor = create_extractor(backbone, self.layers, weights=weights).to(
            self.device, memory_format=torch.channels_last
        )
        self.preprocess = Preprocess(
            size=image_size, crop=crop, mean=self.extractor.mean, std=self.extractor.std
        )
        self.batch_size = batch_size

    @classmethod
    def for_detector(cls, det) -> Encoder:
        """The encoder described by a detector's backbone, layers, weights, image_size, crop,
        device, batch_size and (where it has one) precision parameters."""
        return cls(det.backbone, det.layers, det.weights, det.image_size, det.crop, det.device, det.batch_size,
                   getattr(det, "precision", "fp32"))

    @property
    def size(self) -> int:
        """Side of the square network input, which is also the side of the anomaly maps."""
        return self.preprocess.output_size

    def input_batches(self, images, desc: str = "features") -> Iterator[torch.Tensor]:
        """Yield preprocessed (B, 3, S, S) batches on `self.device`, with a progress bar."""
        with tqdm(total=len(images), desc=desc, unit="img", disable=None) as bar:
            for batch in iter_batches(images, self.preprocess, batch_size=self.batch_size):
                yield batch.to(self.device, non_blocking=True)
                bar.update(batch.shape[0])

    def features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) preprocessed images -> layer name -> (B, C, h, w) float32 feature maps."""
        batch = batch.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=half_dtype(self.precision),
                                                    enabled=self.precision != "fp32"):
            feats = self.extractor(batch)
        feats = {name: fmap.float() for name, fmap in feats.items()}
        for name, fmap in feats.items():
            if not torch.isfinite(fmap).all():
                raise ScoreError(f"the backbone produced non-finite {name} features; check its weights")
        return feats

    def batches(self, images, desc: str = "features") -> Iterator[dict[str, torch.Tensor]]:
        """Yield layer name -> (B, C, h, w) feature maps on `self.device`, batch by batch."""
        with torch.inference_mode():  # also over the caller's work on the features
            for batch in self.input_batches(images, desc):
                yield self.features(batch)
