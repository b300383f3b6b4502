"""Scoring with an exported model (see `anomap.export`) without torch: numpy, Pillow and
onnxruntime (or OpenVINO for `.xml` files) only. (`ExportedModel.score_batch`, which anomap's own
commands call with torch tensors, is the one place that imports torch.)

Images are decoded and resized by the same code as anomap's own (`anomap._images`), and the
result is the same `Prediction`:

    from anomap import runtime
    model = runtime.load("bottle.onnx")
    pred = model.predict(["a.png", "b.png"])   # pred.scores (N,), pred.maps (N, S, S), pred.labels
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._images import DECODE_THREADS, Preprocess, load_image
from .errors import ExportError, ModelFileError
from .prediction import Prediction

EXPORT_FORMAT = "anomap-export"
EXPORT_VERSION = 1
INPUT, OUTPUTS = "images", ("scores", "maps", "labels")
# the metadata every exported file carries (ONNX metadata_props; OpenVINO rt_info under "anomap")
METADATA = {
    "anomap_format": f'"{EXPORT_FORMAT}"',
    "format_version": "version of this layout (an integer)",
    "anomap_version": "the anomap version that exported the file",
    "method": "the detector's method name",
    "input_size": "side of the square uint8 input images, H = W (pixels)",
    "crop": "side of the centred crop the graph takes of the input, or empty for none",
    "output_size": "side S of the maps (the crop, else the input size)",
    "colour_mode": "RGB: three channels in RGB order (grayscale images repeated on every channel)",
    "resize": "square: the whole image resized to input_size x input_size with Pillow's antialiased "
    "bilinear filter, the aspect ratio not kept",
    "threshold": "the decision threshold: label 1 when score >= threshold",
    "precision": "fp32, or fp16: weights stored in float16, computed in float32",
    "batch_size": "the number of images N the graph takes at once",
    "source_sha256": "SHA-256 of the anomap model file it was exported from",
    "normal_scores": "the normal image scores the threshold was set from, as a JSON list (they also set "
    "the heatmaps' colour scale)",
    "params": "the parameters of the graph's model, as JSON: the source model's, with exact search",
}
_PREFETCH = 8  # images decoded ahead of the one being scored


@dataclass(frozen=True)
class ExportInfo:
    """The checked metadata of an exported file."""

    method: str
    input_size: int
    crop: int | None
    threshold: float
    precision: str
    batch_size: int
    source_sha256: str
    anomap_version: str
    params: dict[str, Any]
    normal_scores: np.ndarray

    @classmethod
    def parse(cls, meta: dict[str, str], path: Path) -> ExportInfo:
        """Check the metadata of `path`; ModelFileError naming what is wrong."""
        if meta.get("anomap_format") != EXPORT_FORMAT:
            raise ModelFileError(
                f"{path}: not an anomap export (no '{EXPORT_FORMAT}' metadata); export a model with `anomap export`"
            )
        if meta.get("format_version") != str(EXPORT_VERSION):
            raise ModelFileError(
                f"{path}: export format version {meta.get('format_version')!r} is not "
                f"supported (expects {EXPORT_VERSION}); export the model again"
            )
        try:
            info = cls(
                meta["method"],
                int(meta["input_size"]),
                int(meta["crop"]) if meta["crop"] else None,
                float(meta["threshold"]),
                meta["precision"],
                int(meta["batch_size"]),
                meta["source_sha256"],
                meta["anomap_version"],
                json.loads(meta["params"]),
                np.array(json.loads(meta["normal_scores"]), dtype=np.float32),
            )
            Preprocess(size=info.input_size, crop=info.crop)
        except (KeyError, ValueError, TypeError) as err:
            raise ModelFileError(f"{path}: damaged export metadata ({type(err).__name__}: {err})") from None
        if (
            not math.isfinite(info.threshold)
            or info.batch_size < 1
            or not isinstance(info.params, dict)
            or info.normal_scores.ndim != 1
            or not len(info.normal_scores)
            or not np.isfinite(info.normal_scores).all()
        ):
            raise ModelFileError(f"{path}: damaged export metadata (threshold, batch_size, params or normal_scores)")
        return info


class ExportedModel:
    """An exported model, with a detector's scoring API: `predict(images) -> Prediction`,
    `threshold_`, `normal_scores_`, `preprocess_` (the geometry of maps and masks), `method` and
    `get_params()`.

    Args:
        path: an `.onnx` file or an OpenVINO `.xml` file.
        threads: CPU threads the runtime may use (None: its default, every core).
        engine: "onnxruntime" or "openvino" (which also reads `.onnx` files); None: openvino for
            `.xml` files, else onnxruntime.
    """

    def __init__(self, path: str | Path, threads: int | None = None, engine: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such exported model file")
        engine = engine or ("openvino" if self.path.suffix.lower() == ".xml" else "onnxruntime")
        if engine not in ENGINES:
            raise ExportError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        self._run, meta, shape = ENGINES[engine](self.path, threads)
        self.info = ExportInfo.parse(meta, self.path)
        side = self.info.input_size
        if shape != (self.info.batch_size, side, side, 3):
            raise ModelFileError(
                f"{self.path}: the graph takes {shape}, not the "
                f"({self.info.batch_size}, {side}, {side}, 3) its metadata says"
            )
        self.method, self.threshold_ = self.info.method, self.info.threshold
        self.normal_scores_ = self.info.normal_scores
        self.preprocess_ = Preprocess(size=side, crop=self.info.crop)
        self._resize = Preprocess(size=side)  # the graph crops
        self.device_, self.batch_size = "cpu", max(self.info.batch_size, _PREFETCH)

    def get_params(self) -> dict[str, Any]:
        """The parameters of the model it was exported from."""
        return dict(self.info.params)

    def predict(self, images: Sequence) -> Prediction:
        """Score image paths, (H, W, 3) uint8 arrays or objects with a `.path` (e.g. `Sample`s).

        Returns:
            Prediction with (N,) scores and (N, S, S) float32 maps, at the stored threshold.

        Raises:
            DataError: an image file cannot be used.
        """
        side = self.preprocess_.output_size
        scores, maps = [np.zeros(0, np.float32)], [np.zeros((0, side, side), np.float32)]
        for pixels in self._pixel_batches(list(images)):
            s, m = self.score_pixels(pixels)
            scores.append(s)
            maps.append(m)
        return Prediction(np.concatenate(scores), np.concatenate(maps), self.threshold_)

    def score_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) images already resized to the input size -> scores (N,), maps (N, S, S).

        Raises:
            ModelFileError: the graph's own decisions disagree with the metadata's threshold (an
                edited file).
        """
        side, batch = self.info.input_size, self.info.batch_size
        if pixels.dtype != np.uint8 or pixels.shape[1:] != (side, side, 3):
            raise ValueError(
                f"expected uint8 images of shape (N, {side}, {side}, 3), got {pixels.dtype} {pixels.shape}"
            )
        scores, maps = [], []
        for start in range(0, len(pixels), batch):
            part = pixels[start : start + batch]
            padded = np.concatenate([part, np.zeros((batch - len(part), *part.shape[1:]), np.uint8)])
            s, m, labels = self._run(padded)
            if not np.array_equal(labels[: len(part)], s[: len(part)] >= self.threshold_):
                raise ModelFileError(
                    f"{self.path}: the graph decides at another threshold than its metadata's "
                    f"{self.threshold_}; export the model again"
                )
            scores.append(s[: len(part)])
            maps.append(m[: len(part)])
        return np.concatenate(scores), np.concatenate(maps)

    def score_batch(self, batch):
        """The detectors' `score_batch`, for anomap's own torch-based pipelines (`anomap predict`,
        `evaluate`, `serve`): (B, 3, S, S) float32 torch images made by `preprocess_.image` ->
        scores (B,) and maps (B, S, S) as CPU torch tensors. The images go back to the uint8 pixels
        the graph takes, exactly (the normalization is undone and rounded; outside the crop, which
        the graph drops, they are black)."""
        import torch

        shift, scale = (v.astype(np.float64) for v in self.preprocess_.normalization())
        pixels = np.rint(batch.cpu().numpy().transpose(0, 2, 3, 1) / scale + shift).clip(0, 255).astype(np.uint8)
        if self.info.crop is not None:
            side = self.info.input_size
            left, top, right, bottom = self.preprocess_.crop_box(side, side)
            canvas = np.zeros((len(pixels), side, side, 3), np.uint8)
            canvas[:, top:bottom, left:right] = pixels
            pixels = canvas
        scores, maps = self.score_pixels(pixels)
        return torch.from_numpy(scores), torch.from_numpy(maps)

    def _pixels(self, item) -> np.ndarray:
        image = item if isinstance(item, np.ndarray) else load_image(getattr(item, "path", item))
        return self._resize.pixels(image)

    def _pixel_batches(self, items: list) -> Iterator[np.ndarray]:
        """(B, H, W, 3) uint8 batches of `_PREFETCH` images, the next one decoded while one is scored."""
        chunks = [items[i : i + _PREFETCH] for i in range(0, len(items), _PREFETCH)]
        pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="anomap-runtime")
        try:
            submit = lambda k: [pool.submit(self._pixels, x) for x in chunks[k]] if k < len(chunks) else []  # noqa: E731
            pending = submit(0)
            for k in range(len(chunks)):
                current, pending = pending, submit(k + 1)
                yield np.stack([f.result() for f in current])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def load(path: str | Path, threads: int | None = None, engine: str | None = None) -> ExportedModel:
    """Open an exported model (see `ExportedModel`).

    Raises:
        ModelFileError: the file is missing, damaged, not an anomap export, or of another version.
        ExportError: the runtime it needs is not installed.
    """
    return ExportedModel(path, threads, engine)


