"""Detectors by method name. Importing this package registers every method."""

from __future__ import annotations

from typing import Any

from ..errors import AnomapError
from .base import REGISTRY, Detector, Prediction, load
from .conv_ae import ConvAE
from .dfr import DFR
from .ensemble import Ensemble
from .global_ae import GlobalAE
from .global_knn import GlobalKNN
from .padim import PaDiM
from .patchcore import PatchCore
from .psfe import PSFE


def create(method: str, **params: Any) -> Detector:
    """Build a detector by method name with the given parameters (defaults for the rest)."""
    if method not in REGISTRY:
        raise AnomapError(f"unknown method {method!r}; choose from {', '.join(methods())}")
    try:
        return REGISTRY[method](**params)
    except TypeError as err:
        raise AnomapError(f"bad parameter for method {method!r}: {err}") from None


def methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(REGISTRY)


__all__ = [
    "ConvAE",
    "DFR",
    "Detector",
    "Ensemble",
    "GlobalAE",
    "GlobalKNN",
    "PSFE",
    "PaDiM",
    "PatchCore",
    "Prediction",
    "create",
    "load",
    "methods",
]
