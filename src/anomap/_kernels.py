"""Compiled CPU kernels (numba) for the loops that torch runs slowly one small step at a time."""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

BLOCK = 4096  # points per parallel work item of the sweep


@njit(parallel=True, fastmath=True, cache=True)
def _center_dists(centers, cn, c, cc, count, dc2):  # pragma: no cover - compiled
    """dc2[j] = squared distance from the new center c to chosen center j, for j < count."""
    for j in prange(count):
        dot = 0.0
        for q in range(centers.shape[1]):
            dot += centers[j, q] * c[q]
        dc2[j] = cn[j] + cc - 2.0 * dot


@njit(parallel=True, fastmath=True, cache=True)
def _sweep(x, xn, mind, assign, dc2, c, cc, i, bmax, barg):  # pragma: no cover - compiled
    """Update every point's squared distance to its nearest center with the new center c, and
    record each block's largest distance (bmax) and its first point (barg).

    A point p can only get closer when d(c, c_assign[p]) < 2 d(p, c_assign[p]) (triangle
    inequality), i.e. dc2[assign[p]] < 4 mind[p]; all other points are skipped unread.
    """
    n = x.shape[0]
    for b in prange(bmax.shape[0]):
        best, arg = -1.0, b * BLOCK
        for p in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            m = mind[p]
            if dc2[assign[p]] < 4.0 * m:
                dot = 0.0
                for q in range(x.shape[1]):
                    dot += x[p, q] * c[q]
                v = max(xn[p] + cc - 2.0 * dot, 0.0)
                if v < m:
                    m = v
                    mind[p] = v
                    assign[p] = i
            if m > best:
                best, arg = m, p
        bmax[b], barg[b] = best, arg


def greedy_steps(x, xn, mind, assign, centers, cn, chosen, dc2, bmax, barg, start: int, stop: int) -> int:
    """Run greedy k-center iterations start..stop-1 in place (see `anomap.ops.greedy_coreset`) on
    as many threads as torch uses (at most numba's pool), leaving torch's thread count as it was.

    Args:
        x: (N, D) float32 points; xn: (N,) their squared norms.
        mind: (N,) squared distance to the nearest chosen center; assign: (N,) its index.
        centers: (n, D) chosen points; cn: (n,) their squared norms; chosen: (n,) their indices.
        dc2: (n,) scratch for squared center-to-new-center distances.
        bmax, barg: (ceil(N / BLOCK),) each block's largest `mind` and its first point holding it.

    Returns:
        the first iteration not run: `stop`, or earlier when every point already is a center.
    """
    threads = torch.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _greedy_steps(x, xn, mind, assign, centers, cn, chosen, dc2, bmax, barg, start, stop)
    finally:
        # numba's OpenMP layer sets the process's OpenMP thread count, which torch reads as its own
        torch.set_num_threads(threads)


@njit(fastmath=True, cache=True)
def _greedy_steps(x, xn, mind, assign, centers, cn, chosen, dc2, bmax, barg, start, stop):  # pragma: no cover
    """`greedy_steps`, compiled."""
    for i in range(start, stop):
        new = barg[np.argmax(bmax)]
        if mind[new] <= 0:
            return i
        chosen[i] = new
        c = x[new]
        cc = xn[new]
        centers[i] = c
        cn[i] = cc
        _center_dists(centers, cn, c, cc, i, dc2)
        _sweep(x, xn, mind, assign, dc2, c, cc, i, bmax, barg)
    return stop
