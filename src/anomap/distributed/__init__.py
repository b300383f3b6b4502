"""Scale out on Ray: score large image sets and fit PatchCore on large training sets across
processes, machines and GPUs of a Ray cluster (the `ray` extra: `pip install 'anomap[ray]'`).

`predict` streams images through Ray Data (CPU tasks decode, an actor pool scores, the driver
writes results in parts that a rerun skips); `fit` runs PatchCore's coreset blocks as worker
tasks and joins their picks into the bank; `connect` joins or starts the Ray runtime. Ray is
imported on first use of these, so `anomap.distributed.jpeg` works without it.
"""

from importlib import import_module

_WHERE = {
    "fit": "fitting",
    "fit_category": "fitting",
    "list_inputs": "scoring",
    "predict": "scoring",
    "Summary": "results",
    "connect": "runtime",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'anomap.distributed' has no attribute {name!r}")
