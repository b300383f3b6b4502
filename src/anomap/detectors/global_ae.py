"""Global feature autoencoder: the baseline that shows why global pooling loses small defects.

Fit: each image becomes one vector, the global average of each chosen backbone layer,
concatenated and standardised with the training mean and standard deviation; a shallow fully
connected autoencoder (D -> hidden -> D, ReLU) learns to reconstruct these vectors. Predict: the
image score is the mean squared reconstruction error of the image's vector. A defect covering a
few percent of the image moves the global average by about as much, so it is easily drowned by
normal variation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..backbones import layer_info
from ..errors import AnomapError
from ..metrics import sigma_threshold
from .base import Detector, Prediction
from .features import Encoder
from .training import (cache_features, channel_stats, check_shape, holdout_split, load_module_tensors,
                       module_tensors, seeded_module, train_autoencoder)


def _network(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class GlobalAE(Detector):
    """Autoencoder on globally pooled backbone features.

    The pixel map carries no localisation: it is the image score broadcast to every pixel, so
    it is constant within an image.

    Default threshold (set by `fit`): mean + 3 sigma of the scores of a seeded `holdout` fraction
    of the training images, kept out of the statistics and the training; when fewer than 2 images
    would be held out (or fewer than 2 left), of the training images themselves.

    Args:
        backbone, layers, weights, image_size, crop, device, batch_size: the feature pipeline
            (see `anomap.detectors.features.Encoder`); `batch_size` is also the training batch.
        hidden: width of the autoencoder's hidden layer.
        epochs, lr: training length and Adam learning rate.
        holdout: fraction of the training images held out for the threshold.
        seed: seeds the network, the shuffling and the hold-out choice.
    """

    method = "global_ae"

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        weights: str = "imagenet",
        image_size: int = 256,
        crop: int | None = None,
        hidden: int = 64,
        epochs: int = 200,
        lr: float = 1e-3,
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
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.holdout = holdout
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def _dim(self) -> int:
        return sum(layer_info(self.backbone, self.layers)[0].values())

    def _pool(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, D) concatenated global averages."""
        return torch.cat([feats[name].float().mean(dim=(2, 3)) for name in self.layers], dim=1)

    def fit(self, images) -> GlobalAE:
        """Train on normal images (Samples, paths or arrays) and set the threshold."""
        if len(images) < 2:
            raise AnomapError("global_ae needs at least two training images (feature standardisation)")
        self.encoder_ = Encoder.for_detector(self)
        vectors = cache_features(self.encoder_.batches(images, "fit features"), self._pool)  # (N, D)
        fit_idx, held_idx = holdout_split(len(vectors), self.holdout, self.seed)
        self.mean_, self.std_ = (s.to(self.encoder_.device) for s in channel_stats(vectors[fit_idx], [0]))
        self.net_ = seeded_module(lambda: _network(vectors.shape[1], self.hidden), self.seed)
        self.train_losses_ = train_autoencoder(
            self.net_, vectors[fit_idx], epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            device=self.encoder_.device, seed=self.seed, prepare=lambda x, _: self._standardize(x),
            desc="global_ae train",
        )
        self.fitted_ = True
        normal = vectors[held_idx] if len(held_idx) else vectors[fit_idx]
        with torch.inference_mode():
            self.threshold_scores_ = self._score(normal.to(self.encoder_.device)).cpu().numpy()
        self.set_threshold(sigma_threshold(self.threshold_scores_))
        return self

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean_) / self.std_

    def _score(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B,) mean squared reconstruction errors."""
        z = self._standardize(vectors)
        return (self.net_(z) - z).pow(2).mean(dim=1)

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) maps, each constant at its image's score."""
        self._check_fitted()
        size = self.encoder_.size
        with torch.inference_mode():
            scores = [self._score(self._pool(f)).cpu() for f in self.encoder_.batches(images, "predict")]
        scores = torch.cat(scores).numpy() if scores else np.zeros(0, np.float32)
        maps = np.broadcast_to(scores[:, None, None], (len(scores), size, size)).astype(np.float32)
        return Prediction(scores, maps, self.threshold_)

    def _get_state(self):
        tensors = {
            **module_tensors(self.net_),
            "mean": self.mean_,
            "std": self.std_,
            "threshold_scores": torch.from_numpy(self.threshold_scores_),
        }
        return tensors, {"train_losses": self.train_losses_}

    def _set_state(self, tensors, state) -> None:
        dim = self._dim()
        self.encoder_ = Encoder.for_detector(self)
        device = self.encoder_.device
        self.mean_ = check_shape("mean", tensors["mean"], (dim,)).to(device)
        self.std_ = check_shape("std", tensors["std"], (dim,)).to(device)
        self.net_ = _network(dim, self.hidden)
        load_module_tensors(self.net_, tensors)
        self.net_.to(device)
        self.threshold_scores_ = tensors["threshold_scores"].numpy()
        self.train_losses_ = list(state["train_losses"])
        self.fitted_ = True
