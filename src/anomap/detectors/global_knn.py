"""Global k-NN: one feature vector per image, scored by its distance to the training images' vectors.

Each requested layer is averaged over its whole grid (global average pooling) and the results are
concatenated into one vector per image. The image score is the mean Euclidean distance to its `k`
nearest training vectors (k=1 by default: the distance to the closest normal image, which needs no
tuning and works with a handful of training images). The method does not localize: its anomaly map
is constant over each image, equal to the image score.

Default threshold (set by `fit`): mean + 3 sigma of leave-one-out scores of the training images,
each scored against all the other training vectors (its own would give distance 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..backbones import layer_info
from ..errors import AnomapError
from ..metrics import sigma_threshold
from ..ops import knn
from .base import Detector, Prediction
from .features import Encoder


def pooled(feats: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Feature maps {layer: (B, C_l, h, w)} -> (B, sum C_l) global average pooled vectors."""
    return torch.cat([feats[name].float().mean((2, 3)) for name in layers], 1)


def leave_one_out_knn(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) vectors -> (N,) mean distance of each to its k nearest among the others."""
    n = vectors.shape[0]
    dist, idx = knn(vectors, vectors, k + 1)
    keep = idx != torch.arange(n, device=idx.device)[:, None]
    # a duplicate may rank before the vector itself: then drop the farthest of the k + 1 instead
    keep[keep.all(1), k] = False
    return dist[keep].reshape(n, k).mean(1)


class GlobalKNN(Detector):
    """Global-feature k-nearest-neighbour detector.

    Args:
        backbone, layers, weights, image_size, crop, device, batch_size: the feature pipeline
            (see `anomap.detectors.features.Encoder`); every layer is pooled and concatenated.
        k: nearest training vectors averaged into the score.
        seed: unused (the method has no randomness); accepted like every detector's.
    """

    method = "global_knn"

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights: str = "imagenet",
        image_size: int = 256,
        crop: int | None = None,
        k: int = 1,
        device: str = "auto",
        batch_size: int = 16,
        seed: int = 42,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self.image_size = image_size
        self.crop = crop
        self.k = k
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, images) -> GlobalKNN:
        """Store the pooled vectors of normal images (Samples, paths or arrays); set the threshold."""
        if self.k < 1:
            raise AnomapError(f"k must be at least 1, got {self.k}")
        if len(images) < self.k + 1:
            raise AnomapError(
                f"global_knn with k={self.k} needs at least {self.k + 1} training images, got {len(images)}"
            )
        self.encoder_ = Encoder.for_detector(self)
        batches = self.encoder_.batches(images, "fit features")
        self.bank_ = torch.cat([pooled(f, self.layers) for f in batches])
        self.train_scores_ = leave_one_out_knn(self.bank_, self.k).cpu().numpy()
        self.set_threshold(sigma_threshold(self.train_scores_))
        self.fitted_ = True
        return self

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) maps, each constant at its image's score."""
        self._check_fitted()
        scores = []
        for feats in self.encoder_.batches(images, "predict"):
            dist, _ = knn(pooled(feats, self.layers), self.bank_, self.k)
            scores.append(dist.mean(1).cpu())
        scores = torch.cat(scores).numpy()
        size = self.encoder_.size
        maps = np.broadcast_to(scores[:, None, None], (len(scores), size, size)).astype(np.float32)
        return Prediction(scores, maps, self.threshold_)

    def _get_state(self):
        return {"bank": self.bank_, "train_scores": torch.from_numpy(self.train_scores_)}, {}

    def _set_state(self, tensors, state) -> None:
        bank = tensors["bank"]
        dim = sum(layer_info(self.backbone, self.layers)[0].values())
        if bank.ndim != 2 or bank.shape[1] != dim or bank.shape[0] < self.k:
            raise ValueError(f"bank of shape {tuple(bank.shape)}, expected (n >= {self.k}, {dim})")
        self.encoder_ = Encoder.for_detector(self)
        self.bank_ = bank.to(self.encoder_.device, torch.float32)
        self.train_scores_ = tensors["train_scores"].numpy()
        self.fitted_ = True
