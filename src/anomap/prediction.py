"""What scoring returns, for the torch models and the exported ones alike (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """What `predict` returns.

    Attributes:
        scores: (N,) image anomaly scores, higher = more anomalous.
        maps: (N, S, S) float32 pixel anomaly maps at the preprocessed input size.
        threshold: the detector's decision threshold, or None when it has none.
    """

    scores: np.ndarray
    maps: np.ndarray
    threshold: float | None = None

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) int decisions, 1 = anomalous (score >= threshold); None without a threshold."""
        return None if self.threshold is None else (self.scores >= self.threshold).astype(int)
