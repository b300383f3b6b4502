"""Shared pieces of the detectors that train a network on normal images: seeded model creation,
the optimisation parameters, the reconstruction training loop, the held-out threshold split,
feature caching, and networks rebuilt from a model file only after their shapes are checked."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..params import HOLDOUT, LEARNING_RATE, param

log = logging.getLogger(__name__)

# (batch on the device, generator) -> network input, which is also the reconstruction target
Prepare = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def seeded_module(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call `build()` with the CPU random state seeded by `seed`, leaving the global state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def train_autoencoder(
    model: nn.Module,
    data: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int,
    prepare: Prepare | None = None,
    desc: str = "train",
) -> list[float]:
    """Train `model` to reproduce its input (MSE, Adam), in place.

    Args:
        model: maps a (B, ...) batch to a tensor of the same shape.
        data: (N, ...) training samples on the CPU, any float dtype (cast to float32 per batch).
        epochs, lr, batch_size: the optimisation; each epoch visits every sample once, shuffled.
        device: where the model and the batches go.
        seed: seeds the shuffling and `prepare`'s generator.
        prepare: optional per-batch transform (standardisation, augmentation).

    Returns:
        The mean training loss of each epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with tqdm(range(epochs), desc=desc, unit="epoch", disable=None) as bar:
        for _ in bar:
            total = 0.0
            for idx in torch.randperm(len(data), generator=gen).split(batch_size):
                x = data[idx].to(device, torch.float32)
                if prepare is not None:
                    x = prepare(x, gen)
                loss = F.mse_loss(model(x), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(data))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    model.eval()
    log.info("%s: loss %.4g after the first epoch, %.4g after the last", desc, losses[0], losses[-1])
    return losses


@dataclass(kw_only=True, repr=False, eq=False)
class TrainingParams:
    """The optimisation parameters shared by the detectors that train a network."""

    lr: float = param(1e-3, LEARNING_RATE, "Adam learning rate")
    holdout: float = param(0.15, HOLDOUT, "fraction of the training images held out for the threshold")

    def _train_net(self, data: torch.Tensor, prepare: Prepare | None, desc: str) -> None:
        """Train `net_` on `data` (N, ...) with this detector's epochs, lr, batch size, device and
        seed (`train_autoencoder`); the losses per epoch go to `train_losses_`."""
        self.train_losses_ = train_autoencoder(
            self.net_,
            data,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            device=self.device_,
            seed=self.seed,
            prepare=prepare,
            desc=desc,
        )


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of n training images into (fit indices, held-out indices), both sorted.

    round(n * fraction) images are held out when that leaves at least 2 on each side; otherwise
    nothing is held out (and the caller sets the threshold on training scores).
    """
    held = round(n * fraction)
    if held < 2 or n - held < 2:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def normal_scores(
    score: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    fit_idx: torch.Tensor,
    held_idx: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Image scores `score(batch)` of the held-out samples of (N, ...) `data`, or of the fit
    samples when none is held out: the normal scores the threshold is set from."""
    normal = data[held_idx] if len(held_idx) else data[fit_idx]
    with torch.inference_mode():
        return torch.cat([score(chunk.to(device)).cpu() for chunk in normal.split(batch_size)]).numpy()


def cache_features(batches, embed: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """Concatenate `embed(features)` over a stream of feature batches, kept on the CPU as float16."""
    return torch.cat([embed(feats).to("cpu", torch.float16) for feats in batches])


def channel_stats(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over `dims` in float32; the deviation floored at 1e-6."""
    x = x.float()
    return x.mean(dim=tuple(dims)), x.std(dim=tuple(dims)).clamp_min(1e-6)


def module_tensors(model: nn.Module, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """A module's state dict with prefixed names, for the model file."""
    return {prefix + k: v for k, v in model.state_dict().items()}


def load_network(
    build: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], device: torch.device, prefix: str = "net."
) -> nn.Module:
    """Build a network from stored tensors: first on the meta device, where the names and shapes
    are checked without allocating anything, then on `device`. Raises ValueError on a mismatch."""
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if given.keys() != expected.keys():
        raise ValueError(f"network tensors {sorted(given)[:4]} do not match the expected {sorted(expected)[:4]}")
    for name, value in expected.items():
        if given[name].shape != value.shape:
            raise ValueError(f"{prefix}{name} has shape {tuple(given[name].shape)}, expected {tuple(value.shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(given)
    return model.eval()


def losses(state: dict) -> list[float]:
    """The stored per-epoch training losses: a list of finite numbers; else ValueError."""
    values = state.get("train_losses")
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values
    ):
        raise ValueError("train_losses must be a list of finite numbers")
    return [float(v) for v in values]
