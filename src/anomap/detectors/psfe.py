"""PSFE: patch-wise statistical feature encoding, a detector without learned features.

The layer2 and layer3 maps are aligned to layer2's grid and concatenated; each channel is then
standardized over the image's own grid positions, so that layers of different magnitude weigh
alike. The grid is cut into `patch_size` x `patch_size` patches (every `stride` cells), and each
patch is summarized by non-parametric statistics of its features:

- ``variance``: the mean over channels of each channel's variance within the patch;
- ``entropy``: the Shannon entropy (nats) of a `bins`-bin histogram of all the patch's values, on
  the fixed range [-3, 3] of the standardized values (values outside fall in the end bins).

Each statistic becomes a z-score of how far the patch deviates from what is normal:

- ``reference="none"``: against the image's own patches, robustly: (s - median) / (1.4826 MAD),
  so nothing is learned; it suits textures, where every patch should look alike.
- ``reference="train"``: against the mean and standard deviation of that statistic at the same
  patch position over the normal training images (std floored at 10% of its median over positions,
  so near-constant positions do not explode); no memory bank.

A patch's anomaly is the sum of the absolute z-scores of the chosen `stats`. Each grid cell takes
the mean over the patches covering it; the cell map is upsampled to the input size and blurred.
The image score is the largest map value.

Default threshold: mean + 3 sigma of training-image scores. With "none" these are
plain scores, as nothing was learned from them; with "train" each training image is scored against
the mean and std of the other training images (leave-one-out, exact from the kept statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..encoder import FeatureParams
from ..ops import align_concat, gaussian_blur, upsample
from ..params import BLUR_SIGMA, Choice, Int, Maybe, Names, param
from .base import Detector, expect_shape, state_grid

STATS = ("variance", "entropy")
REFERENCES = ("none", "train")
_RANGE = 3.0  # histogram range of the standardized values: [-_RANGE, _RANGE]
_MAD_TO_STD = 1.4826


def standardize_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> the same with each channel of each image at zero mean and unit variance."""
    mean = x.mean((2, 3), keepdim=True)
    std = x.std((2, 3), keepdim=True, unbiased=False)
    return (x - mean) / std.clamp(min=1e-6)


def patches(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size * size, L) patch values; the grid is edge-padded to fit whole patches."""
    pad_h, pad_w = (_fit_pad(n, size, stride) for n in x.shape[-2:])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    cols = F.unfold(x, size, stride=stride)  # (B, C * size * size, L)
    return cols.reshape(x.shape[0], x.shape[1], size * size, -1)


def _fit_pad(n: int, size: int, stride: int) -> int:
    """Cells to add to a side of n cells so that patches of `size` every `stride` end exactly at it."""
    return max(size - n, (-(n - size)) % stride)


def patch_variance(p: torch.Tensor) -> torch.Tensor:
    """(B, C, K, L) patch values -> (B, L) mean over channels of the within-patch variance."""
    return p.var(2, unbiased=False).mean(1)


def patch_entropy(p: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C, K, L) patch values -> (B, L) entropy of each patch's histogram on [-3, 3], in nats."""
    b, c, k, length = p.shape
    idx = ((p + _RANGE) * (bins / (2 * _RANGE))).floor().clamp_(0, bins - 1).long()
    idx = idx.permute(0, 3, 1, 2).reshape(b, length, c * k)
    ones = torch.ones_like(idx, dtype=torch.float32)
    counts = torch.zeros(b, length, bins, device=p.device).scatter_add_(2, idx, ones)
    prob = counts / (c * k)
    return -(prob * prob.clamp(min=1e-12).log()).sum(2)


def robust_z(s: torch.Tensor) -> torch.Tensor:
    """(B, K, L) statistics -> z-scores against each image's own median and MAD over the L patches."""
    med = s.median(2, keepdim=True).values
    mad = (s - med).abs().median(2, keepdim=True).values
    return (s - med) / (_MAD_TO_STD * mad).clamp(min=1e-6)


def cell_map(patch_scores: torch.Tensor, grid: tuple[int, int], size: int, stride: int) -> torch.Tensor:
    """(B, L) patch scores -> (B, H, W) cell scores: each cell the mean of the patches covering it."""
    h, w = grid
    padded = (h + _fit_pad(h, size, stride), w + _fit_pad(w, size, stride))
    cols = patch_scores[:, None, :].expand(-1, size * size, -1)
    total = F.fold(cols, padded, size, stride=stride)
    count = F.fold(torch.ones_like(cols[:1]), padded, size, stride=stride)
    return (total / count)[:, 0, :h, :w]


