"""The detector contract.

A detector is a keyword-only dataclass of declared parameters (`anomap.params`). It learns in
`fit(images) -> self` and scores in `predict(images) -> Prediction` (higher = more anomalous),
both assembled here from the method's `_fit` and `_score_batch`. Learned state ends in `_`.
Saving and loading: `anomap.detectors.model_file`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .._images import Preprocess
from ..data import iter_batches
from ..encoder import Encoder, FeatureParams, resolve_device
from ..errors import AnomapError, ParamError, ScoreError
from ..metrics import sigma_threshold
from ..params import BATCH_SIZE, IMAGE_SIZE, SEED, Device, Maybe, declared, param, validate
from ..prediction import Prediction
from . import model_file
from .model_file import REGISTRY, load, short

__all__ = ["REGISTRY", "Detector", "Prediction", "expect_shape", "load", "state_grid"]


@dataclass(kw_only=True, repr=False, eq=False)
class Detector:
    """Base of every detector: declared parameters, batching, the threshold, saving.

    A method subclasses it as a keyword-only dataclass, sets `method` and `min_train_images`, and
    implements `_fit(images) -> normal scores`, `_score_batch(batch) -> (scores, maps)`,
    `_get_state` and `_set_state`. The base class owns `fit` (which sets the threshold from the
    normal scores and marks the model fitted last), `predict` and `score_batch`.
    """

    method: ClassVar[str] = ""
    min_train_images: ClassVar[int] = 1

    image_size: int = param(256, IMAGE_SIZE, "images are resized to image_size x image_size pixels")
    crop: int | None = param(
        None, Maybe(IMAGE_SIZE), "side of the centred square crop taken after resizing (null: no crop)"
    )
    device: str = param("auto", Device(), "where the networks run: auto (a GPU when present), cpu, cuda")
    batch_size: int = param(16, BATCH_SIZE, "images per forward pass (and per training step)")
    seed: int = param(42, SEED, "seeds every random choice of the method")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            REGISTRY[cls.method] = cls

    def __post_init__(self) -> None:
        validate(self)
        if self.crop is not None and self.crop > self.image_size:
            raise ParamError(f"crop must be at most image_size ({self.image_size}), got {self.crop}")
        self._check_params()

    def _check_params(self) -> None:
        """Checks that involve several parameters; the declarations check each one alone."""

    def get_params(self) -> dict[str, Any]:
        """The declared parameters, as stored on the instance."""
        return {name: getattr(self, name) for name in declared(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def threshold_(self) -> float | None:
        """Decision threshold on image scores (score >= threshold is anomalous), if one is set."""
        return getattr(self, "_threshold", None)

    def set_threshold(self, value: float) -> None:
        """Replace the decision threshold, e.g. with one calibrated on a validation split."""
        if not np.isfinite(value):
            raise ScoreError(f"threshold must be finite, got {value}")
        self._threshold = float(value)

    @property
    def preprocess_(self) -> Preprocess:
        """The preprocessing that makes `score_batch`'s input; backbone methods take their
        encoder's."""
        return self.encoder_.preprocess

    def _setup(self) -> None:
        """What fitting and loading both need: the device and, for backbone methods, the encoder."""
        self.device_ = resolve_device(self.device)
        if isinstance(self, FeatureParams):
            self.encoder_ = Encoder.from_params(self, self.device_, getattr(self, "precision", "fp32"))

    def fit(self, images) -> Detector:
        """Learn from normal images (Samples, paths, (H, W, 3) arrays or a preprocessed tensor),
        set the threshold to mean + 3 sigma of the normal scores. Returns self."""
        self.fitted_ = False
        if len(images) < self.min_train_images:
            raise AnomapError(
                f"{self.method} needs at least {self.min_train_images} training images, got {len(images)}"
            )
        self._setup()
        return self._complete_fit(self._fit(images))

    def _complete_fit(self, normal_scores: np.ndarray) -> Detector:
        """The last step of every fit: keep the (m,) normal scores, set the threshold from them,
        and only then mark the detector fitted. Returns self."""
        scores = np.asarray(normal_scores, dtype=np.float32)
        self.normal_scores_ = scores
        self.set_threshold(sigma_threshold(scores))
        self.fitted_ = True
        return self

    def _batches(self, images, desc: str) -> Iterator[torch.Tensor]:
        """Preprocessed (B, 3, S, S) batches on the device, with a progress bar."""
        with tqdm(total=len(images), desc=desc, unit="img", disable=None) as bar:
            for batch in iter_batches(images, self.preprocess_, batch_size=self.batch_size):
                yield batch.to(self.device_, non_blocking=True)
                bar.update(batch.shape[0])

    def _feature_batches(self, images, desc: str) -> Iterator[dict[str, torch.Tensor]]:
        """Layer name -> (B, C, h, w) feature maps of each batch (in inference mode, which also
        covers the caller's work on them)."""
        with torch.inference_mode():
            for batch in self._batches(images, desc):
                yield self.encoder_.features(batch)

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (B, 3, S, S) images (see `preprocess_`) -> image scores (B,) and maps
        (B, S, S), float32 tensors on the detector's device. Each image's result depends on that
        image only."""
        self._check_fitted()
        with torch.inference_mode():
            return self._score_batch(batch.to(self.device_))

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) float32 anomaly maps."""
        self._check_fitted()
        side = self.preprocess_.output_size
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, side, side), np.float32)]
        with torch.inference_mode():
            for batch in self._batches(images, "predict"):
                image, amap = self._score_batch(batch)
                scores.append(image.float().cpu().numpy())
                maps.append(amap.float().cpu().numpy())
        return Prediction(np.concatenate(scores), np.concatenate(maps), self.threshold_)

    def _fit(self, images) -> np.ndarray:  # pragma: no cover - contract
        raise NotImplementedError

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def _check_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:  # pragma: no cover
        """Raise ValueError unless the stored tensors and state fit the parameters (nothing built yet)."""
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise AnomapError(f"this {type(self).__name__} is not fitted yet: call fit(images) first")

    def save(self, path: str | Path, key: bytes | None = None) -> Path:
        """Write the fitted detector to one file (atomically), signed when a `key` is given (see
        `load`). Returns the path."""
        self._check_fitted()
        return model_file.save(self, path, key)


def expect_shape(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int | None, ...]) -> torch.Tensor:
    """The stored tensor `name` if it has `shape` (None: any positive size); else ValueError."""
    if name not in tensors:
        raise ValueError(f"tensor {name!r} is missing")
    t = tensors[name]
    if t.ndim != len(shape) or any(s == 0 or (e is not None and s != e) for s, e in zip(t.shape, shape)):
        want = ", ".join("n" if e is None else str(e) for e in shape)
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({want})")
    return t


def state_grid(state: dict[str, Any], limit: int) -> tuple[int, int]:
    """The stored feature grid (h, w): two integers from 1 to `limit`; else ValueError."""
    grid = state.get("grid")
    if (
        not isinstance(grid, list)
        or len(grid) != 2
        or any(isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= limit for g in grid)
    ):
        raise ValueError(f"grid must be two integers from 1 to {limit}, got {short(grid)}")
    return grid[0], grid[1]
