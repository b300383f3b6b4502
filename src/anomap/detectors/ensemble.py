"""A fused detector: PatchCore and PaDiM on one backbone, their scores and maps combined.

Each member's image scores and maps are standardised by its own leave-out scores on the normal
training images (z = (s - mean) / std of those scores), so scores of different scales become
comparable; the ensemble's image score is the mean of the members' z-scores, its map the mean of
their standardised maps. PatchCore's distances to the nearest normal patch catch local
defects; PaDiM's per-position Gaussians rank whole textures better on some sets.

Both members hold out the same seeded training images for their leave-out scores (the first
`threshold_images` of one seeded permutation), so the ensemble's own normal scores are the
combined z-scores of those images, and its threshold is their mean + 3 sigma.

One backbone: the members share one encoder that extracts the union of their layers. When
scoring, the backbone runs once per batch and both members read its feature maps; when fitting,
each member streams the training images through that encoder on its own (PaDiM twice: fit and
leave-out), because a member's fit takes images, not feature maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ..backbones import LAYERS
from ..encoder import Encoder, FeatureParams, resolve_device
from ..errors import AnomapError
from ..params import THRESHOLD_IMAGES, Float, Maybe, Names, param
from .base import Detector
from .padim import PaDiM
from .patchcore import PatchCore

MEMBERS = {"patchcore": PatchCore, "padim": PaDiM}
_SHARED = ("image_size", "crop", "device", "batch_size", "seed", "backbone", "weights", "threshold_images")


def standardize(values: torch.Tensor | np.ndarray, normal: np.ndarray) -> torch.Tensor | np.ndarray:
    """(values - mean) / std of a member's (m,) normal scores (sample std, m >= 2); values of any
    shape, a tensor or an array.

    Raises:
        AnomapError: the normal scores have no spread, so there is no scale to divide by.
    """
    normal = np.asarray(normal, dtype=np.float64)
    mean, std = normal.mean(), normal.std(ddof=1)
    if not std > 0:
        raise AnomapError(
            "an ensemble member's normal scores are all equal: no scale to standardise by; "
            "fit on more varied normal images"
        )
    return (values - float(mean)) / float(std)


class _SharedEncoder(Encoder):
    """The encoder the members share: features of a batch being scored are computed once
    (`hold`) and handed to every member that asks for that same batch."""

    _held: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def hold(self, batch: torch.Tensor) -> None:
        self._held = (batch, super().features(batch))

    def release(self) -> None:
        self._held = None

    def features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._held is not None and self._held[0] is batch:
            return self._held[1]
        return super().features(batch)


@dataclass(kw_only=True, repr=False, eq=False)
class Ensemble(Detector, FeatureParams):
    """PatchCore + PaDiM on one backbone, combined by standardised scores (module docstring).
    `seed` seeds both members."""

    method = "ensemble"
    min_train_images = max(cls.min_train_images for cls in MEMBERS.values())

    layers: tuple[str, ...] | None = param(
        None, Maybe(Names(LAYERS)), "backbone layers every member uses (null: each member's own default)"
    )
    coreset_ratio: float = param(0.1, Float(0, 1, open_lo=True), "fraction of patches kept in PatchCore's memory bank")
    threshold_images: int = param(
        200, THRESHOLD_IMAGES, "at most this many training images give the members' leave-out scores"
    )

    @classmethod
    def assemble(cls, patchcore: PatchCore, padim: PaDiM) -> Ensemble:
        """The ensemble of two members already fitted on the same images, with the parameters an
        ensemble gives its members (so a model selection can fit them once for all three). The
        ensemble takes them over: they then read features from its shared encoder.

        Raises:
            AnomapError: a member is not fitted, or its parameters differ from the ensemble's.
        """
        layers = patchcore.layers if patchcore.layers == padim.layers else None
        det = cls(
            **{name: getattr(patchcore, name) for name in _SHARED}, layers=layers, coreset_ratio=patchcore.coreset_ratio
        )
        given = {"patchcore": patchcore, "padim": padim}
        for name, member in given.items():
            if member.get_params() != det._members[name].get_params():
                raise AnomapError(
                    f"this {name} does not have the parameters an ensemble gives it: "
                    f"{member!r} instead of {det._members[name]!r}"
                )
            member._check_fitted()
        det._members = given
        det._setup()
        return det._complete_fit(det._paired_normal_scores())

    def _check_params(self) -> None:
        shared = {name: getattr(self, name) for name in _SHARED}
        if self.layers is not None:
            shared["layers"] = self.layers
        self._members = {"patchcore": PatchCore(**shared, coreset_ratio=self.coreset_ratio), "padim": PaDiM(**shared)}

    def _setup(self) -> None:
        self.device_ = resolve_device(self.device)
        union = tuple(layer for layer in LAYERS if any(layer in m.layers for m in self._members.values()))
        self.encoder_ = _SharedEncoder.from_params(
            SimpleNamespace(**{**self.get_params(), "layers": union}), self.device_
        )
        for member in self._members.values():
            member.device_, member.encoder_ = self.device_, self.encoder_

    def _fit(self, images) -> np.ndarray:
        """Fit each member on the normal images; return the combined z-scores of their leave-out scores."""
        for member in self._members.values():
            member._complete_fit(member._fit(images))
        return self._paired_normal_scores()

    def _paired_normal_scores(self) -> np.ndarray:
        """(m,) combined z-scores of the members' leave-out scores of the same m training images."""
        normal = [m.normal_scores_ for m in self._members.values()]
        if len({len(n) for n in normal}) != 1:
            raise AnomapError(
                f"the ensemble members scored different numbers of held-out images "
                f"({', '.join(str(len(n)) for n in normal)}); their scores cannot be paired"
            )
        return self._combine([torch.from_numpy(n) for n in normal]).numpy()

    def _combine(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Members' scores or maps, in member order -> mean of their standardised values."""
        z = [standardize(v, m.normal_scores_) for v, m in zip(values, self._members.values())]
        return torch.stack(z).mean(0)

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoder_.hold(batch)  # one backbone pass for both members
        try:
            results = [m._score_batch(batch) for m in self._members.values()]
        finally:
            self.encoder_.release()
        return self._combine([s for s, _ in results]), self._combine([a for _, a in results])

    def _get_state(self):
        tensors, state = {}, {}
        for name, member in self._members.items():
            member_tensors, state[name] = member._get_state()
            member_tensors["normal_scores"] = torch.from_numpy(member.normal_scores_)
            tensors.update({f"{name}.{key}": t for key, t in member_tensors.items()})
        return tensors, state

    def _split(self, tensors, state, name: str):
        """The stored tensors (prefix removed) and state of member `name`."""
        prefix = f"{name}."
        own = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
        member_state = state.get(name)
        if not isinstance(member_state, dict):
            raise ValueError(f"the state of member {name} is missing")
        return own, member_state

    def _check_state(self, tensors, state) -> None:
        for name, member in self._members.items():
            own, member_state = self._split(tensors, state, name)
            normal = own.pop("normal_scores", None)
            if normal is None or normal.ndim != 1 or normal.numel() < 2 or not normal.is_floating_point():
                raise ValueError(f"{name}.normal_scores must be a float vector of at least 2 scores")
            member._check_state(own, member_state)

    def _set_state(self, tensors, state) -> None:
        for name, member in self._members.items():
            own, member_state = self._split(tensors, state, name)
            member.normal_scores_ = own.pop("normal_scores").float().numpy()
            member._set_state(own, member_state)
            member.fitted_ = True
