"""Deep Feature Reconstruction (Yang et al., "Unsupervised Anomaly Segmentation via Deep Feature
Reconstruction", arXiv:2012.07122).

Fit: multi-scale patch features (the chosen layers, each locally averaged over `pool` x `pool`,
aligned to the shallowest grid and concatenated), standardised per channel with the training
statistics; a 1x1-convolutional autoencoder C -> mid -> latent -> mid -> C (ReLU) learns to
reconstruct them. Predict: the per-position squared reconstruction error (mean over channels),
upsampled to the input size and blurred, is the map; the image score is its maximum.

As in the paper, `latent=None` sizes the bottleneck by principal component analysis of the
training features: the number of components that explain `variance` of their total variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import layer_info
from ..encoder import FeatureParams
from ..ops import align_concat, gaussian_blur, upsample
from ..params import BLUR_SIGMA, EPOCHS, Float, Int, Maybe, param
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


def _network(channels: int, latent: int) -> nn.Module:
    mid = (channels + latent) // 2
    return nn.Sequential(
        nn.Conv2d(channels, mid, 1),
        nn.ReLU(),
        nn.Conv2d(mid, latent, 1),
        nn.ReLU(),
        nn.Conv2d(latent, mid, 1),
        nn.ReLU(),
        nn.Conv2d(mid, channels, 1),
    )


def pca_dimension(x: torch.Tensor, variance: float) -> int:
    """Number of principal components of (M, C) samples explaining `variance` of the total variance."""
    x = x.double() - x.double().mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x).flip(0).clamp_min(0)  # descending
    share = eig.cumsum(0) / eig.sum().clamp_min(1e-12)
    return int((share < variance).sum()) + 1


@dataclass(kw_only=True, repr=False, eq=False)
class DFR(Detector, FeatureParams, TrainingParams):
    """Deep feature reconstruction anomaly detector. `batch_size` is also the training batch;
    `seed` seeds the network, the shuffling and the hold-out choice.

    Default threshold: mean + 3 sigma of the scores of a seeded `holdout` fraction of the training
    images, kept out of the statistics and the training; when fewer than 2 images would be held
    out (or fewer than 2 left), of the training images themselves.
    """

    method = "dfr"

    pool: int = param(3, Int(1, 15), "side of the local average applied to each feature map (1: none)")
    latent: int | None = param(None, Maybe(Int(1, 4096)), "bottleneck channels; null chooses them by PCA")
    variance: float = param(
        0.9, Float(0, 1, open_lo=True), "share of the feature variance the PCA-sized bottleneck keeps"
    )
    epochs: int = param(40, EPOCHS, "training epochs")
    blur_sigma: float = param(4.0, BLUR_SIGMA, "Gaussian blur of the anomaly map, in pixels")

    def _channels(self) -> int:
        return sum(layer_info(self.backbone, self.layers)[0].values())

    def _embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, C, h, w) aligned multi-scale features."""
        return align_concat(feats, self.layers, pool=self.pool)

    def _fit(self, images) -> np.ndarray:
        """Train on normal images; return the held-out images' scores."""
        feats = cache_features(self._feature_batches(images, "fit features"), self._embed)  # (N, C, h, w)
        fit_idx, held_idx = holdout_split(len(feats), self.holdout, self.seed)
        self.mean_, self.std_ = (s.to(self.device_) for s in channel_stats(feats[fit_idx], [0, 2, 3]))
        self.latent_ = self.latent or self._pca_latent(feats[fit_idx])
        self.net_ = seeded_module(lambda: _network(feats.shape[1], self.latent_), self.seed)
        self._train_net(feats[fit_idx], lambda x, _: self._standardize(x), "dfr train")
        score = lambda x: self._score(x)[0]  # noqa: E731
        return normal_scores(score, feats, fit_idx, held_idx, self.batch_size, self.device_)

    def _pca_latent(self, feats: torch.Tensor) -> int:
        """Bottleneck size from the standardised training features (at most 20 000 positions, seeded)."""
        x = self._standardize(feats.to(self.mean_.device)).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        x = x[torch.randperm(len(x), generator=gen)[:20000].to(x.device)]
        return pca_dimension(x, self.variance)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean_[:, None, None]) / self.std_[:, None, None]

    def _score(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) features -> image scores (B,), maps (B, S, S)."""
        z = self._standardize(feats)
        error = (self.net_(z) - z).pow(2).mean(dim=1)  # (B, h, w)
        amap = gaussian_blur(upsample(error, self.encoder_.size), self.blur_sigma)
        return amap.amax(dim=(1, 2)), amap

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._score(self._embed(self.encoder_.features(batch)))

    def _get_state(self):
        tensors = {**module_tensors(self.net_), "mean": self.mean_, "std": self.std_}
        return tensors, {"latent": self.latent_, "train_losses": self.train_losses_}

    def _check_state(self, tensors, state) -> None:
        for name in ("mean", "std"):
            expect_shape(tensors, name, (self._channels(),))
        self._stored_latent(state)
        losses(state)

    def _stored_latent(self, state) -> int:
        latent = state.get("latent")
        if isinstance(latent, bool) or not isinstance(latent, int) or not 1 <= latent <= self._channels():
            raise ValueError(f"latent must be an integer from 1 to {self._channels()}")
        return latent

    def _set_state(self, tensors, state) -> None:
        self.mean_, self.std_ = tensors["mean"].to(self.device_), tensors["std"].to(self.device_)
        self.latent_ = self._stored_latent(state)
        self.net_ = load_network(lambda: _network(self._channels(), self.latent_), tensors, self.device_)
        self.train_losses_ = losses(state)
