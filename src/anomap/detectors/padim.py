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

from collections.abc import Sequence

import numpy as np
import torch

from ..backbones import layer_info
from ..errors import AnomapError
from ..metrics import sigma_threshold
from ..ops import align_concat, gaussian_blur, upsample
from .base import Detector, Prediction
from .features import Encoder


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


class PaDiM(Detector):
    """PaDiM anomaly detector.

    Args:
        backbone, layers, weights, image_size, crop, device, batch_size: the feature pipeline
            (see `anomap.detectors.features.Encoder`); the first layer sets the grid.
        n_features: channels kept (a seeded random subset); None: `default_n_features`.
        eps: ridge added to each covariance's diagonal.
        blur_sigma: Gaussian blur of the anomaly map, in pixels.
        threshold_images: at most this many training images give the leave-one-out threshold.
        seed: seeds the channel subset and the threshold image choice.
    """

    method = "padim"

    def __init__(
        self,
        *,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        weights: str = "imagenet",
        image_size: int = 256,
        crop: int | None = None,
        n_features: int | None = None,
        eps: float = 0.01,
        blur_sigma: float = 4.0,
        threshold_images: int = 200,
        device: str = "auto",
        batch_size: int = 16,
        seed: int = 42,
    ) -> None:
        self.backbone = backbone
        self.layers = tuple(layers)
        self.weights = weights
        self.image_size = image_size
        self.crop = crop
        self.n_features = n_features
        self.eps = eps
        self.blur_sigma = blur_sigma
        self.threshold_images = threshold_images
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    def _channel_subset(self) -> torch.Tensor:
        """(d,) sorted indices of the kept channels among all concatenated ones."""
        channels, _ = layer_info(self.backbone, self.layers)
        total = sum(channels.values())
        d = default_n_features(total) if self.n_features is None else self.n_features
        if not 1 <= d <= total:
            raise AnomapError(f"n_features must be between 1 and {total} for these layers, got {d}")
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

    def fit(self, images) -> PaDiM:
        """Fit the per-position Gaussians on normal images (Samples, paths or arrays); set the threshold."""
        n = len(images)
        if n < 3:
            raise AnomapError(f"PaDiM needs at least 3 training images for its threshold, got {n}")
        if self.eps <= 0:
            raise AnomapError(f"eps must be positive, got {self.eps}")
        self.encoder_ = Encoder.for_detector(self)
        self.channels_ = self._channel_subset().to(self.encoder_.device)
        sums = outer = None
        for feats in self.encoder_.batches(images, "fit features"):
            x = self._embed(feats)
            if sums is None:
                self.grid_ = tuple(feats[self.layers[0]].shape[-2:])
                sums = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
                outer = torch.zeros(*x.shape[1:], x.shape[2], dtype=torch.float64, device=x.device)
            accumulate(sums, outer, x)
        mean, inv_cov = gaussians(sums, outer, n, self.eps)
        self.mean_, self.inv_cov_ = mean.float(), inv_cov.float()
        inv_downdate = gaussians(sums, outer, n, self.eps, ddof=2)[1]
        del sums, outer
        self.fitted_ = True
        self.train_scores_ = self._leave_out_scores(images, mean, inv_downdate)
        self.set_threshold(sigma_threshold(self.train_scores_))
        return self

    def _leave_out_scores(self, images, mean: torch.Tensor, inv_downdate: torch.Tensor) -> np.ndarray:
        """(m,) leave-one-out image scores of a seeded subset of the training images."""
        gen = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(images), generator=gen)[: self.threshold_images].sort().values
        subset = images[chosen] if isinstance(images, torch.Tensor) else [images[i] for i in chosen.tolist()]
        scores = []
        for feats in self.encoder_.batches(subset, "threshold"):
            dist = leave_one_out(self._embed(feats).double(), mean, inv_downdate, len(images))
            scores.append(self._maps(dist).amax((1, 2)).cpu())
        return torch.cat(scores).numpy()

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) anomaly maps."""
        self._check_fitted()
        scores, maps = [], []
        for feats in self.encoder_.batches(images, "predict"):
            amap = self._maps(mahalanobis(self._embed(feats), self.mean_, self.inv_cov_))
            scores.append(amap.amax((1, 2)).cpu())
            maps.append(amap.cpu())
        return Prediction(torch.cat(scores).numpy(), torch.cat(maps).numpy(), self.threshold_)

    def _get_state(self):
        tensors = {
            "mean": self.mean_,
            "inv_cov": self.inv_cov_,
            "train_scores": torch.from_numpy(self.train_scores_),
        }
        return tensors, {"grid": list(self.grid_)}

    def _set_state(self, tensors, state) -> None:
        channels = self._channel_subset()
        mean, inv_cov = tensors["mean"], tensors["inv_cov"]
        grid = tuple(state["grid"])
        p, d = grid[0] * grid[1], channels.shape[0]
        if tuple(mean.shape) != (p, d) or tuple(inv_cov.shape) != (p, d, d):
            raise ValueError(
                f"mean {tuple(mean.shape)} and inv_cov {tuple(inv_cov.shape)}, "
                f"expected ({p}, {d}) and ({p}, {d}, {d})"
            )
        self.encoder_ = Encoder.for_detector(self)
        self.channels_ = channels.to(self.encoder_.device)
        self.mean_ = mean.to(self.encoder_.device, torch.float32)
        self.inv_cov_ = inv_cov.to(self.encoder_.device, torch.float32)
        self.train_scores_ = tensors["train_scores"].numpy()
        self.grid_ = grid
        self.fitted_ = True
