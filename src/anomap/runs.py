"""Whole jobs behind the `anomap` command: fit a category (or its train split), calibrate a saved
model, predict files and folders, evaluate a category into a run folder, the demo. Each writes
its outputs atomically and returns what it measured."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ._images import DECODE_THREADS
from ._io import write_text
from .data import MVTecAD, Preprocess, Sample, list_images, load_image
from .detectors import Detector, create, load
from .errors import AnomapError, DataError, ScoreError
from .evaluation import evaluate, picture_stem, write_run, write_scores
from .pictures import PICTURES, PictureQueue, heat_range, write_pictures
from .protocol import calibrate, split_category

log = logging.getLogger(__name__)


def fit_category(root: str | Path, category: str, method: str = "patchcore", **params) -> Detector:
    """Fit a detector of `method` on `<root>/<category>/train/good`."""
    data = MVTecAD(root, category)
    return create(method, **params).fit(data.train)


def fit_train_split(
    root: str | Path, category: str, split_seed: int = 42, method: str = "patchcore", **params
) -> Detector:
    """Fit a detector of `method` (with `params`) on the train split of `<root>/<category>`
    (`anomap.protocol.split_category`), leaving its validation images unseen."""
    return create(method, **params).fit(split_category(MVTecAD(root, category), split_seed).train)


def calibrate_file(
    model: str | Path,
    root: str | Path,
    category: str,
    method: str = "f1",
    seed: int = 42,
    k: float = 3.0,
    device: str | None = None,
    key: bytes | None = None,
) -> tuple[float | None, float]:
    """Calibrate a saved model's threshold on the category's val split and rewrite the file atomically.

    The val normals are held-out training images only if the model was fitted on the train split
    of the same seed (`fit_train_split`); a model fitted on all of `train/good` has seen them,
    which lowers their scores and so the threshold.

    Returns:
        (old threshold, new threshold).
    """
    det = load(model, device=device, key=key)
    old = det.threshold_
    new = calibrate(det, split_category(MVTecAD(root, category), seed).val, method, k)
    det.save(model, key=key)
    return old, new


@dataclass(frozen=True)
class Scored:
    """What `predict_paths` scored and wrote."""

    csv: Path
    paths: list[Path]  # the images scored, in CSV order
    scores: np.ndarray  # (N,)
    threshold: float | None
    skipped: list[tuple[Path, str]]  # (path, reason) of the unusable images left out

    @property
    def flagged(self) -> int:
        """How many images are anomalous at the threshold (0 without one)."""
        return 0 if self.threshold is None else int((self.scores >= self.threshold).sum())


def predict_paths(
    det: Detector, inputs: Sequence[str | Path], out: Path, skip_bad: bool = False, pictures: str = "both"
) -> Scored:
    """Score image files and folders into `out`: `scores.csv` (path, score, decision) and per image
    the pictures `pictures` asks for (`anomap.pictures.write_pictures`, named `NNNN_<stem>_...`).

    Each image is decoded once, the next batch while this one is scored; pictures are drawn by
    background threads at most one batch behind, so memory stays bounded however many images.
    Without `skip_bad` the first unusable image raises its DataError (no scores.csv is written);
    with it, unusable images are logged, left out and listed with the reason in `out/skipped.csv`.
    """
    if pictures not in PICTURES:
        raise AnomapError(f"pictures must be one of {', '.join(PICTURES)}, got {pictures!r}")
    paths = list_images(inputs)
    kept, scores, skipped = _score_and_draw(det, paths, out, skip_bad, pictures)
    if not kept:
        raise DataError(f"all {len(paths)} images are unusable; the first: {skipped[0][1]}")
    if skipped:
        buf = io.StringIO()
        csv.writer(buf).writerows([["path", "reason"], *([str(p), r] for p, r in skipped)])
        write_text(out / "skipped.csv", buf.getvalue())
    return Scored(write_scores(out / "scores.csv", kept, scores, det.threshold_), kept, scores, det.threshold_, skipped)


def _score_and_draw(
    det: Detector, paths: list[Path], out: Path, skip_bad: bool, pictures: str
) -> tuple[list[Path], np.ndarray, list[tuple[Path, str]]]:
    """(images scored, their (N,) scores, (path, reason) of those skipped); queues the pictures."""
    kept, scores, skipped = [], [np.zeros(0, np.float32)], []
    scale = heat_range(det.normal_scores_)
    with PictureQueue(workers=DECODE_THREADS, limit=det.batch_size) as queue:
        for batch in _decoded_batches(paths, det.preprocess_, det.batch_size, keep=pictures != "none"):
            skipped += _unusable(batch.failures, skip_bad)
            if not batch.paths:
                continue
            image_scores, maps = (t.float().cpu().numpy() for t in det.score_batch(batch.tensor))
            _require_finite(image_scores)
            for path, image, amap in zip(batch.paths, batch.images, maps):
                if pictures != "none":
                    queue.submit(
                        write_pictures, out, picture_stem(len(kept), path), image, amap, scale, det.threshold_, pictures
                    )
                kept.append(path)
            scores.append(image_scores)
    return kept, np.concatenate(scores), skipped


@dataclass(frozen=True)
class _Batch:
    paths: list[Path]  # the usable images
    images: list[np.ndarray | None]  # (H, W, 3) uint8 decoded, None when not kept
    tensor: torch.Tensor | None  # (B, 3, S, S) preprocessed
    failures: list[tuple[Path, DataError]]


def _decode(path: Path, preprocess: Preprocess, keep: bool) -> tuple[np.ndarray | None, np.ndarray] | DataError:
    try:
        image = load_image(path)
    except DataError as err:
        return err
    return (image if keep else None), preprocess.image(image).numpy()


def _decoded_batches(paths: list[Path], preprocess: Preprocess, size: int, keep: bool) -> Iterator[_Batch]:
    """`size` images at a time, decoded by DECODE_THREADS threads one batch ahead."""
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="anomap-decode") as pool:

        def submit(k: int) -> list:
            return [pool.submit(_decode, p, preprocess, keep) for p in chunks[k]] if k < len(chunks) else []

        pending = submit(0)
        for k, chunk in enumerate(chunks):
            current, pending = [f.result() for f in pending], submit(k + 1)
            good = [(p, r) for p, r in zip(chunk, current) if not isinstance(r, DataError)]
            tensor = torch.from_numpy(np.stack([r[1] for _, r in good])) if good else None
            yield _Batch(
                [p for p, _ in good],
                [r[0] for _, r in good],
                tensor,
                [(p, r) for p, r in zip(chunk, current) if isinstance(r, DataError)],
            )


def _unusable(failures: list[tuple[Path, DataError]], skip_bad: bool) -> list[tuple[Path, str]]:
    """Raise the first failure, or with `skip_bad` log each one and return (path, reason) pairs."""
    if failures and not skip_bad:
        raise failures[0][1]
    for _, err in failures:
        log.warning("skipped %s", err)
    return [(path, str(err)) for path, err in failures]


def _require_finite(scores: np.ndarray) -> None:
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ScoreError(
            f"{int(bad.sum())} of {len(bad)} scores are NaN or infinite; the model file or "
            "the backbone weights are broken, refit the model"
        )


def evaluate_to_folder(det: Detector, root: str | Path, category: str, out: Path | None) -> dict:
    """Evaluate on `<root>/<category>/test`; with `out`, also write the run folder with its
    report.html (`anomap.evaluation.write_run`). Returns the metrics."""
    if det.threshold_ is None:
        raise AnomapError("the model has no threshold; fit it with anomap or calibrate it first")
    data = MVTecAD(root, category)
    _require_both_classes(data.test, Path(root) / category / "test")
    ev = evaluate(det, data.test)
    if out is not None:
        write_run(out, det, ev, title=category)
    return ev.metrics


def _require_both_classes(samples: Sequence[Sample], folder: Path) -> None:
    """Image metrics (AUROC, AUPRC) are undefined without both normal and anomalous images."""
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        what = "no images" if not labels else "only anomalous images" if labels == {1} else "no anomalous images"
        raise DataError(
            f"{folder}: {what}; evaluation needs test/good and at least one test/<defect> "
            "folder (use `anomap predict` to just score images)"
        )


def demo_root() -> Path:
    """Folder of the bundled demo data (MVTec layout, category `hazelnut_toy`)."""
    return Path(str(resources.files("anomap") / "demo_data"))


def demo(out: Path, device: str = "auto", root: str | Path | None = None, category: str = "hazelnut_toy") -> dict:
    """Fit PatchCore with the offline efficientnet_lite1 backbone and evaluate it.

    Uses the bundled data unless `root`/`category` name another MVTec-layout category. Writes
    `model.anomap` and the run folder into `out`. Returns the metrics.
    """
    root = demo_root() if root is None else root
    det = fit_category(root, category, backbone="efficientnet_lite1", device=device)
    det.save(out / "model.anomap")
    return evaluate_to_folder(det, root, category, out)
