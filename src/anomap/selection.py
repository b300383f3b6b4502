"""Model selection on the validation split: `anomap fit --method auto`.

Candidates: PatchCore, PaDiM and their ensemble (`anomap.detectors.ensemble`) on each backbone of
`BACKBONES`. PatchCore and PaDiM are fitted on the train part of the protocol split
(`anomap.protocol.split_category`); the ensemble of a backbone is made from those two fitted
members, as `Ensemble.assemble` does, without another fit. Each candidate scores the validation
part, which holds normal and anomalous images, and the best by `CRITERION` is kept (on a tie, the
earlier candidate). The test part is never read.

Without both normal and anomalous validation images nothing can be ranked: `DEFAULT` is fitted
instead, and the record says so.

What was tried is returned as a record (JSON-serialisable), which `save_selected` keeps in the
model file's metadata and `read_selection` reads back.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import metrics
from .data import MVTecAD, Sample, load_masks
from .detectors import Detector, Prediction, create
from .detectors.ensemble import Ensemble, standardize
from .detectors.model_file import read_model_file
from .errors import AnomapError
from .protocol import Split, split_category

log = logging.getLogger(__name__)

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1")
METHODS = ("patchcore", "padim", "ensemble")
DEFAULT = {"method": "ensemble", "backbone": "efficientnet_lite1"}  # the offline default backbone
CRITERION = (
    "mean of image AUROC, pixel AUROC and AUPRO on the validation split (image AUROC alone when no "
    "validation mask marks an anomalous pixel)"
)
# parameters every candidate takes; anything else belongs to one method only
SHARED = ("backbone", "image_size", "crop", "device", "batch_size", "seed", "weights", "threshold_images")


def ensemble_prediction(patchcore: Prediction, padim: Prediction, normal: list[np.ndarray]) -> Prediction:
    """What the ensemble of two fitted members predicts, from their predictions and their (m,)
    normal scores (the same standardisation as `Ensemble`); no threshold."""
    scores = np.mean([standardize(p.scores, n) for p, n in zip((patchcore, padim), normal)], axis=0)
    maps = np.mean([standardize(p.maps, n) for p, n in zip((patchcore, padim), normal)], axis=0)
    return Prediction(scores.astype(np.float32), maps.astype(np.float32), None)


def validation_figures(labels: np.ndarray, masks: np.ndarray | None, pred: Prediction) -> dict:
    """Image AUROC, pixel AUROC and AUPRO (both None without masks) of one candidate from its
    (N,) labels, (N, S, S) masks and prediction, and the criterion's score."""
    image = metrics.image_auroc(labels, pred.scores)
    if masks is None:
        return {"image_auroc": image, "pixel_auroc": None, "aupro": None, "score": image}
    pixel, pro = metrics.pixel_auroc(masks, pred.maps), metrics.aupro(masks, pred.maps)
    return {"image_auroc": image, "pixel_auroc": pixel, "aupro": pro, "score": (image + pixel + pro) / 3}


def _check_params(params: dict) -> None:
    other = sorted(set(params) - set(SHARED))
    if other:
        raise AnomapError(
            f"--method auto compares several methods, so it takes only the parameters they share "
            f"({', '.join(SHARED)}); not {', '.join(other)}"
        )


def _val_masks(val: list[Sample], det: Detector) -> np.ndarray | None:
    """(N, S, S) validation masks at the detector's input size; None when none marks a pixel."""
    masks = load_masks(val, det.preprocess_) if any(s.mask_path is not None for s in val) else None
    return None if masks is None or not masks.any() else masks


def _fit_members(train: list[Sample], backbone: str, params: dict) -> tuple[dict[str, Detector], float]:
    start = time.perf_counter()
    members = {m: create(m, **params, backbone=backbone).fit(train) for m in ("patchcore", "padim")}
    return members, time.perf_counter() - start


