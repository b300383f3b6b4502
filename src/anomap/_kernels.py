"""Compiled CPU kernels (numba) for the loops that torch runs slowly one small step at a time."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _sweep(x, xn, mind, assign, dc2, c, cc, i):  # pragma: no cover - compiled
    """Update every point's squared distance to its nearest center with the new center c.

    A point p can only get closer when d(c, c_assign[p]) < 2 d(p, c_assign[p]) (triangle
    inequality), i.e. dc2[assign[p]] < 4 mind[p]; all other points are skipped unread.
    """
    for p in prange(x.shape[0]):
        if dc2[assign[p]] < 4.0 * mind[p]:
            dot = 0.0
            for q in range(x.shape[1]):
                dot += x[p, q] * c[q]
            v = max(xn[p] + cc - 2.0 * dot, 0.0)
            if v < mind[p]:
                mind[p] = v
                assign[p] = i


@njit(fastmath=True, cache=True)
def greedy_steps(x, xn, mind, assign, centers, cn, chosen, dc2, start, stop):  # pragma: no cover
    """Run greedy k-center iterations start..stop-1 in place (see `anomap.ops.greedy_coreset`).

    Args:
        x: (N, D) float32 points; xn: (N,) their squared norms.
        mind: (N,) squared distance to the nearest chosen center; assign: (N,) its index.
        centers: (n, D) chosen points; cn: (n,) their squared norms; chosen: (n,) their indices.
        dc2: (n,) scratch for squared center-to-new-center distances.

    Returns:
        the first iteration not run: `stop`, or earlier when every point already is a center.
    """
    for i in range(start, stop):
        new = np.argmax(mind)
        if mind[new] <= 0:
            return i
        chosen[i] = new
        c = x[new]
        cc = xn[new]
        centers[i] = c
        cn[i] = cc
        for j in range(i):
            dot = 0.0
            for q in range(x.shape[1]):
                dot += centers[j, q] * c[q]
            dc2[j] = cn[j] + cc - 2.0 * dot
        _sweep(x, xn, mind, assign, dc2, c, cc, i)
    return stop
