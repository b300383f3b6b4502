"""Global k-NN: one feature vector per image, scored by its distance to the training images' vectors.

Each requested layer is averaged over its whole grid (global average pooling) and the results are
concatenated into one vector per image, stored centred on the training mean. The image score is
the mean Euclidean distance to its `k` nearest training vectors (k=1 by default: the distance to
the closest normal image, which needs no tuning and works with a handful of training images). The
method does not localize: its anomaly map is constant over each image, equal to the image score.

Default threshold: mean + 3 sigma of leave-one-out scores of the training images,
each scored against all the other training vectors (its own would give distance 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import layer_info
from ..encoder import FeatureParams
from ..ops import knn
from ..params import Int, param
from .base import Detector, expect_shape


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


@dataclass(kw_only=True, repr=False, eq=False)
class GlobalKNN(Detector, FeatureParams):
    """Global-feature k-nearest-neighbour detector; every layer is pooled and concatenated. The
    method has no randomness: `seed` is accepted like every detector's."""

    method = "global_knn"

    k: int = param(1, Int(1, 1000), "nearest training vectors averaged into the score")

    @property
    def min_train_images(self) -> int:
        return self.k + 1  # the leave-one-out threshold needs k others

    def _fit(self, images) -> np.ndarray:
        """Store the pooled vectors of normal images; return their leave-one-out scores."""
        vectors = torch.cat([pooled(f, self.layers) for f in self._feature_batches(images, "fit features")])
        # distances come from |q|^2 + |b|^2 - 2 q.b: centred vectors keep its rounding error small
        self.center_ = vectors.mean(0)
        self.bank_ = vectors - self.center_
        return leave_one_out_knn(self.bank_, self.k).cpu().numpy()

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = pooled(self.encoder_.features(batch), self.layers) - self.center_
        scores = knn(query, self.bank_, self.k)[0].mean(1)
        side = self.encoder_.size
        return scores, scores[:, None, None].expand(-1, side, side).contiguous()

    def _get_state(self):
        return {"bank": self.bank_, "center": self.center_}, {}

    def _check_state(self, tensors, state) -> None:
        dim = sum(layer_info(self.backbone, self.layers)[0].values())
        bank = expect_shape(tensors, "bank", (None, dim))
        expect_shape(tensors, "center", (dim,))
        if bank.shape[0] < self.k:
            raise ValueError(f"bank holds {bank.shape[0]} vectors, fewer than k={self.k}")

    def _set_state(self, tensors, state) -> None:
        self.bank_ = tensors["bank"].to(self.device_, torch.float32)
        self.center_ = tensors["center"].to(self.device_, torch.float32)
