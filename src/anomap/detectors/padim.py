"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2020).

Fit: layer1..layer3 features aligned to layer1's grid and concatenated, a fixed seeded random subset
of `n_features` channels, one Gaussian per grid position (mean, covariance + `eps` * I). Predict:
the Mahalanobis distance of each position's feature to its Gaussian, upsampled to the input size and
blurred; the image score is the largest map value.

Memory: the Gaussians are accumulated over batches as float64 sums and outer-product sums, so the
training features are never all held. At 256 px the layer1 grid is 64 x 64, so with 100 channels
the accumulators take 4096 x 100 x 100 x 8 B = 328 MB and the stored float32 inverse covariances
164 MB; with 550 channels (wide ResNets) 9.9 GB and 5 GB.

Default threshold (set by `fit`): mean + 3 sigma of leave-one-out scores of up to `threshold_images`
training images. Each is scored against the Gaussians refitted without it, computed exactly from
the fitted sums by a rank-one downdate (Sherman-Morrison): scored against Gaussians that saw it,
a training image looks more normal than an unseen normal image would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import LAYERS, layer_info
from ..encoder import FeatureParams
from ..errors import ParamError
from ..ops import align_concat, gaussian_blur, upsample
from ..params import BLUR_SIGMA, THRESHOLD_IMAGES, Float, Int, Maybe, Names, check_memory, param
from .base import Detector, expect_shape, state_grid


def default_n_features(total: int) -> int:
    """Channels kept by default: 100 for small backbones (< 1000 channels), else 550 (paper)."""
    return min(total, 100 if total < 1000 else 550)


def accumulate(sums: torch.Tensor, outer: torch.Tensor, x: torch.Tensor) -> None:
    """Add a batch to the running sums, in place.

    Args:
        sums: (P, D) float64 sum of features per position.
        outer: (P, D, D) float64 sum of outer products per position.
        x: (B, P, D) features.
    """
    xp = x.to(torch.float64).permute(1, 2, 0)  # (P, D, B)
    sums += xp.sum(2)
    outer.baddbmm_(xp, xp.transpose(1, 2))