def select(split: Split, **params) -> tuple[Detector, dict]:
    """Fit the candidates on `split.train`, rank them on `split.val`, return the best and the record.

    Args:
        split: the protocol split; `split.test` is never read.
        params: parameters every candidate takes (`SHARED`); a `backbone` limits the candidates
            to that backbone.

    Returns:
        (the chosen detector, fitted on `split.train`; the record: criterion, candidates tried
        with their validation figures, the choice, and a note when the default was taken).
    """
    _check_params(params)
    given = params.pop("backbone", None)
    backbones = BACKBONES if given is None else (given,)
    train, val = list(split.train), list(split.val)
    labels = np.array([s.label for s in val])
    record = {
        "criterion": CRITERION,
        "candidates": [],
        "n_train": len(train),
        "n_val_normal": int((labels == 0).sum()),
        "n_val_anomalous": int((labels == 1).sum()),
        "note": None,
    }
    if not (labels == 1).any() or not (labels == 0).any():
        return _default(train, record, given or DEFAULT["backbone"], params)
    fitted, masks, record["fit_seconds"] = {}, None, {}
    for backbone in backbones:
        members, record["fit_seconds"][backbone] = _fit_members(train, backbone, params)
        preds = {m: members[m].predict(val) for m in ("patchcore", "padim")}
        preds["ensemble"] = ensemble_prediction(
            preds["patchcore"], preds["padim"], [m.normal_scores_ for m in members.values()]
        )
        if not fitted:  # the masks depend on image_size and crop only, which every candidate shares
            masks = _val_masks(val, members["patchcore"])
        fitted[backbone] = members
        for method in METHODS:
            figures = validation_figures(labels, masks, preds[method])
            record["candidates"].append({"method": method, "backbone": backbone, **figures})
            log.info("%s on %s: validation score %.4f", method, backbone, figures["score"])
    chosen = record["candidates"][choose(record["candidates"])]
    record["chosen"] = {"method": chosen["method"], "backbone": chosen["backbone"]}
    members = fitted[chosen["backbone"]]
    if chosen["method"] == "ensemble":
        return Ensemble.assemble(members["patchcore"], members["padim"]), record
    return members[chosen["method"]], record


def _default(train: list[Sample], record: dict, backbone: str, params: dict) -> tuple[Detector, dict]:
    """The default method on `backbone`, fitted on `train`, and the record saying why."""
    record["note"] = (
        f"the validation split has {record['n_val_normal']} normal and {record['n_val_anomalous']} "
        f"anomalous images, so no candidate can be ranked: took the default {DEFAULT['method']} "
        f"on {backbone}"
    )
    log.warning(record["note"])
    record["chosen"] = {"method": DEFAULT["method"], "backbone": backbone}
    return create(DEFAULT["method"], **params, backbone=backbone).fit(train), record


def choose(candidates: list[dict]) -> int:
    """Index of the candidate with the highest criterion `score`; the first one on a tie."""
    return int(np.argmax([c["score"] for c in candidates]))


def fit_auto(root: str | Path, category: str, split_seed: int, **params) -> tuple[Detector, dict]:
    """`select` on the protocol split of `<root>/<category>` with this seed."""
    det, record = select(split_category(MVTecAD(root, category), split_seed), **params)
    return det, {**record, "split_seed": split_seed}


def save_selected(det: Detector, record: dict, path: str | Path, key: bytes | None = None) -> Path:
    """Save the chosen detector with the selection record as its `selection_`, which the model
    file keeps in its `selection` metadata (and a later save of the loaded detector keeps too);
    `key` signs the file (see `Detector.save`)."""
    det.selection_ = record
    return det.save(path, key=key)


def read_selection(path: str | Path) -> dict | None:
    """The selection record kept in a model file, or None for a model fitted without selection."""
    meta, _ = read_model_file(path)
    return json.loads(meta["selection"]) if "selection" in meta else None


def format_record(record: dict) -> str:
    """The candidates and their validation figures as a plain-text table, then the choice."""
    lines = [f"{'method':10s} {'backbone':20s} {'image_auroc':>11s} {'pixel_auroc':>11s} {'aupro':>7s} {'score':>7s}"]
    for c in record["candidates"]:
        pixel, pro = ("n/a" if c[k] is None else f"{c[k]:.4f}" for k in ("pixel_auroc", "aupro"))
        lines.append(
            f"{c['method']:10s} {c['backbone']:20s} {c['image_auroc']:11.4f} {pixel:>11s} {pro:>7s} {c['score']:7.4f}"
        )
    lines = lines if record["candidates"] else [record["note"]]
    lines.append(
        f"chosen: {record['chosen']['method']} on {record['chosen']['backbone']} (criterion: {record['criterion']})"
    )
    return "\n".join(lines)
