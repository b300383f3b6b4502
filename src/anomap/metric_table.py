"""The metrics shown to people, in display order: one table for the CLI printout, the run report,
the benchmark's results files, its summary table and its page. Keys are those of
`anomap.metrics.evaluate` (and of the benchmark's `results.json` rows)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One metric: its key, its label in tables, the format spec of a value, and where it is shown."""

    key: str
    label: str
    fmt: str = ".4f"
    summary: bool = False  # averaged across seeds in the benchmark summary
    run: bool = True  # measured by every evaluation; False: only by the benchmark

    def format(self, value: float | None) -> str:
        """The value as text, "n/a" for None."""
        return "n/a" if value is None else format(value, self.fmt)


METRICS = (
    Metric("image_auroc", "image AUROC", summary=True),
    Metric("image_auprc", "image AUPRC"),
    Metric("pixel_auroc", "pixel AUROC", summary=True),
    Metric("aupro", "AUPRO (FPR <= 0.3)", summary=True),
    Metric("f1", "F1 at the threshold", summary=True),
    Metric("precision", "precision"),
    Metric("recall", "recall"),
    Metric("accuracy", "accuracy"),
    Metric("threshold", "threshold", ".4g"),
    Metric("oracle_f1", "oracle F1 (best on test)", summary=True, run=False),
    Metric("fit_seconds", "fit s", ".1f", summary=True, run=False),
    Metric("predict_ms_per_image", "ms / image", ".1f", summary=True, run=False),
)
RUN = tuple(m for m in METRICS if m.run)
SUMMARY = tuple(m for m in METRICS if m.summary)
