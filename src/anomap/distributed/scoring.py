"""Scoring at volume on Ray Data.

The images are planned in batches of `batch_size` consecutive images of the listing (the batches
a single process makes). CPU tasks read and decode each batch; an actor pool scores it, each
actor loading the model once; with pictures, CPU tasks draw heatmaps and masks from the maps
(`workers`); the driver receives only (index, score, reason) rows and writes them in parts (`results`).
Every stage holds a few batches at a time, so memory does not grow with the number of images.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
from safetensors import safe_open
from tqdm.auto import tqdm

from .._images import list_images
from ..errors import AnomapError, DataError
from ..pictures import PICTURES, heat_range
from . import results
from .runtime import connect, ray, worker_env
from .workers import EXPORTED, Scorer, draw, open_model, read_batch

DECODERS = ("cpu", "gpu")
BATCHES_PER_BLOCK = 4  # planned batches per Ray Data input block
GPU_CALLS = 2  # batches a GPU actor scores at once, each on its own CUDA stream


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
    calls = GPU_CALLS if gpus else 1
    ds = ds.map_batches(
        Scorer,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            size=workers, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1
        ),
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
