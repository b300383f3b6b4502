"""The Ray runtime: importing Ray with a clear error when the extra is missing, joining a cluster."""

from __future__ import annotations

import logging

import torch

from ..errors import AnomapError

try:
    import ray
except ImportError as err:  # pragma: no cover - only without the extra
    raise AnomapError("--engine ray needs Ray: pip install 'anomap[ray]'") from err

__all__ = ["connect", "ray", "worker_env", "worker_setup"]


def connect(address: str | None = None) -> None:
    """Use the Ray runtime this process already joined; else join the cluster at `address`
    ("auto": the one this machine is part of; "ray://host:10001": a remote one through Ray
    Client); else (None) start a local runtime on this machine's cores and GPUs."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise AnomapError(f"cannot start or reach {where}: {err}") from err


def worker_env(threads: int) -> dict:
    """The Ray `runtime_env` of a worker with `threads` CPU threads: torch's and numba's thread
    pools of that size. (numba's OpenMP pool, once used by the coreset, also sets torch's thread
    count to its own size; sizing both alike keeps a worker on its CPU share and its results
    equal to those of one process run with as many threads.)"""
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}}


def worker_setup(threads: int) -> None:
    """What every worker does first: use `threads` CPU threads (the thread count also decides
    the order of floating-point sums)."""
    torch.set_num_threads(threads)