Runner = Callable[[np.ndarray], list[np.ndarray]]


def _onnxruntime(path: Path, threads: int | None) -> tuple[Runner, dict[str, str], tuple]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("running .onnx models needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for damaged files
        raise ModelFileError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    inputs = session.get_inputs()
    shape = tuple(inputs[0].shape) if len(inputs) == 1 and inputs[0].name == INPUT else ()
    run = lambda x: session.run(list(OUTPUTS), {INPUT: x})  # noqa: E731
    return run, dict(session.get_modelmeta().custom_metadata_map), shape


def _openvino(path: Path, threads: int | None) -> tuple[Runner, dict[str, str], tuple]:
    try:
        import openvino as ov
    except ImportError:
        raise ExportError("running OpenVINO .xml models needs openvino: pip install openvino") from None
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        section = "framework" if path.suffix.lower() == ".onnx" else "anomap"  # where OpenVINO keeps it
        meta = {k: model.get_rt_info([section, k]).astype(str) for k in METADATA if model.has_rt_info([section, k])}
        config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
        compiled = core.compile_model(model, "CPU", config)
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for damaged files
        raise ModelFileError(f"{path}: not a readable OpenVINO model ({_first_line(err)})") from None
    inputs = compiled.inputs
    shape = tuple(inputs[0].get_partial_shape().to_shape()) if len(inputs) == 1 else ()
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        results = request.infer({0: x})
        return [results[compiled.output(name)] for name in OUTPUTS]

    return run, meta, shape


ENGINES = {"onnxruntime": _onnxruntime, "openvino": _openvino}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:300]
