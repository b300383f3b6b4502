"""Fitting PatchCore at volume on Ray.

PatchCore already fits large sets blockwise: consecutive training images form coreset blocks of
at most `coreset_chunk` patches, each reduced by its own greedy coreset, and the bank is the union
of the picks. Here each block is a shard for a worker, which extracts its images' features and
runs the block's coreset; the driver joins the picks in block order into the bank and sets the
threshold from the held-out images' patches, which the workers send back. The driver holds the
bank, the held images' patches (at most `threshold_images` images) and one block's picks in
transit, whatever the number of training images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data import MVTecAD, Sample
from ..detectors import PatchCore
from ..errors import AnomapError
from ..protocol import split_category
from .runtime import connect, ray, worker_env, worker_setup


class BlockWorker:
    """A worker process holding one PatchCore (parameters only) and its backbone."""

    def __init__(self, params: dict, threads: int) -> None:
        worker_setup(threads)
        self.det = PatchCore(**params)
        self.det._setup()

    def block(self, start: int, paths: list[str], held: list[int]):
        """Training images start .. start + len(paths) - 1 -> the block's bank entries (n, D)
        float16, their image indices (n,), and the (len(held), P, D) float16 patches of the
        `held` images among them, as numpy arrays."""
        det = self.det
        patches = torch.cat(
            [
                det._embed(f).to(torch.float16).flatten(1, 2)
                for f in det._feature_batches(paths, f"block at image {start}")
            ]
        )
        bank, source = det.block_bank(patches, start)
        mine = patches[torch.tensor(held, dtype=torch.long, device=patches.device) - start]
        return bank.cpu().numpy(), source.cpu().numpy(), mine.cpu().numpy()


def fit(
    images: Sequence[Sample | str | Path],
    *,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: int = 1,
    address: str | None = None,
    **params,
) -> PatchCore:
    """Fit `PatchCore(**params)` on image files (paths or Samples), one coreset block per task.

    The bank, normal scores and threshold equal those of `PatchCore(**params).fit(images)` run in
    one process with as many threads as a worker has (`cpus_per_worker`, for torch and numba
    alike), as long as the backbone's results for an image do not depend on the other images of
    its batch (they did not on the CPU measured; a GPU may pick other kernels for other batch
    sizes). Workers take `gpus_per_worker` GPUs each; the driver sets the threshold on the
    `device` parameter's device.
    """
    if workers < 1 or gpus_per_worker < 0 or cpus_per_worker < 1:
        raise AnomapError("workers and cpus_per_worker must be at least 1, gpus_per_worker at least 0")
    if not all(isinstance(s, (Sample, str, os.PathLike)) for s in images):
        raise AnomapError("distributed.fit takes image files (paths or Samples), which every worker reads")
    paths = [str(s.path if isinstance(s, Sample) else s) for s in images]
    det = PatchCore(**params)
    if len(paths) < det.min_train_images:
        raise AnomapError(f"patchcore needs at least {det.min_train_images} training images, got {len(paths)}")
    det._setup()
    det.grid_ = _grid(det)
    rows = det.block_images(det.grid_[0] * det.grid_[1], len(paths))
    held = det.held_images(len(paths))
    shards = [
        (start, paths[start : start + rows], [i for i in held.tolist() if start <= i < start + rows])
        for start in range(0, len(paths), rows)
    ]
    connect(address)
    worker = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, runtime_env=worker_env(cpus_per_worker))(
        BlockWorker
    )
    device = "cuda" if gpus_per_worker else "cpu"
    actors = [
        worker.remote(det.get_params() | {"device": device}, cpus_per_worker) for _ in range(min(workers, len(shards)))
    ]
    picks, sources, held_patches = [], [], []
    try:
        blocks = ray.util.ActorPool(actors).map(lambda a, shard: a.block.remote(*shard), shards)  # in order
        for bank, source, mine in blocks:
            picks.append(torch.tensor(bank, device=det.device_))
            sources.append(torch.tensor(source, device=det.device_))
            held_patches.append(torch.tensor(mine, device=det.device_))
    finally:
        for actor in actors:
            ray.kill(actor)
    picks, sources, held_patches = torch.cat(picks), torch.cat(sources), torch.cat(held_patches)  # frees the parts
    scores = det.finish_bank(picks, sources, held_patches, held)
    return det._complete_fit(scores)


def _grid(det: PatchCore) -> tuple[int, int]:
    """The (h, w) patch grid of the detector's input size."""
    side = det.preprocess_.output_size
    with torch.inference_mode():
        feats = det.encoder_.features(torch.zeros(1, 3, side, side, device=det.device_))
        return tuple(det._embed(feats).shape[1:3])


def fit_category(root: str | Path, category: str, split_seed: int | None = None, **options) -> PatchCore:
    """`fit` on `<root>/<category>/train/good`, or on the train part of the protocol split with
    `split_seed`; `options` are `fit`'s."""
    data = MVTecAD(root, category)
    return fit(data.train if split_seed is None else split_category(data, split_seed).train, **options)
