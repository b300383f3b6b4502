"""Convolutional autoencoder on pixels: the classic reconstruction baseline, no pretrained network.

Fit: images scaled to [-1, 1] (mean and std 0.5); an encoder of four stride-2 4x4 convolutions
(width, 2 width, 4 width, 4 width channels, LeakyReLU) and a 1x1 convolution to `bottleneck`
channels at 1/16 of the input side, and a mirrored decoder of transposed convolutions, trained
with the mean squared error to reproduce normal images. Predict: the per-pixel squared error
(mean over the colour channels), blurred, is the map; the image score is its maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .._images import Preprocess
from ..errors import ParamError
from ..ops import gaussian_blur
from ..params import BATCH_SIZE, BLUR_SIGMA, EPOCHS, Bool, Int, param
from .base import Detector
from .training import (
    TrainingParams,
    holdout_split,
    load_network,
    losses,
    module_tensors,
    normal_scores,
    seeded_module,
)

STRIDE = 16  # total downsampling of the encoder


def _network(width: int, bottleneck: int) -> nn.Module:
    chans = (3, width, 2 * width, 4 * width, 4 * width)
    act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
    encoder = [layer for cin, cout in zip(chans, chans[1:]) for layer in (nn.Conv2d(cin, cout, 4, 2, 1), act())]
    decoder = []
    for cin, cout in zip(chans[:0:-1], chans[-2::-1]):
        decoder += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), act()]
    return nn.Sequential(
        *encoder,
        nn.Conv2d(chans[-1], bottleneck, 1),
        act(),
        nn.Conv2d(bottleneck, chans[-1], 1),
        act(),
        *decoder[:-1],  # linear output
    )


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image of (B, 3, S, S) horizontally and vertically, each with probability 1/2."""
    h, v = (torch.rand(2, len(x), generator=gen) < 0.5).to(x.device)[:, :, None, None, None]
    x = torch.where(h, x.flip(3), x)
    return torch.where(v, x.flip(2), x)


@dataclass(kw_only=True, repr=False, eq=False)
class ConvAE(Detector, TrainingParams):
    """Convolutional autoencoder anomaly detector on pixels. The input side (image_size, or crop)
    must be a multiple of 16. `seed` seeds the network, the shuffling, the flips and the hold-out
    choice.

    Default threshold: mean + 3 sigma of the scores of a seeded `holdout` fraction of the training
    images, kept out of the training; when fewer than 2 images would be held out (or fewer than 2
    left), of the training images themselves.
    """

    method = "conv_ae"

    width: int = param(32, Int(1, 512), "channels of the first convolution (the others are 2x and 4x)")
    bottleneck: int = param(32, Int(1, 4096), "channels of the code at 1/16 of the input side")
    augment: bool = param(False, Bool(), "train on random horizontal and vertical flips of the images")
    epochs: int = param(10, EPOCHS, "training epochs")
    blur_sigma: float = param(4.0, BLUR_SIGMA, "Gaussian blur of the anomaly map, in pixels")
    batch_size: int = param(8, BATCH_SIZE, "images per training step and per forward pass")

    def _check_params(self) -> None:
        side = self.preprocess_.output_size
        if side % STRIDE:
            raise ParamError(
                f"conv_ae needs an input side that is a multiple of {STRIDE}, got {side}; change image_size or crop"
            )

    @property
    def preprocess_(self) -> Preprocess:
        """Pixels scaled to [-1, 1] (no backbone normalization)."""
        return Preprocess(size=self.image_size, crop=self.crop, mean=(0.5,) * 3, std=(0.5,) * 3)

    def _fit(self, images) -> np.ndarray:
        """Train on normal images; return the held-out images' scores."""
        pixels = torch.cat([batch.to("cpu", torch.float16) for batch in self._batches(images, "fit images")])
        fit_idx, held_idx = holdout_split(len(pixels), self.holdout, self.seed)
        self.net_ = seeded_module(lambda: _network(self.width, self.bottleneck), self.seed)
        self._train_net(pixels[fit_idx], _flip if self.augment else None, "conv_ae train")
        score = lambda x: self._score_batch(x.float())[0]  # noqa: E731
        return normal_scores(score, pixels, fit_idx, held_idx, self.batch_size, self.device_)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = (self.net_(batch) - batch).pow(2).mean(dim=1)
        amap = gaussian_blur(error, self.blur_sigma)
        return amap.amax(dim=(1, 2)), amap

    def _get_state(self):
        return module_tensors(self.net_), {"train_losses": self.train_losses_}

    def _check_state(self, tensors, state) -> None:
        losses(state)

    def _set_state(self, tensors, state) -> None:
        self.net_ = load_network(lambda: _network(self.width, self.bottleneck), tensors, self.device_)
        self.train_losses_ = losses(state)
