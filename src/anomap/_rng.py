"""Seeded random generators that give the same numbers on every machine and run."""

from __future__ import annotations

import hashlib

import numpy as np


def stable_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded from `seed` and the strings `keys` (through SHA-256, never Python's `hash()`)."""
    digest = hashlib.sha256("\0".join(keys).encode()).digest()
    return np.random.default_rng([seed, *np.frombuffer(digest[:16], dtype="<u4").tolist()])