@dataclass(kw_only=True, repr=False, eq=False)
class PSFE(Detector, FeatureParams):
    """Patch-wise statistical feature encoding; the first layer sets the grid. The method has no
    randomness: `seed` is accepted like every detector's."""

    method = "psfe"
    min_train_images = 2

    patch_size: int = param(4, Int(1, 64), "patch side, in feature grid cells")
    stride: int | None = param(None, Maybe(Int(1, 64)), "step between patches, in cells (null: patch_size)")
    stats: tuple[str, ...] = param(("variance",), Names(STATS), "the statistics combined")
    reference: str = param(
        "train", Choice(REFERENCES), "none (the image's own patches) or train (per-position training statistics)"
    )
    bins: int = param(16, Int(2, 1024), "histogram bins of the entropy")
    blur_sigma: float = param(4.0, BLUR_SIGMA, "Gaussian blur of the anomaly map, in pixels")

    @property
    def _step(self) -> int:
        return self.patch_size if self.stride is None else self.stride

    def _statistics(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Feature maps -> (B, len(stats), L) patch statistics."""
        x = standardize_channels(align_concat(feats, self.layers, pool=1))
        p = patches(x, self.patch_size, self._step)
        found = {"variance": patch_variance, "entropy": lambda v: patch_entropy(v, self.bins)}
        return torch.stack([found[name](p) for name in self.stats], 1)

    def _maps(self, z: torch.Tensor) -> torch.Tensor:
        """(B, len(stats), L) z-scores -> (B, S, S) blurred maps."""
        cells = cell_map(z.abs().sum(1), self.grid_, self.patch_size, self._step)
        return gaussian_blur(upsample(cells, self.encoder_.size), self.blur_sigma)

    def _z(self, s: torch.Tensor) -> torch.Tensor:
        if self.reference == "none":
            return robust_z(s)
        return (s - self.stat_mean_) / self.stat_std_

    def _fit(self, images) -> np.ndarray:
        """Measure the training statistics ("train"); return the training images' scores."""
        n = len(images)
        # (N, K, L) statistics: a few floats per patch, so those of all training images are kept
        train = []
        for feats in self._feature_batches(images, "fit features"):
            self.grid_ = tuple(feats[self.layers[0]].shape[-2:])
            train.append(self._statistics(feats).double())
        train = torch.cat(train)
        if self.reference == "none":
            z = robust_z(train)
        else:
            total, squares = train.sum(0), train.pow(2).sum(0)
            mean, std = _mean_std(total, squares, n)
            self.stat_mean_, self.stat_std_ = mean.float(), std.float()
            loo_mean, loo_std = _mean_std(total - train, squares - train.pow(2), n - 1)  # (N, K, L)
            z = (train - loo_mean) / loo_std
        return torch.cat([self._maps(b).amax((1, 2)) for b in z.float().split(self.batch_size)]).cpu().numpy()

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self._maps(self._z(self._statistics(self.encoder_.features(batch))))
        return amap.amax((1, 2)), amap

    def _get_state(self):
        tensors = {"stat_mean": self.stat_mean_, "stat_std": self.stat_std_} if self.reference == "train" else {}
        return tensors, {"grid": list(self.grid_)}

    def _check_state(self, tensors, state) -> None:
        self.grid_ = state_grid(state, self.image_size)
        if self.reference == "train":
            for name in ("stat_mean", "stat_std"):
                expect_shape(tensors, name, (len(self.stats), self._n_patches()))

    def _set_state(self, tensors, state) -> None:
        self.grid_ = state_grid(state, self.image_size)
        if self.reference == "train":
            self.stat_mean_ = tensors["stat_mean"].to(self.device_)
            self.stat_std_ = tensors["stat_std"].to(self.device_)

    def _n_patches(self) -> int:
        """Patches L on the fitted grid."""
        size, step = self.patch_size, self._step
        return math.prod((g + _fit_pad(g, size, step) - size) // step + 1 for g in self.grid_)


def _mean_std(total: torch.Tensor, squares: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and floored population std from sums over n samples; the floor is 10% of the median std
    over positions of each statistic (the last axis)."""
    mean = total / n
    std = (squares / n - mean.pow(2)).clamp(min=0).sqrt()
    floor = 0.1 * std.median(-1, keepdim=True).values
    return mean, torch.maximum(std, floor.clamp(min=1e-6))
