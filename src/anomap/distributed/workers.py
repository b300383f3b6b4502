"""What the Ray workers of a distributed prediction run: reading a planned batch of images (CPU
tasks), scoring it (actors that load the model once), drawing its pictures (CPU tasks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .._images import Preprocess, load_image
from ..detectors import load
from ..errors import AnomapError, DataError
from ..evaluation import picture_stem
from ..pictures import write_pictures
from .jpeg import decode_jpegs, read_jpeg
from .runtime import thread_stream, worker_setup

EXPORTED = (".onnx", ".xml")  # exported models (`anomap.export`), scored by `anomap.runtime` on CPUs


def open_model(model: str | Path, device: str, key: bytes | None, threads: int | None = None):
    """The detector of an anomap model file, or the `anomap.runtime.ExportedModel` of an exported
    one; both have `score_batch`, `preprocess_`, `threshold_` and `batch_size`."""
    if Path(model).suffix.lower() in EXPORTED:
        from .. import runtime

        if key is not None:
            raise AnomapError(f"{model}: exported files carry no signature; --key applies to model files")
        return runtime.load(model, threads=threads)
    return load(model, device=device, key=key)


def read_batch(batch: dict, preprocess: Preprocess, raw: bool) -> dict:
    """One planned batch (start, NUL-separated file paths) -> its usable images and, for each
    file, why it cannot be used ("" when it can). `raw`: the JPEG files' bytes instead of
    preprocessed images."""
    (start,), (blob,) = batch["start"], batch["files"]
    images, reasons = [], []
    for path in map(os.fsdecode, blob.split(b"\0")):
        try:
            images.append(read_jpeg(path) if raw else preprocess.image(load_image(path)).numpy())
            reasons.append("")
        except DataError as err:
            reasons.append(str(err))
    row = {"start": np.array([start]), "files": np.array([blob], object), "reasons": np.array([json.dumps(reasons)])}
    side = preprocess.output_size
    if raw:
        row["data"] = _ragged(np.concatenate([data for data, _ in images] or [np.zeros(0, np.uint8)]))
        row["sizes"] = _ragged(np.array([len(data) for data, _ in images], np.int64))
        row["orientations"] = _ragged(np.array([o for _, o in images], np.int64))
    else:
        row["images"] = _ragged(np.stack(images) if images else np.zeros((0, 3, side, side), np.float32))
    return row


def _ragged(array: np.ndarray) -> np.ndarray:
    """A one-row column holding `array`, whose shape may differ from row to row."""
    column = np.empty(1, object)
    column[0] = array
    return column


class Scorer:
    """A scoring actor: loads the model once, then scores one planned batch per call (on a GPU,
    `scoring.GPU_CALLS` calls at once, from as many threads)."""

    def __init__(self, model: str, key: bytes | None, gpus: float, threads: int, raw: bool, maps: bool) -> None:
        worker_setup(threads)
        self.det = open_model(model, "cuda" if gpus else "cpu", key, threads)
        self.raw, self.maps = raw, maps

    def __call__(self, batch: dict) -> dict:
        with thread_stream(self.det.device_):
            return self._score(batch)

    def _score(self, batch: dict) -> dict:
        files = batch["files"][0].split(b"\0")
        reasons = json.loads(batch["reasons"][0])
        images = self._images(batch, files, reasons) if not all(reasons) else None
        ok = np.array([not r for r in reasons], dtype=bool)
        side = self.det.preprocess_.output_size
        scores = np.full(len(files), np.nan, np.float32)
        maps = np.zeros((len(files), side, side), np.float32) if self.maps else None
        if ok.any():
            score, amap = self.det.score_batch(images)
            scores[ok] = score.float().cpu().numpy()
            if maps is not None:
                maps[ok] = amap.float().cpu().numpy()
        row = {
            "index": int(batch["start"][0]) + np.arange(len(files)),
            "file": np.array(files, object),
            "score": scores,
            "reason": np.array(reasons, object),
        }
        return row if maps is None else row | {"map": maps}

    def _images(self, batch: dict, files: list[bytes], reasons: list[str]) -> torch.Tensor:
        """The batch's usable images, preprocessed, on the detector's device. A file the device
        cannot decode gets its reason in `reasons`."""
        if not self.raw:
            # a writable copy: the batch is a read-only view of Ray's object store
            return torch.from_numpy(np.array(batch["images"][0], np.float32)).to(self.det.device_)
        data, sizes, turns = batch["data"][0], batch["sizes"][0], batch["orientations"][0]
        try:
            return decode_jpegs(data, sizes, turns, self.det.preprocess_, self.det.device_)
        except RuntimeError:  # a damaged file fails the whole batch: decode one at a time
            images, chunks = [], np.split(data, np.cumsum(sizes)[:-1])
            for k, i in enumerate(i for i, r in enumerate(reasons) if not r):
                try:
                    images.append(
                        decode_jpegs(
                            chunks[k], sizes[k : k + 1], turns[k : k + 1], self.det.preprocess_, self.det.device_
                        )
                    )
                except RuntimeError as err:
                    reasons[i] = f"{os.fsdecode(files[i])}: the JPEG data is damaged ({_one_line(err)})"
            return torch.cat(images) if images else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def draw(batch: dict, out: Path, scale: tuple[float, float], threshold: float | None, which: str) -> dict:
    """Write each usable image's pictures into `out` (before its row reaches a part, so a result in
    a part always has its pictures); returns the rows without their maps."""
    for index, file, reason, amap in zip(batch["index"], batch["file"], batch["reason"], batch["map"]):
        if not reason:
            path = os.fsdecode(file)
            write_pictures(out, picture_stem(int(index), path), load_image(path), amap, scale, threshold, which)
    return {k: v for k, v in batch.items() if k != "map"}
