"""A fused detector: PatchCore and PaDiM members, their standardised scores and maps combined.

Each member's image scores and maps are standardised by its own leave-out scores on the normal
training images (z = (s - mean) / std of those scores), so scores of different scales become
comparable. The ensemble's image score is the weighted mean of the members' z-scores (weights
`score_weight`), its map the weighted mean of their standardised maps (weights `map_weight`):
a member may count for the image score and not for the map, or the other way round.

By default the members are PatchCore and PaDiM on `backbone`, with equal weights. `members` lists
others: each a method, a backbone and, for PatchCore, its `border`, with its two weights
(`anomap fit --method auto` chooses them on a validation split, `anomap.selection`).

All members hold out the same seeded training images for their leave-out scores (the first
`threshold_images` of one seeded permutation), so the ensemble's own normal scores are the
combined z-scores of those images, and its threshold is their mean + 3 sigma.

Shared backbones: members on one backbone share one encoder that extracts the union of their
layers. When scoring, each backbone runs once per batch and its members read its feature maps.
Every encoder takes images normalised for the first member's backbone and converts them to its
own network's normalisation (an exact per-channel affine map), so one preprocessed batch serves
all. When fitting, each member streams the training images through its encoder on its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..backbones import LAYERS, backbone_names
from ..encoder import Encoder, FeatureParams, resolve_device
from ..errors import AnomapError, ParamError
from ..params import THRESHOLD_IMAGES, Float, Maybe, Names, param
from .base import Detector
from .padim import PaDiM
from .patchcore import BORDERS, PatchCore

MEMBERS = {"patchcore": PatchCore, "padim": PaDiM}
MAX_MEMBERS = 16
_SHARED = ("image_size", "crop", "device", "batch_size", "seed", "weights", "threshold_images")
_WEIGHT = Float(0, 1000)


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


def weighted_mean(values: Sequence, weights: Sequence[float]):
    """Weighted mean of same-shape arrays or tensors; those of weight 0 are left out."""
    total = float(sum(weights))
    parts = [v * (w / total) for v, w in zip(values, weights) if w > 0]
    return sum(parts[1:], parts[0])


class MemberList:
    """1 to `MAX_MEMBERS` member specs: {"method": patchcore or padim, "backbone": a name or null
    (the ensemble's), "border": zeros or reflect (PatchCore only), "score_weight", "map_weight":
    numbers >= 0, 1 when left out}; some member must weigh in the scores and some in the maps.
    Returns the specs with every key filled in."""

    def describe(self) -> str:
        return (
            f"a list of 1 to {MAX_MEMBERS} members, each an object with method (patchcore or padim), "
            f"backbone (optional), border ({' or '.join(BORDERS)}, PatchCore only), score_weight and "
            "map_weight (numbers >= 0, default 1); some positive score weight and some positive map weight"
        )

    def __call__(self, value: Any) -> tuple[dict[str, Any], ...]:
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, Sequence):
            raise ValueError
        if not 1 <= len(value) <= MAX_MEMBERS:
            raise ValueError
        specs = tuple(self._member(v) for v in value)
        if not any(s["score_weight"] > 0 for s in specs) or not any(s["map_weight"] > 0 for s in specs):
            raise ValueError
        return specs

    @staticmethod
    def _member(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or value.get("method") not in MEMBERS:
            raise ValueError
        allowed = {"method", "backbone", "score_weight", "map_weight"} | (
            {"border"} if value["method"] == "patchcore" else set()
        )
        if set(value) - allowed:
            raise ValueError
        backbone = value.get("backbone")
        if backbone is not None and backbone not in backbone_names():
            raise ValueError
        spec = {"method": value["method"], "backbone": backbone}
        if value["method"] == "patchcore":
            spec["border"] = value.get("border", "zeros")
            if spec["border"] not in BORDERS:
                raise ValueError
        for weight in ("score_weight", "map_weight"):
            spec[weight] = _WEIGHT(value.get(weight, 1.0))
        return spec


def member_names(specs: Sequence[dict]) -> list[str]:
    """The members' names (their keys in a model file): the method, numbered when it repeats."""
    counts, seen, names = Counter(s["method"] for s in specs), Counter(), []
    for spec in specs:
        method = spec["method"]
        names.append(method if counts[method] == 1 else f"{method}{seen[method]}")
        seen[method] += 1
    return names


class _SharedEncoder(Encoder):
    """The encoder some members share. It takes images normalised as `preprocess` says (the first
    member's backbone) and converts them to its own network's normalisation; the features of a
    batch being scored are computed once (`hold`) and handed to every member that asks."""

    _held: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def convert_from(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Take input normalised by `mean`, `std` (x = (u - mean) / std) instead of its own."""
        own_mean, own_std = (torch.tensor(v, dtype=torch.float64) for v in (self.preprocess.mean, self.preprocess.std))
        given_mean, given_std = (torch.tensor(v, dtype=torch.float64) for v in (mean, std))
        self._scale = (given_std / own_std).float().view(1, 3, 1, 1).to(self.device)
        self._shift = ((given_mean - own_mean) / own_std).float().view(1, 3, 1, 1).to(self.device)
        self.preprocess = replace(self.preprocess, mean=tuple(mean), std=tuple(std))

    def hold(self, batch: torch.Tensor) -> None:
        self._held = (batch, self._features(batch))

    def release(self) -> None:
        self._held = None

    def features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._held is not None and self._held[0] is batch:
            return self._held[1]
        return self._features(batch)

    def _features(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if getattr(self, "_scale", None) is not None:
            batch = batch.to(self.device) * self._scale + self._shift
        return super().features(batch)


@dataclass(kw_only=True, repr=False, eq=False)
class Ensemble(Detector, FeatureParams):
    """Standardised PatchCore and PaDiM members, weighted (module docstring). `seed` seeds every
    member; `backbone` is the backbone of members that name none."""

    method = "ensemble"
    min_train_images = max(cls.min_train_images for cls in MEMBERS.values())

    layers: tuple[str, ...] | None = param(
        None, Maybe(Names(LAYERS)), "backbone layers every member uses (null: each member's own default)"
    )
    coreset_ratio: float = param(0.1, Float(0, 1, open_lo=True), "fraction of patches kept in PatchCore's memory bank")
    members: tuple[dict, ...] | None = param(
        None, Maybe(MemberList()), "the members and their weights (null: PatchCore and PaDiM on backbone, equally)"
    )
    threshold_images: int = param(
        200, THRESHOLD_IMAGES, "at most this many training images give the members' leave-out scores"
    )

    @classmethod
    def assemble(
        cls,
        members: Sequence[Detector],
        score_weights: Sequence[float] | None = None,
        map_weights: Sequence[float] | None = None,
    ) -> Ensemble:
        """The ensemble of members already fitted on the same images with the parameters an
        ensemble gives them (so a model selection fits each once), with these weights (1 each
        when left out). It takes them over: they then read features from its shared encoders.

        Raises:
            AnomapError: a member is not fitted, or its parameters differ from the ensemble's.
        """
        specs = [
            {"method": m.method, "backbone": m.backbone, "score_weight": s, "map_weight": w}
            | ({"border": m.border} if isinstance(m, PatchCore) else {})
            for m, s, w in zip(members, score_weights or [1.0] * len(members), map_weights or [1.0] * len(members))
        ]
        first, layers = members[0], {m.layers for m in members}
        coreset = next((m.coreset_ratio for m in members if isinstance(m, PatchCore)), 0.1)
        det = cls(
            **{name: getattr(first, name) for name in _SHARED},
            backbone=first.backbone,
            layers=layers.pop() if len(layers) == 1 else None,
            coreset_ratio=coreset,
            members=specs,
        )
        given = dict(zip(det._members, members))
        for name, member in given.items():
            if member.get_params() != det._members[name].get_params():
                raise AnomapError(
                    f"this {member.method} does not have the parameters an ensemble gives it: "
                    f"{member!r} instead of {det._members[name]!r}"
                )
            member._check_fitted()
        det._members = given
        det._setup()
        return det._complete_fit(det._paired_normal_scores())

    @property
    def specs(self) -> tuple[dict, ...]:
        """The members' specs (the default pair when `members` is null)."""
        default = ({"method": "patchcore"}, {"method": "padim"})
        return self.members if self.members is not None else MemberList()(default)

    def _check_params(self) -> None:
        specs = self.specs
        if self.weights not in ("imagenet", "random") and len({s["backbone"] or self.backbone for s in specs}) > 1:
            raise ParamError("a weights file fits one backbone: give members on one backbone, or imagenet weights")
        self._weights = {kind: [s[f"{kind}_weight"] for s in specs] for kind in ("score", "map")}
        self._members = {}
        for name, spec in zip(member_names(specs), specs):
            kwargs = {n: getattr(self, n) for n in _SHARED} | {"backbone": spec["backbone"] or self.backbone}
            if self.layers is not None:
                kwargs["layers"] = self.layers
            if spec["method"] == "patchcore":
                kwargs |= {"coreset_ratio": self.coreset_ratio, "border": spec["border"]}
            self._members[name] = MEMBERS[spec["method"]](**kwargs)

    def _setup(self) -> None:
        self.device_ = resolve_device(self.device)
        encoders: dict[str, _SharedEncoder] = {}
        for member in self._members.values():
            if member.backbone not in encoders:
                on_it = [m for m in self._members.values() if m.backbone == member.backbone]
                union = tuple(layer for layer in LAYERS if any(layer in m.layers for m in on_it))
                params = SimpleNamespace(**{**member.get_params(), "layers": union})
                encoders[member.backbone] = _SharedEncoder.from_params(params, self.device_)
            member.device_, member.encoder_ = self.device_, encoders[member.backbone]
        self.encoder_ = next(iter(encoders.values()))
        for encoder in encoders.values():
            encoder.convert_from(self.encoder_.preprocess.mean, self.encoder_.preprocess.std)
        self._encoders = list(encoders.values())

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
        return self._combine([torch.from_numpy(n) for n in normal], "score").numpy()

    def _combine(self, values: list[torch.Tensor], kind: str) -> torch.Tensor:
        """Members' scores or maps (kind "score" or "map"), in member order -> the weighted mean of
        their standardised values."""
        z = [standardize(v, m.normal_scores_) for v, m in zip(values, self._members.values())]
        return weighted_mean(z, self._weights[kind]).float()

    def _score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for encoder in self._encoders:  # one pass of each backbone for all its members
            encoder.hold(batch)
        try:
            results = [m._score_batch(batch) for m in self._members.values()]
        finally:
            for encoder in self._encoders:
                encoder.release()
        return self._combine([s for s, _ in results], "score"), self._combine([a for _, a in results], "map")

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
