"""The model behind the server: uploads decoded and preprocessed, batches scored, answer pictures."""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import __version__
from .._images import decode_image, png_bytes
from ..detectors import Detector, load
from ..detectors.model_file import FORMAT, FORMAT_VERSION
from ..errors import AnomapError, ScoreError
from ..pictures import heat_range, heatmap_overlay, segmentation

if TYPE_CHECKING:
    from ..runtime import ExportedModel


@dataclass(frozen=True)
class Upload:
    """One decoded upload: the model's input and what the answer pictures need."""

    tensor: torch.Tensor  # (3, S, S) float32, preprocessed
    image: np.ndarray | None  # (H, W, 3) uint8, kept only when a heatmap is asked for
    height: int
    width: int


@dataclass(frozen=True)
class Scored:
    """One image's result and the batch it was scored in."""

    score: float
    amap: np.ndarray  # (S, S) float32
    batch_size: int
    seconds: float  # time of the whole batch's forward pass


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


EXPORTED = (".onnx", ".xml")  # exported models, scored by `anomap.runtime` (onnxruntime, OpenVINO)


def load_model(path: Path, device: str | None, key: bytes | None = None) -> tuple[Detector | ExportedModel, str, int]:
    """The detector (with `key`: signed with it) or exported model in `path`, its file format and
    format version."""
    if path.suffix.lower() not in EXPORTED:
        return load(path, device=device, key=key), FORMAT, FORMAT_VERSION
    if key is not None:
        raise AnomapError(f"{path}: exported files carry no signature; --key applies to model files")
    from .. import runtime

    if device not in (None, "cpu", "auto"):
        raise AnomapError(f"{path}: exported models are scored on the CPU here; leave out --device {device}")
    return runtime.load(path), runtime.EXPORT_FORMAT, runtime.EXPORT_VERSION


class ServedModel:
    """A loaded detector, or exported model, with what the API reports about it.

    Args:
        path: a model file (`.anomap`), or an exported one (`.onnx`, OpenVINO `.xml`).
        device: overrides the saved device ("cpu", "cuda", "auto"); None keeps it.
        key: when given, a model file must be signed with it.
    """

    def __init__(self, path: str | Path, device: str | None = None, key: bytes | None = None) -> None:
        path = Path(path)
        self.detector, self.format, self.format_version = load_model(path, device, key)
        self.sha256 = file_sha256(path)
        if self.detector.threshold_ is None:
            raise ScoreError(f"{path}: the model has no threshold; calibrate it before serving")
        self.threshold = float(self.detector.threshold_)
        self.heat_scale = heat_range(self.detector.normal_scores_)
        self.score([self.detector.preprocess_.image(np.zeros((64, 64, 3), np.uint8))])  # warm-up

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/model` answers (JSON-ready)."""
        params = self.detector.get_params()
        return {
            "method": self.detector.method,
            "backbone": params.get("backbone"),
            "input_size": self.detector.preprocess_.output_size,
            "threshold": self.threshold,
            "sha256": self.sha256,
            "anomap_version": __version__,
            "format": self.format,
            "format_version": self.format_version,
            "device": str(self.detector.device_),
            "params": params,
        }

    def prepare(self, data: bytes, keep_image: bool, name: str = "the upload") -> Upload:
        """Encoded image bytes -> Upload. Raises DataError, starting with `name`, for anything
        `load_image` refuses."""
        image = decode_image(data, name)
        height, width = image.shape[:2]
        return Upload(self.detector.preprocess_.image(image), image if keep_image else None, height, width)

    def score(self, tensors: list[torch.Tensor]) -> list[Scored]:
        """Score (3, S, S) tensors in one forward pass; each result depends on its image only."""
        start = time.perf_counter()
        # np.stack is single-threaded; torch.stack's intra-op threads would fight the decoders for cores
        batch = torch.from_numpy(np.stack([t.numpy() for t in tensors]))
        scores, maps = self.detector.score_batch(batch)
        scores, maps = scores.float().cpu().numpy(), maps.float().cpu().numpy()
        seconds = time.perf_counter() - start
        return [Scored(float(s), m, len(tensors), seconds) for s, m in zip(scores, maps)]

    def answer(self, upload: Upload, scored: Scored, mask: bool, heatmap: bool) -> dict[str, Any]:
        """The JSON answer for one image; `mask` and `heatmap` add base64 PNGs at the image's size.

        The heatmap has the colours of `anomap predict`'s: the model's scale (`heat_range`), the
        same for every image.
        """
        if not (np.isfinite(scored.score) and np.isfinite(scored.amap).all()):
            raise ScoreError("the model produced NaN or infinite scores; check the model file and its weights")
        out: dict[str, Any] = {
            "score": scored.score,
            "is_anomalous": scored.score >= self.threshold,
            "threshold": self.threshold,
            "width": upload.width,
            "height": upload.height,
        }
        if mask:
            out["mask"] = _base64_png(segmentation(scored.amap >= self.threshold, (upload.height, upload.width)))
        if heatmap:
            out["heatmap"] = _base64_png(heatmap_overlay(upload.image, scored.amap, *self.heat_scale))
        return out


def _base64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")
