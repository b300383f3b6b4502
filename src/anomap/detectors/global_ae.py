"""Global feature autoencoder: the baseline that shows why global pooling loses small defects.

Fit: each image becomes one vector, the global average of each chosen backbone layer,
concatenated and standardised with the training mean and standard deviation; a shallow fully
connected autoencoder (D -> hidden -> D, ReLU) learns to reconstruct these vectors. Predict: the
image score is the mean squared reconstruction error of the image's vector. A defect covering a
few percent of the image moves the global average by about as much, so it is easily drowned by
normal variation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import layer_info
from ..encoder import FeatureParams
from ..params import EPOCHS, Int, param
from .base import Detector, expect_shape
from .training import (
    TrainingParams,
    cache_features,
    channel_stats,
    holdout_split,
    load_network,
    losses,
    module_tensors,
    normal_scores,
    seeded_module,
)


def _network(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


@dataclass(kw_only=True, repr=False, eq=False)
class GlobalAE(Detector, FeatureParams, TrainingParams):
    """Autoencoder on globally pooled backbone features.

    The pixel map carries no localisation: it is the image score broadcast to every pixel, so
    it is constant within an image. `batch_size` is also the training batch; `seed` seeds the
    network, the shuffling and the hold-out choice.

    Default threshold: mean + 3 sigma of the scores of a seeded `holdout` fraction of the training
    images, kept out of the statistics and the training; when fewer than 2 images would be held
    out (or fewer than 2 left), of the training images themselves.
    """

    method = "global_ae"
    min_train_images = 2  # feature standardisation

    hidden: int = param(64, Int(1, 16384), "width of the autoencoder's hidden layer")
    epochs: int = param(200, EPOCHS, "training epochs")

    def _dim(self) -> int:
        return sum(layer_info(self.backbone, self.layers)[0].values())

    def _fit(self, images) -> np.ndarray:
        """Train on normal images; return the held-out images' scores."""
        vectors = cache_features(self._feature_batches(images, "fit features"), self._pool)  # (N, D)
        fit_idx, held_idx = holdout_split(len(vectors), self.holdout, self.seed)
        self.mean_, self.std_ = (s.to(self.device_) for s in channel_stats(vectors[fit_idx], [0]))
        self.net_ = seeded_module(lambda: _network(vectors.shape[1], self.hidden), self.seed)
        self._train_net(vectors[fit_idx], lambda x, _: self._standardize(x), "global_ae train")
        return normal_scores(self._score, vectors, fit_idx, held_idx, self.batch_size, self.device_)

    def _pool(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, D) concatenated global averages."""
        return torch.cat([feats[name].float().mean(dim=(2, 3)) for name in self.layers], dim=1)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean_) / self.std_

    def _score(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B,) mean squared reconstruction errors."""
        z = self._standardize(vectors)
        return (self.net_(z) - z).pow(2).mean(dim=1)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._score(self._pool(self.encoder_.features(batch)))
        side = self.encoder_.size
        return scores, scores[:, None, None].expand(-1, side, side).contiguous()

    def _get_state(self):
        tensors = {**module_tensors(self.net_), "mean": self.mean_, "std": self.std_}
        return tensors, {"train_losses": self.train_losses_}

    def _check_state(self, tensors, state) -> None:
        for name in ("mean", "std"):
            expect_shape(tensors, name, (self._dim(),))
        losses(state)

    def _set_state(self, tensors, state) -> None:
        self.mean_, self.std_ = tensors["mean"].to(self.device_), tensors["std"].to(self.device_)
        self.net_ = load_network(lambda: _network(self._dim(), self.hidden), tensors, self.device_)
        self.train_losses_ = losses(state)
