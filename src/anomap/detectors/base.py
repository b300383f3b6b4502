"""The detector contract and the model file format.

A detector stores its keyword-only parameters in `__init__`, learns in `fit(images) -> self` and
scores in `predict(images) -> Prediction` (higher = more anomalous). Learned state ends in `_`.

Model file: one safetensors file. Tensors hold the learned state; its JSON metadata holds the
format name and version, the method, the parameters, the non-tensor state and a SHA-256 of the
tensors and of the other metadata, so a flipped bit anywhere is detected. Loading parses JSON and
raw tensors only, so it never executes code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from .._io import atomic_path
from ..errors import AnomapError, ModelFileError, ScoreError

FORMAT = "anomap"
FORMAT_VERSION = 3  # 2: the checksum also covers the metadata; 3: zero-padded 3x3 patch averages
REGISTRY: dict[str, type[Detector]] = {}


@dataclass(frozen=True)
class Prediction:
    """What `predict` returns.

    Attributes:
        scores: (N,) image anomaly scores, higher = more anomalous.
        maps: (N, S, S) float32 pixel anomaly maps at the preprocessed input size.
        threshold: the detector's decision threshold, or None when it has none.
    """

    scores: np.ndarray
    maps: np.ndarray
    threshold: float | None = None

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) int decisions, 1 = anomalous (score >= threshold); None without a threshold."""
        return None if self.threshold is None else (self.scores >= self.threshold).astype(int)


class Detector:
    """Base of every detector: parameters, threshold, saving. Subclasses set `method` and implement
    `fit`, `predict`, `_get_state` and `_set_state`."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            REGISTRY[cls.method] = cls

    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword arguments, as stored on the instance."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def threshold_(self) -> float | None:
        """Decision threshold on image scores (score >= threshold is anomalous), if one is set."""
        return getattr(self, "_threshold", None)

    def set_threshold(self, value: float) -> None:
        """Replace the decision threshold, e.g. with one calibrated on a validation split."""
        if not np.isfinite(value):
            raise ScoreError(f"threshold must be finite, got {value}")
        self._threshold = float(value)

    @property
    def preprocess_(self):
        """The preprocessing of the fitted model (`anomap.data.Preprocess`); detectors built on a
        backbone have it from their `encoder_`."""
        return self.encoder_.preprocess

    def fit(self, images) -> Detector:  # pragma: no cover - contract
        raise NotImplementedError

    def predict(self, images) -> Prediction:  # pragma: no cover - contract
        raise NotImplementedError

    def _get_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def _set_state(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise AnomapError(f"this {type(self).__name__} is not fitted yet: call fit(images) first")

    def save(self, path: str | Path) -> Path:
        """Write the fitted detector to one file (atomically). Returns the path."""
        self._check_fitted()
        tensors, state = self._get_state()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        state = {**state, "threshold": self.threshold_}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "anomap_version": __version__,
            "method": self.method,
            "params": json.dumps(self.get_params()),
            "state": json.dumps(state),
        }
        return write_model_file(path, tensors, meta)


def write_model_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write tensors and metadata (str -> str) atomically, adding the `sha256` checksum."""
    path = Path(path)
    meta = {**meta, "sha256": _digest(tensors, meta)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_header(tmp)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors header with sorted keys, so the same model gives the same bytes
    (safetensors writes the metadata map in arbitrary order). Same length, rewritten in place."""
    with open(path, "rb+") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(size)
        header = json.dumps(json.loads(raw), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        header = header.encode().ljust(size)  # safetensors pads the header with spaces
        if len(header) != size:  # pragma: no cover - only if the two JSON writers escaped differently
            raise ModelFileError(f"{path}: cannot normalise the model file header")
        fh.seek(8)
        fh.write(header)


def load(path: str | Path, *, device: str | None = None) -> Detector:
    """Restore a detector saved with `Detector.save`.

    Args:
        path: the model file.
        device: overrides the saved `device` parameter (e.g. "cpu" for a model fitted on a GPU).
    """
    meta, tensors = read_model_file(path)
    method = meta["method"]
    if method not in REGISTRY:
        raise ModelFileError(f"{path}: unknown method {method!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        params = json.loads(meta["params"])
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: damaged metadata ({err})") from None
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise ModelFileError(f"{path}: damaged metadata (params and state must be JSON objects)")
    threshold = state.get("threshold")
    if threshold is not None and (not isinstance(threshold, (int, float)) or not np.isfinite(threshold)):
        raise ModelFileError(f"{path}: damaged metadata (threshold {threshold!r} is not a finite number)")
    if device is not None:
        params["device"] = device
    try:
        det = REGISTRY[method](**params)
        det._set_state(tensors, state)
    except (TypeError, KeyError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: model contents do not match method {method!r} ({err})") from None
    if threshold is not None:
        det.set_threshold(threshold)
    return det


def read_model_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read and verify a model file: (metadata, tensors). Raises ModelFileError when damaged."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path}: not a readable anomap model file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an anomap model file (no '{FORMAT}' format tag)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path}: model format version {meta.get('format_version')!r} is not supported by "
            f"anomap {__version__} (expects {FORMAT_VERSION}); refit the model with this version"
        )
    if meta.get("sha256") != _digest(tensors, meta):
        raise ModelFileError(f"{path}: checksum mismatch, the file is damaged; refit or restore it")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values; refit the model")
    return meta, tensors


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over the metadata except `sha256`, then tensor names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
