"""Nearest-neighbour search through faiss: an exact flat index, and an inverted-file (IVF) index
whose search is sublinear in the bank.

IVF: the bank is partitioned by k-means into `nlist` cells; a query is compared with the cell
centroids, then only with the entries of its `nprobe` nearest cells. Its distances are exact for
the entries it compares, so a miss only overestimates a distance. The centroids are part of the
model (seeded k-means, stored in the model file), so an index is rebuilt identically at load.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import AnomapError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise AnomapError("this search needs faiss: pip install faiss-cpu") from None
    return faiss


def _array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def flat_index(bank: torch.Tensor):
    """An exact L2 faiss index over (K, D) bank entries (the bank is copied to the CPU)."""
    index = _faiss().IndexFlatL2(bank.shape[1])
    index.add(_array(bank))
    return index


MAX_CELLS = 1024  # more cells make k-means slower than the search they save
SAMPLE_PER_CELL = 64  # k-means trains on at most this many entries per cell


def cells(bank_size: int) -> int:
    """IVF cells for a bank of this size: about 4 sqrt(K), at most `MAX_CELLS`, at most one per
    39 entries (what k-means needs to place a centroid) and at least 1."""
    return max(1, min(int(4 * math.sqrt(bank_size)), MAX_CELLS, bank_size // 39))


def ivf_centroids(bank: torch.Tensor, nlist: int, seed: int) -> torch.Tensor:
    """(K, D) bank -> (nlist, D) float32 k-means centroids (20 iterations on a seeded sample of at
    most `SAMPLE_PER_CELL` entries per cell)."""
    kmeans = _faiss().Kmeans(
        bank.shape[1], nlist, niter=20, seed=seed, verbose=False, max_points_per_centroid=SAMPLE_PER_CELL
    )
    kmeans.train(_array(bank))
    return torch.from_numpy(kmeans.centroids.copy())


def ivf_index(bank: torch.Tensor, centroids: torch.Tensor):
    """An IVF-flat index of the (K, D) bank over given (nlist, D) centroids; ids = bank rows."""
    faiss = _faiss()
    quantizer = faiss.IndexFlatL2(bank.shape[1])
    quantizer.add(_array(centroids))
    index = faiss.IndexIVFFlat(quantizer, bank.shape[1], centroids.shape[0])
    index.is_trained = True
    index.add(_array(bank))
    return index


def search(
    index, queries: torch.Tensor, k: int, nprobe: int | None = None, exclude: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest entries of (M, D) queries: distances (M, k) ascending and indices (M, k) int64,
    on the queries' device.

    Args:
        nprobe: cells visited by an IVF index (None for a flat index).
        exclude: a range [lo, hi) of bank rows never returned.
    """
    faiss = _faiss()
    params = None
    if nprobe is not None or exclude is not None:
        params = faiss.SearchParametersIVF() if nprobe is not None else faiss.SearchParameters()
        if nprobe is not None:
            params.nprobe = nprobe
        if exclude is not None:
            params.sel = faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude))
    d2, idx = index.search(_array(queries), k, params=params)
    if (idx < 0).any():
        raise AnomapError("the nearest-neighbour search found fewer entries than asked for")
    dist = torch.from_numpy(d2).clamp_(min=0).sqrt_()
    return dist.to(queries.device), torch.from_numpy(idx).to(queries.device)