def gaussians(sums: torch.Tensor, outer: torch.Tensor, n: int, eps: float, ddof: int = 1):
    """Mean and ridge-regularized inverse covariance per position from the running sums.

    Args:
        sums: (P, D), outer: (P, D, D) float64 sums over `n` samples.
        eps: ridge added to the diagonal of the covariance.
        ddof: the covariance is the scatter divided by n - ddof (1: as `np.cov`).

    Returns:
        mean (P, D) and inverse covariance (P, D, D), float64.
    """
    mean = sums / n
    scatter = outer - n * mean[:, :, None] * mean[:, None, :]
    eye = torch.eye(sums.shape[1], dtype=sums.dtype, device=sums.device)
    # inv returns column-major batches; row-major keeps the products the same after a save/load
    return mean, torch.linalg.inv(scatter / (n - ddof) + eps * eye).contiguous()


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances (B, P) of features (B, P, D) to per-position Gaussians (P, D), (P, D, D)."""
    diff = (x - mean).transpose(0, 1)  # (P, B, D)
    sq = (torch.bmm(diff, inv_cov) * diff).sum(2)
    return sq.clamp_(min=0).sqrt_().T


def leave_one_out(x: torch.Tensor, mean: torch.Tensor, inv_downdate: torch.Tensor, n: int) -> torch.Tensor:
    """Distances (B, P) of training features (B, P, D) to the Gaussians fitted without each of them.

    Args:
        mean: (P, D) mean over all `n` training images.
        inv_downdate: (P, D, D) inverse of scatter / (n - 2) + eps * I (see `gaussians`, ddof=2).

    Without sample x, the mean moves to m' with x - m' = n / (n - 1) (x - m) and the covariance is
    A - b u u^T with u = x - m, b = n / ((n - 1)(n - 2)) and A the matrix inverted in
    `inv_downdate`; Sherman-Morrison gives u^T (A - b u u^T)^-1 u = q / (1 - b q), q = u^T A^-1 u.
    """
    u = (x - mean).transpose(0, 1)  # (P, B, D)
    q = (torch.bmm(u, inv_downdate) * u).sum(2)
    b = n / ((n - 1) * (n - 2))
    sq = (n / (n - 1)) ** 2 * q / (1 - b * q)
    return sq.clamp_(min=0).sqrt_().T


@dataclass(kw_only=True, repr=False, eq=False)
class PaDiM(Detector, FeatureParams):
    """PaDiM anomaly detector; the first layer sets the grid. `seed` seeds the channel subset
    and the threshold image choice."""

    method = "padim"
    min_train_images = 3  # the leave-one-out covariance divides by n - 2

    layers: tuple[str, ...] = param(
        ("layer1", "layer2", "layer3"), Names(LAYERS), "backbone layers used, the first one sets the feature grid"
    )
    n_features: int | None = param(
        None,
        Maybe(Int(1, 4096)),
        "channels kept (a seeded random subset); null: 100, or 550 for backbones with 1000 channels or more",
    )
    eps: float = param(0.01, Float(0, 1e6, open_lo=True), "ridge added to each covariance's diagonal")
    blur_sigma: float = param(4.0, BLUR_SIGMA, "Gaussian blur of the anomaly map, in pixels")
    threshold_images: int = param(
        200, THRESHOLD_IMAGES, "at most this many training images give the leave-one-out threshold"
    )

    def _check_params(self) -> None:
        self._channel_subset()

    def _channel_subset(self) -> torch.Tensor:
        """(d,) sorted indices of the kept channels among all concatenated ones."""
        channels, _ = layer_info(self.backbone, self.layers)
        total = sum(channels.values())
        d = default_n_features(total) if self.n_features is None else self.n_features
        if not 1 <= d <= total:
            raise ParamError(f"n_features must be between 1 and {total} for these layers, got {d}")
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=gen)[:d].sort().values

    def _embed(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, P, d) features of the kept channels at the P grid positions."""
        x = align_concat(feats, self.layers, pool=1).index_select(1, self.channels_)
        return x.flatten(2).transpose(1, 2)

    def _maps(self, dist: torch.Tensor) -> torch.Tensor:
        """(B, P) distances -> (B, S, S) blurred maps."""
        grid = dist.reshape(dist.shape[0], *self.grid_).float()
        return gaussian_blur(upsample(grid, self.encoder_.size), self.blur_sigma)

    def _fit(self, images) -> np.ndarray:
        """Fit the per-position Gaussians on normal images; return leave-one-out scores."""
        n = len(images)
        self.channels_ = self._channel_subset().to(self.device_)
        sums = outer = None
        for feats in self._feature_batches(images, "fit features"):
            x = self._embed(feats)
            if sums is None:
                self.grid_ = tuple(feats[self.layers[0]].shape[-2:])
                check_memory(x.shape[1] * x.shape[2] ** 2 * 8 * 3, "PaDiM's covariances")
                sums = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
                outer = torch.zeros(*x.shape[1:], x.shape[2], dtype=torch.float64, device=x.device)
            accumulate(sums, outer, x)
        mean, inv_cov = gaussians(sums, outer, n, self.eps)
        self.mean_, self.inv_cov_ = mean.float(), inv_cov.float()
        inv_downdate = gaussians(sums, outer, n, self.eps, ddof=2)[1]
        del sums, outer
        return self._leave_out_scores(images, mean, inv_downdate)

    def _leave_out_scores(self, images, mean: torch.Tensor, inv_downdate: torch.Tensor) -> np.ndarray:
        """(m,) leave-one-out image scores of a seeded subset of the training images."""
        gen = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(images), generator=gen)[: self.threshold_images].sort().values
        subset = images[chosen] if isinstance(images, torch.Tensor) else [images[i] for i in chosen.tolist()]
        scores = []
        for feats in self._feature_batches(subset, "threshold"):
            dist = leave_one_out(self._embed(feats).double(), mean, inv_downdate, len(images))
            scores.append(self._maps(dist).amax((1, 2)).cpu())
        return torch.cat(scores).numpy()

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self._maps(mahalanobis(self._embed(self.encoder_.features(batch)), self.mean_, self.inv_cov_))
        return amap.amax((1, 2)), amap

    def _get_state(self):
        return {"mean": self.mean_, "inv_cov": self.inv_cov_}, {"grid": list(self.grid_)}

    def _check_state(self, tensors, state) -> None:
        h, w = state_grid(state, self.image_size)
        d = self._channel_subset().shape[0]
        expect_shape(tensors, "mean", (h * w, d))
        expect_shape(tensors, "inv_cov", (h * w, d, d))

    def _set_state(self, tensors, state) -> None:
        self.channels_ = self._channel_subset().to(self.device_)
        self.mean_ = tensors["mean"].to(self.device_, torch.float32)
        self.inv_cov_ = tensors["inv_cov"].to(self.device_, torch.float32)
        self.grid_ = state_grid(state, self.image_size)
