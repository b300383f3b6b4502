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

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..backbones import layer_info
from ..errors import AnomapError
from ..metrics import sigma_threshold
from ..ops import align_concat, gaussian_blur, upsample
from .base import Detector, Prediction
from .features import Encoder
from .training import (cache_features, channel_stats, check_shape, holdout_split, load_module_tensors,
                       module_tensors, seeded_module, train_autoencoder)


def _network(channels: int, latent: int) -> nn.Module:
    mid = (channels + latent) // 2
    return nn.Sequential(
        nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, latent, 1), nn.ReLU(),
        nn.Conv2d(latent, mid, 1), nn.ReLU(), nn.Conv2d(mid, channels, 1),
    )


def pca_dimension(x: torch.Tensor, variance: float) -> int:
    """Number of principal components of (M, C) samples explaining `variance` of the total variance."""
    x = x.double() - x.double().mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x).flip(0).clamp_min(0)  # descending
    share = eig.cumsum(0) / eig.sum().clamp_min(1e-12)
    return int((share < variance).sum()) + 1


class DFR(Detector):
    """Deep feature reconstruction anomaly detector.

    Default threshold (set by `fit`): mean + 3 sigma of the scores of a seeded `holdout` fraction
    of the training images, kept out of the statistics and the training; when fewer than 2 images
    would be held out (or fewer than 2 left), of the training images themselves.

    Args:
        backbone, layers, weights, image_size, crop, device, batch_size: the feature pipeline
            (see `anomap.detectors.features.Encoder`); `batch_size` is also the training batch.
        pool: side of the local average applied to each feature map (1 = none).
        latent: bottleneck channels; None chooses them by PCA (see `variance`).
        variance: share of the feature variance the PCA-sized bottleneck keeps.
        epochs, lr: training length and Adam learning rate.
        blur_sigma: Gaussian blur of the anomaly map, in pixels.
        holdout: fraction of the training images held out for the threshold.
        seed: seeds the network, the shuffling and the hold-out choice.
    """

    method = "dfr"

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights: str = "imagenet",
        image_size: int = 256,
        crop: int | None = None,
        pool: int = 3,
        latent: int | None = None,
        variance: float = 0.9,
        epochs: int = 40,
        lr: float = 1e-3,
        blur_sigma: float = 4.0,
        holdout: float = 0.15,
        device: str = "auto",
        batch_size: int = 16,
        seed: int = 42,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self.image_size = image_size
        self.crop = crop
        self.pool = pool
        self.latent = latent
        self.variance = variance
        self.epochs = epochs
        self.lr = lr
        self.blur_sigma = blur_sigma
        self.holdout = holdout
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def _channels(self) -> int:
        return sum(layer_info(self.backbone, self.layers)[0].values())

    def _embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, C, h, w) aligned multi-scale features."""
        return align_concat(feats, self.layers, pool=self.pool)

    def fit(self, images) -> DFR:
        """Train on normal images (Samples, paths or arrays) and set the threshold."""
        if len(images) < 1:
            raise AnomapError("fit needs at least one training image")
        if (self.latent is not None and self.latent < 1) or not 0 < self.variance <= 1:
            raise AnomapError(f"need latent >= 1 or None and variance in (0, 1]; got {self.latent}, {self.variance}")
        self.encoder_ = Encoder.for_detector(self)
        device = self.encoder_.device
        feats = cache_features(self.encoder_.batches(images, "fit features"), self._embed)  # (N, C, h, w)
        fit_idx, held_idx = holdout_split(len(feats), self.holdout, self.seed)
        self.mean_, self.std_ = (s.to(device) for s in channel_stats(feats[fit_idx], [0, 2, 3]))
        self.latent_ = self.latent or self._pca_latent(feats[fit_idx])
        self.net_ = seeded_module(lambda: _network(feats.shape[1], self.latent_), self.seed)
        self.train_losses_ = train_autoencoder(
            self.net_, feats[fit_idx], epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            device=device, seed=self.seed, prepare=lambda x, _: self._standardize(x), desc="dfr train",
        )
        self.fitted_ = True
        normal = feats[held_idx] if len(held_idx) else feats[fit_idx]
        scores = [self._score(chunk.to(device))[0].cpu() for chunk in normal.split(self.batch_size)]
        self.threshold_scores_ = torch.cat(scores).numpy()
        self.set_threshold(sigma_threshold(self.threshold_scores_))
        return self

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
        with torch.inference_mode():
            z = self._standardize(feats)
            error = (self.net_(z) - z).pow(2).mean(dim=1)  # (B, h, w)
            amap = gaussian_blur(upsample(error, self.encoder_.size), self.blur_sigma)
        return amap.amax(dim=(1, 2)), amap

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) anomaly maps."""
        self._check_fitted()
        size = self.encoder_.size
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, size, size), np.float32)]
        for feats in self.encoder_.batches(images, "predict"):
            image, amap = self._score(self._embed(feats))
            scores.append(image.cpu().numpy())
            maps.append(amap.cpu().numpy())
        return Prediction(np.concatenate(scores), np.concatenate(maps), self.threshold_)

    def _get_state(self):
        tensors = {
            **module_tensors(self.net_),
            "mean": self.mean_,
            "std": self.std_,
            "threshold_scores": torch.from_numpy(self.threshold_scores_),
        }
        return tensors, {"latent": self.latent_, "train_losses": self.train_losses_}

    def _set_state(self, tensors, state) -> None:
        channels, latent = self._channels(), int(state["latent"])
        self.encoder_ = Encoder.for_detector(self)
        device = self.encoder_.device
        self.mean_ = check_shape("mean", tensors["mean"], (channels,)).to(device)
        self.std_ = check_shape("std", tensors["std"], (channels,)).to(device)
        self.latent_ = latent
        self.net_ = _network(channels, latent)
        load_module_tensors(self.net_, tensors)
        self.net_.to(device)
        self.threshold_scores_ = tensors["threshold_scores"].numpy()
        self.train_losses_ = list(state["train_losses"])
        self.fitted_ = True
