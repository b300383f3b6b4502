"""Convolutional autoencoder on pixels: the classic reconstruction baseline, no pretrained network.

Fit: images scaled to [-1, 1] (mean and std 0.5); an encoder of four stride-2 4x4 convolutions
(width, 2 width, 4 width, 4 width channels, LeakyReLU) and a 1x1 convolution to `bottleneck`
channels at 1/16 of the input side, and a mirrored decoder of transposed convolutions, trained
with the mean squared error to reproduce normal images. Predict: the per-pixel squared error
(mean over the colour channels), blurred, is the map; the image score is its maximum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Preprocess, iter_batches
from ..errors import AnomapError
from ..metrics import sigma_threshold
from ..ops import gaussian_blur
from .base import Detector, Prediction
from .features import resolve_device
from .training import (holdout_split, load_module_tensors, module_tensors,
                       seeded_module, train_autoencoder)

STRIDE = 16  # total downsampling of the encoder


def _network(width: int, bottleneck: int) -> nn.Module:
    chans = (3, width, 2 * width, 4 * width, 4 * width)
    act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
    encoder = [layer for cin, cout in zip(chans, chans[1:]) for layer in (nn.Conv2d(cin, cout, 4, 2, 1), act())]
    decoder = []
    for cin, cout in zip(chans[:0:-1], chans[-2::-1]):
        decoder += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), act()]
    return nn.Sequential(
        *encoder, nn.Conv2d(chans[-1], bottleneck, 1), act(), nn.Conv2d(bottleneck, chans[-1], 1), act(),
        *decoder[:-1],  # linear output
    )


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image of (B, 3, S, S) horizontally and vertically, each with probability 1/2."""
    h, v = (torch.rand(2, len(x), generator=gen) < 0.5).to(x.device)[:, :, None, None, None]
    x = torch.where(h, x.flip(3), x)
    return torch.where(v, x.flip(2), x)


class ConvAE(Detector):
    """Convolutional autoencoder anomaly detector on pixels.

    Default threshold (set by `fit`): mean + 3 sigma of the scores of a seeded `holdout` fraction
    of the training images, kept out of the training; when fewer than 2 images would be held out
    (or fewer than 2 left), of the training images themselves.

    Args:
        image_size: resize target; `crop`: optional center crop. The input side must be a
            multiple of 16.
        width: channels of the first convolution (the others are 2x and 4x).
        bottleneck: channels of the code at 1/16 of the input side.
        augment: train on random horizontal and vertical flips of the images (for textures and
            objects without a fixed orientation).
        epochs, lr, batch_size: training length, Adam learning rate and images per batch.
        blur_sigma: Gaussian blur of the anomaly map, in pixels.
        holdout: fraction of the training images held out for the threshold.
        device: "cpu", "cuda" or "auto".
        seed: seeds the network, the shuffling, the flips and the hold-out choice.
    """

    method = "conv_ae"

    def __init__(
        self,
        *,
        image_size: int = 256,
        crop: int | None = None,
        width: int = 32,
        bottleneck: int = 32,
        augment: bool = False,
        epochs: int = 10,
        lr: float = 1e-3,
        blur_sigma: float = 4.0,
        holdout: float = 0.15,
        device: str = "auto",
        batch_size: int = 8,
        seed: int = 42,
    ) -> None:
        self.image_size = image_size
        self.crop = crop
        self.width = width
        self.bottleneck = bottleneck
        self.augment = augment
        self.epochs = epochs
        self.lr = lr
        self.blur_sigma = blur_sigma
        self.holdout = holdout
        self.device = device
        self.batch_size = batch_size
        self.seed = seed

    @property
    def preprocess_(self) -> Preprocess:
        """Pixels scaled to [-1, 1] (no backbone normalization)."""
        return Preprocess(size=self.image_size, crop=self.crop, mean=(0.5,) * 3, std=(0.5,) * 3)

    def _setup(self) -> None:
        side = self.preprocess_.output_size
        if side % STRIDE:
            raise AnomapError(f"conv_ae needs an input side that is a multiple of {STRIDE}, got {side}; "
                              "change image_size or crop")
        self.device_ = resolve_device(self.device)

    def _load(self, images, desc: str) -> torch.Tensor:
        """Images -> (N, 3, S, S) preprocessed, on the CPU as float16."""
        chunks = []
        with tqdm(total=len(images), desc=desc, unit="img", disable=None) as bar:
            for batch in iter_batches(images, self.preprocess_, batch_size=self.batch_size):
                chunks.append(batch.half())
                bar.update(len(batch))
        return torch.cat(chunks)

    def fit(self, images) -> ConvAE:
        """Train on normal images (Samples, paths or arrays) and set the threshold."""
        if len(images) < 1:
            raise AnomapError("fit needs at least one training image")
        self._setup()
        pixels = self._load(images, "fit images")
        fit_idx, held_idx = holdout_split(len(pixels), self.holdout, self.seed)
        self.net_ = seeded_module(lambda: _network(self.width, self.bottleneck), self.seed)
        self.train_losses_ = train_autoencoder(
            self.net_, pixels[fit_idx], epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            device=self.device_, seed=self.seed, prepare=_flip if self.augment else None, desc="conv_ae train",
        )
        self.fitted_ = True
        normal = pixels[held_idx] if len(held_idx) else pixels[fit_idx]
        scores = [self._score(chunk)[0].cpu() for chunk in normal.split(self.batch_size)]
        self.threshold_scores_ = torch.cat(scores).numpy()
        self.set_threshold(sigma_threshold(self.threshold_scores_))
        return self

    def _score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) preprocessed images -> image scores (B,), maps (B, S, S)."""
        with torch.inference_mode():
            x = x.to(self.device_, torch.float32)
            error = (self.net_(x) - x).pow(2).mean(dim=1)
            amap = gaussian_blur(error, self.blur_sigma)
        return amap.amax(dim=(1, 2)), amap

    def predict(self, images) -> Prediction:
        """Score images: (N,) image scores and (N, S, S) anomaly maps."""
        self._check_fitted()
        size = self.preprocess_.output_size
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, size, size), np.float32)]
        with tqdm(total=len(images), desc="predict", unit="img", disable=None) as bar:
            for batch in iter_batches(images, self.preprocess_, batch_size=self.batch_size):
                image, amap = self._score(batch)
                scores.append(image.cpu().numpy())
                maps.append(amap.cpu().numpy())
                bar.update(len(batch))
        return Prediction(np.concatenate(scores), np.concatenate(maps), self.threshold_)

    def _get_state(self):
        tensors = {**module_tensors(self.net_), "threshold_scores": torch.from_numpy(self.threshold_scores_)}
        return tensors, {"train_losses": self.train_losses_}

    def _set_state(self, tensors, state) -> None:
        self._setup()
        self.net_ = _network(self.width, self.bottleneck)
        load_module_tensors(self.net_, tensors)
        self.net_.to(self.device_)
        self.threshold_scores_ = tensors["threshold_scores"].numpy()
        self.train_losses_ = list(state["train_losses"])
        self.fitted_ = True
