"""Scoring at volume on Ray Data.

The images are planned in batches of `batch_size` consecutive images of the listing (the batches
a single process makes). CPU tasks read and decode each batch; an actor pool scores it, each
actor loading the model once; with pictures, CPU tasks draw heatmaps and masks from the maps;
the driver receives only (index, score, reason) rows and writes them in parts (`results`).
Every stage holds a few batches at a time, so memory does not grow with the number of images.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .._images import Preprocess, image_size, list_images, load_image
from ..detectors import load
from ..errors import AnomapError, DataError
from ..evaluation import picture_stem
from ..pictures import PICTURES, heat_range, write_pictures
from . import results
from .jpeg import JPEG_MAGIC, decode_jpegs, exif_orientation
from .runtime import connect, ray, worker_env, worker_setup

DECODERS = ("cpu", "gpu")
EXPORTED = (".onnx", ".xml")  # exported models (`anomap.export`), scored by `anomap.runtime` on CPUs
BATCHES_PER_BLOCK = 4  # planned batches per Ray Data input block


def list_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by `inputs`: files, folders (searched recursively), glob patterns
    (`**` spans folders), and `.txt` files listing one path per line (relative paths are taken
    from the list's folder). Sorted within each folder and pattern; duplicates dropped."""
    expanded: list[str | Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.suffix.lower() == ".txt" and path.is_file():
            lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
            expanded += [path.parent / line for line in lines if line]
        elif not path.exists() and any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: no file matches this pattern")
            expanded += matches
        else:
            expanded.append(path)
    return list_images(expanded)


def predict(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    batch_size: int | None = None,
    pictures: str = "none",
    skip_bad: bool = False,
    overwrite: bool = False,
    decode: str = "cpu",
    address: str | None = None,
    key: bytes | None = None,
    part_size: int = 512,
) -> results.Summary:
    """Score the images named by `inputs` (see `list_inputs`) with the model file `model` (an
    anomap model, or one exported to ONNX or OpenVINO, scored on CPUs) on Ray,
    writing `out/scores.parquet` (path, score, decision) and the per-image PNGs `pictures` asks for
    (one of `anomap.pictures.PICTURES`), drawn and named as `anomap predict` draws and names them
    (the number in a name is the image's place in the listing, unusable images included).
    Stopped runs resume: see `anomap.distributed.results`.

    Args:
        workers: scoring actors; `gpus_per_worker` GPUs and `cpus_per_worker` CPUs (and threads) each.
        batch_size: images per scoring call; default the model's `batch_size`, which makes the
            scores identical to `load(model).predict(images)` run with as many threads.
        decode: "cpu" (CPU tasks decode any image) or "gpu" (CPU tasks read JPEG files, the
            actors decode them with nvJPEG; scores then differ from "cpu" by resize rounding).
        address: the Ray cluster (see `connect`); the model and images must be readable at the
            same paths on every node, and with pictures, `out` too.
        part_size: results are written every `part_size` images (and every 30 s); a stopped
            run loses at most the images scored since.
    """
    if decode not in DECODERS or pictures not in PICTURES:
        raise AnomapError(
            f"decode must be one of {', '.join(DECODERS)} and pictures one of {', '.join(PICTURES)}; "
            f"got {decode!r} and {pictures!r}"
        )
    if workers < 1 or gpus_per_worker < 0 or cpus_per_worker < 1:
        raise AnomapError("workers and cpus_per_worker must be at least 1, gpus_per_worker at least 0")
    if Path(model).suffix.lower() in EXPORTED and gpus_per_worker:
        raise AnomapError("exported models are scored on CPUs: drop gpus_per_worker (--gpus-per-worker)")
    paths, out = list_inputs(inputs), Path(out)
    det = open_model(model, "cpu", key)  # checks the file once, before any worker starts
    batch = batch_size or det.batch_size
    run = {
        "model_sha256": _model_digest(model),
        "images": len(paths),
        "listing_sha256": results.listing_digest(paths),
        "batch_size": batch,
        "pictures": pictures,
        "decode": decode,
    }
    done = results.open_run(out, run, overwrite)
    resumed = len(done)
    starts = [s for s in range(0, len(paths), batch) if not done.issuperset(range(s, min(s + batch, len(paths))))]
    if starts:
        connect(address)
        _check_cpus(workers * cpus_per_worker)
        drawing = (
            None
            if pictures == "none"
            else {"out": out, "scale": heat_range(det.normal_scores_), "threshold": det.threshold_, "which": pictures}
        )
        ds = _pipeline(
            paths,
            starts,
            batch,
            det.preprocess_,
            str(model),
            drawing,
            workers,
            gpus_per_worker,
            cpus_per_worker,
            decode,
            key,
        )
        writer = results.PartWriter(out, done, skip_bad, rows=part_size)
        with tqdm(total=len(paths) - resumed, desc="predict", unit="img", disable=None) as bar:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                bar.update(writer.add(table))
        writer.flush()
    return results.consolidate(out, paths, det.threshold_, resumed)


def _check_cpus(scoring: int) -> None:
    """Refuse a cluster whose CPUs the scoring actors (`scoring` CPUs) would all take: reading
    tasks need one more, or nothing is ever scored."""
    total = int(ray.cluster_resources().get("CPU", 0))
    if total < scoring + 1:
        raise AnomapError(
            f"the Ray cluster has {total} CPUs; the scoring workers take {scoring} and reading "
            "images needs one more: use fewer --workers"
        )


def open_model(model: str | Path, device: str, key: bytes | None, threads: int | None = None):
    """The detector of an anomap model file, or the `anomap.runtime.ExportedModel` of an exported
    one; both have `score_batch`, `preprocess_`, `threshold_` and `batch_size`."""
    if Path(model).suffix.lower() in EXPORTED:
        from .. import runtime

        return runtime.load(model, threads=threads)
    return load(model, device=device, key=key)


def _model_digest(model: str | Path) -> str:
    """The checksum stored in an anomap model file's metadata (the file was checked by `load`), or
    the SHA-256 of an exported file."""
    if Path(model).suffix.lower() in EXPORTED:
        digest = hashlib.sha256()
        with open(model, "rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
        return digest.hexdigest()
    with safe_open(str(model), framework="pt", device="cpu") as fh:
        return fh.metadata()["sha256"]


def _pipeline(paths, starts, batch, preprocess, model, drawing, workers, gpus, cpus, decode, key):
    """The Ray Dataset of (index, file, score, reason) result rows, one output block per batch."""
    blocks = [starts[i : i + BATCHES_PER_BLOCK] for i in range(0, len(starts), BATCHES_PER_BLOCK)]
    ds = ray.data.from_arrow(
        [
            pa.table(
                {
                    "start": pa.array(block, pa.int64()),
                    "files": pa.array([b"\0".join(map(os.fsencode, paths[s : s + batch])) for s in block], pa.binary()),
                }
            )
            for block in blocks
        ]
    )
    # declaring the memory a read task needs (a worker process with torch loaded, and a batch of
    # float32 images twice) also keeps reading in CPU tasks of its own: Ray Data fuses a task stage
    # into the next actor stage when their resources match
    side = preprocess.output_size
    ds = ds.map_batches(
        read_batch,
        batch_size=1,
        fn_kwargs={"preprocess": preprocess, "raw": decode == "gpu"},
        num_cpus=1,
        memory=768 * 2**20 + 2 * 4 * 3 * side * side * batch,
    )
    ds = ds.map_batches(
        Scorer,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={
            "model": model,
            "key": key,
            "gpus": gpus,
            "threads": cpus,
            "raw": decode == "gpu",
            "maps": drawing is not None,
        },
        num_cpus=cpus,
        num_gpus=gpus or None,
        runtime_env=worker_env(cpus),
    )
    if drawing is not None:
        ds = ds.map_batches(draw, batch_size=None, fn_kwargs=drawing, num_cpus=1)
    return ds


def read_batch(batch: dict, preprocess: Preprocess, raw: bool) -> dict:
    """One planned batch (start, NUL-separated file paths) -> its usable images and, for each
    file, why it cannot be used ("" when it can). `raw`: the JPEG files' bytes instead of
    preprocessed images."""
    (start,), (blob,) = batch["start"], batch["files"]
    images, reasons = [], []
    for path in map(os.fsdecode, blob.split(b"\0")):
        try:
            images.append(_read_jpeg(path) if raw else preprocess.image(load_image(path)).numpy())
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


def _read_jpeg(path: str) -> tuple[np.ndarray, int]:
    """The bytes of a JPEG file, its header checked as `load_image` checks it, and its EXIF
    orientation."""
    image_size(path)
    data = np.fromfile(path, np.uint8)
    if data[:3].tobytes() != JPEG_MAGIC:
        raise DataError(f"{path}: not a JPEG file; decoding on the GPU reads JPEG only (use the cpu decoder)")
    return data, exif_orientation(path)


class Scorer:
    """A scoring actor: loads the model once, then scores one planned batch per call."""

    def __init__(self, model: str, key: bytes | None, gpus: float, threads: int, raw: bool, maps: bool) -> None:
        worker_setup(threads)
        self.det = open_model(model, "cuda" if gpus else "cpu", key, threads)
        self.raw, self.maps = raw, maps

    def __call__(self, batch: dict) -> dict:
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
            return torch.from_numpy(np.asarray(batch["images"][0], np.float32)).to(self.det.device_)
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
