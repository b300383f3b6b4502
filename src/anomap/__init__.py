"""anomap: unsupervised visual anomaly detection and localization for industrial images.

Public API: the detectors (`PatchCore`, ...), `create(method, **params)`, `load(path)`, `methods()`;
data sets in `anomap.data`, metrics in `anomap.metrics`. Detectors are imported on first use, so
`import anomap.metrics` stays light. `__version__` is the installed package's version, read
from its metadata (the one place it is written is pyproject.toml).
"""

from importlib import import_module

_FROM_DETECTORS = (
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
)
__all__ = ["AnomapError", *_FROM_DETECTORS]


def __getattr__(name: str):
    if name in _FROM_DETECTORS:
        return getattr(import_module(".detectors", __name__), name)
    if name == "AnomapError":
        return import_module(".errors", __name__).AnomapError
    if name == "__version__":
        return import_module("importlib.metadata").version(__name__)
    raise AttributeError(f"module 'anomap' has no attribute {name!r}")
