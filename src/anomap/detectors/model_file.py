"""The model file: one safetensors file, written atomically, loaded without executing code.

Tensors hold the learned state; the JSON metadata holds the format name and version, the method,
the parameters, the non-tensor state and a SHA-256 of the tensors and of the other metadata, so a
flipped bit anywhere is detected. The checksum has no key: it catches damage, not edits, so
loading also checks every parameter against its declaration and every tensor's shape against the
parameters before a network or buffer is built.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from .._io import atomic_path
from ..errors import BackboneError, ModelFileError, ParamError, ScoreError
from ..params import declared

FORMAT = "anomap"
FORMAT_VERSION = 4  # 2: checksummed metadata; 3: zero-padded 3x3 patch averages; 4: declared parameters
REGISTRY: dict[str, Any] = {}  # method name -> detector class


def save(det, path: str | Path, key: bytes | None = None) -> Path:
    """Write a fitted detector's parameters and learned state to `path`, atomically; with a
    `key`, also an HMAC-SHA256 signature that `load(path, key=...)` verifies."""
    tensors, state = det._get_state()
    tensors = {**tensors, "normal_scores": torch.from_numpy(det.normal_scores_)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ScoreError(f"not saved: the learned {name} holds NaN or infinite values")
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "anomap_version": __version__,
        "method": det.method,
        "params": _dumps(det.get_params()),
        "state": _dumps({**state, "threshold": det.threshold_}),
    }
    if getattr(det, "selection_", None) is not None:  # how `--method auto` chose it (`anomap.selection`)
        meta["selection"] = _dumps(det.selection_)
    return write_model_file(path, tensors, meta, key)


def write_model_file(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], key: bytes | None = None
) -> Path:
    """Write tensors and metadata (str -> str) atomically, adding the `sha256` checksum and, with
    a `key`, the `signature`."""
    path = Path(path)
    digest = _digest(tensors, meta)
    meta = {**meta, "sha256": digest} | ({"signature": _sign(key, digest)} if key else {})
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


def load(path: str | Path, *, device: str | None = None, key: bytes | None = None):
    """Restore a detector saved with `Detector.save`.

    Every parameter is checked against its declaration and every stored tensor's shape against
    the parameters before a network or buffer is built, so an edited file gives one clear error.

    Args:
        path: the model file.
        device: overrides the saved `device` parameter (e.g. "cpu" for a model fitted on a GPU).
        key: when given, the file must carry a signature made with this key (see `save`).
    """
    meta, tensors = read_model_file(path)
    if key is not None and not hmac.compare_digest(meta.get("signature", ""), _sign(key, meta["sha256"])):
        raise ModelFileError(f"{path}: not signed with this key (missing or wrong signature); refusing to load it")
    params, state = (_json_object(path, meta, name) for name in ("params", "state"))
    threshold = state.pop("threshold", None)
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold)
    ):
        raise ModelFileError(f"{path}: damaged metadata (threshold {short(threshold)} is not a finite number)")
    det = _built(path, meta["method"], params if device is None else {**params, "device": device})
    _restore(path, det, tensors, state)
    if threshold is not None:
        det.set_threshold(threshold)
    if "selection" in meta:
        det.selection_ = _json_object(path, meta, "selection")
    det.fitted_ = True
    return det


def _built(path, method: str, params: dict):
    """The detector of `method` with these parameters, each checked against its declaration."""
    if method not in REGISTRY:
        raise ModelFileError(f"{path}: unknown method {short(method)}; known: {', '.join(sorted(REGISTRY))}")
    unknown = sorted(set(params) - set(declared(REGISTRY[method])))
    if unknown:
        raise ModelFileError(f"{path}: unknown parameters for method {method!r}: {short(', '.join(unknown))}")
    try:
        return REGISTRY[method](**params)
    except ParamError as err:
        raise ModelFileError(f"{path}: {err}") from None


def _restore(path, det, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Check the stored tensors and state against the parameters, then build the learned state."""
    normal = tensors.pop("normal_scores", None)
    if normal is None or normal.ndim != 1 or normal.numel() < 1 or not normal.is_floating_point():
        raise ModelFileError(f"{path}: damaged model (normal_scores must be a non-empty float vector)")
    try:
        det._check_state(tensors, state)
        det._setup()
        det._set_state(tensors, state)
    except BackboneError as err:
        raise ModelFileError(f"{path}: {err}") from None
    except (TypeError, KeyError, ValueError, IndexError) as err:
        raise ModelFileError(f"{path}: model contents do not match method {det.method!r} ({short(err)})") from None
    det.normal_scores_ = normal.float().numpy()


def _dumps(value: dict) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        raise ScoreError("not saved: the model's parameters or state hold NaN or infinite values") from None


def short(value: object, limit: int = 200) -> str:
    """repr of a value (message of an exception), cut to `limit` characters for one-line errors."""
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_object(path, meta: dict[str, str], key: str) -> dict:
    """Parse one JSON object of the metadata; deep nesting and huge numbers are damage too."""
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: damaged metadata ({key}: {short(type(err).__name__)})") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: damaged metadata ({key} must be a JSON object)")
    return value


def read_model_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Read and verify a model file: (metadata, tensors). Raises ModelFileError when damaged."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}  # copies: not backed by the file
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


def _sign(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of a file's content digest: only a holder of `key` can make it."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 over the metadata except `sha256` and `signature`, then tensor names, dtypes,
    shapes and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k not in ("sha256", "signature")}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
