"""The Ray runtime: importing Ray with a clear error when the extra is missing, joining a cluster."""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from ..errors import AnomapError

try:
    import ray
except ImportError as err:  # pragma: no cover - only without the extra
    raise AnomapError("--engine ray needs Ray: pip install 'anomap[ray]'") from err

__all__ = ["connect", "ray", "thread_stream", "worker_env", "worker_setup"]

_local = threading.local()


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
    pools of that size, which keeps a worker on its CPU share and its results equal to those of
    one process run with as many threads."""
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}}


def worker_setup(threads: int) -> None:
    """What every worker does first: use `threads` CPU threads (the thread count also decides
    the order of floating-point sums)."""
    torch.set_num_threads(threads)


def thread_stream(device: torch.device | str):
    """A context running CUDA work on a stream of the calling thread's own, so that work from
    several threads of a worker overlaps on the GPU (one batch's copies and decoding with
    another's model); no change on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    _local.streams = streams = getattr(_local, "streams", {})  # device -> this thread's stream
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return torch.cuda.stream(streams[device])
