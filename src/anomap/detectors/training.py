"""Shared pieces of the detectors that train a network on normal images: seeded model creation,
the reconstruction training loop, the held-out threshold split, feature caching, state checks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AnomapError

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
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise AnomapError(f"training needs epochs >= 1, lr > 0 and batch_size >= 1; got {epochs}, {lr}, {batch_size}")
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


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of n training images into (fit indices, held-out indices), both sorted.

    round(n * fraction) images are held out when that leaves at least 2 on each side; otherwise
    nothing is held out (and the caller sets the threshold on training scores).
    """
    if not 0 <= fraction < 1:
        raise AnomapError(f"holdout must be in [0, 1), got {fraction}")
    held = round(n * fraction)
    if held < 2 or n - held < 2:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[held:].sort().values, order[:held].sort().values


def cache_features(batches, embed: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """Concatenate `embed(features)` over an `Encoder.batches` stream, kept on the CPU as float16."""
    return torch.cat([embed(feats).to("cpu", torch.float16) for feats in batches])


def channel_stats(x: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over `dims` in float32; the deviation floored at 1e-6."""
    x = x.float()
    return x.mean(dim=tuple(dims)), x.std(dim=tuple(dims)).clamp_min(1e-6)


def module_tensors(model: nn.Module, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """A module's state dict with prefixed names, for the model file."""
    return {prefix + k: v for k, v in model.state_dict().items()}


def load_module_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "net.") -> None:
    """Load the prefixed tensors into `model`. Raises ValueError on missing names or other shapes."""
    expected = model.state_dict()
    given = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if given.keys() != expected.keys():
        raise ValueError(f"network tensors {sorted(given)} do not match the expected {sorted(expected)}")
    for name, value in expected.items():
        if given[name].shape != value.shape:
            raise ValueError(f"{prefix}{name} has shape {tuple(given[name].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict(given)
    model.eval()


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return `tensor` if it has `shape`, else raise ValueError naming it."""
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor
