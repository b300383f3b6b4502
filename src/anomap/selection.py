"""Model selection on the validation split: `anomap fit --method auto`.

Candidates: on each backbone of `BACKBONES`, PatchCore with zero-padded and with reflected
neighbourhoods at the image edge (`border`) and PaDiM, each fitted once on the train part of the
protocol split (`anomap.protocol.split_category`) and run once on the validation part, which holds
normal and anomalous images. Their image scores and maps are standardised by their own leave-out
scores, as in `anomap.detectors.ensemble`, and weighted by greedy forward selection (`forward_select`,
`CRITERION`): the image score's weights for the best image AUROC, the map's for the best mean of
pixel AUROC and AUPRO. The test part is never read.

One candidate with all the weight is kept alone; otherwise `Ensemble.assemble` makes the weighted
ensemble of the chosen, already fitted candidates. Without both normal and anomalous validation
images nothing can be ranked: `DEFAULT` is fitted instead, and the record says so.

What was tried is returned as a record (JSON-serialisable), which `save_selected` keeps in the
model file's metadata and `read_selection` reads back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import metrics
from .data import MVTecAD, Sample, load_masks
from .detectors import Detector, Prediction, create
from .detectors.ensemble import Ensemble, standardize, weighted_mean
from .detectors.model_file import read_model_file
from .errors import AnomapError
from .protocol import Split, split_category
from .runfolder import candidate_label

log = logging.getLogger(__name__)

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
# each backbone's candidates: method and the parameters that set it apart
VARIANTS = (("patchcore", {"border": "zeros"}), ("patchcore", {"border": "reflect"}), ("padim", {}))
MAX_STEPS = 8  # greedy steps, so a weight is a count from 0 to 8
DEFAULT = {"method": "ensemble", "backbone": "efficientnet_lite1"}  # the offline default backbone
CRITERION = (
    f"candidates standardised by their leave-out scores and weighted by greedy forward selection "
    f"(repeats allowed, at most {MAX_STEPS} steps, ties to the higher mean of the image AUROC, pixel "
    "AUROC and AUPRO of the candidate alone): weights of the image score for the highest image AUROC "
    "on the validation split, weights of the map for the highest mean of pixel AUROC and AUPRO there "
    "(the image score weights when no validation mask marks an anomalous pixel)"
)
# parameters every candidate takes; anything else belongs to one method only
SHARED = ("backbone", "image_size", "crop", "device", "batch_size", "seed", "weights", "threshold_images")
Candidate = tuple[dict, Detector]  # (method, backbone and variant parameters; fitted detector)


def standardized(pred: Prediction, normal: np.ndarray) -> Prediction:
    """A member's prediction standardised by its (m,) normal scores, as `Ensemble` does."""
    return Prediction(standardize(pred.scores, normal), standardize(pred.maps, normal), None)


def fuse(z: Sequence[Prediction], score_w, map_w) -> Prediction:
    """What an ensemble of fitted members predicts, from their `standardized` predictions and
    their weights (`Ensemble`'s weighted means); no threshold."""
    return Prediction(
        weighted_mean([p.scores for p in z], score_w).astype(np.float32),
        weighted_mean([p.maps for p in z], map_w).astype(np.float32),
        None,
    )


def validation_figures(labels: np.ndarray, masks: np.ndarray | None, pred: Prediction) -> dict:
    """Image AUROC, pixel AUROC and AUPRO (both None without masks) of one candidate from its
    (N,) labels, (N, S, S) masks and prediction, and their mean (image AUROC alone without masks)."""
    image = metrics.image_auroc(labels, pred.scores)
    if masks is None:
        return {"image_auroc": image, "pixel_auroc": None, "aupro": None, "score": image}
    pixel, pro = metrics.pixel_auroc(masks, pred.maps), metrics.aupro(masks, pred.maps)
    return {"image_auroc": image, "pixel_auroc": pixel, "aupro": pro, "score": (image + pixel + pro) / 3}


def forward_select(n: int, value: Callable[[list[int]], float], tiebreak: Sequence[float], steps: int = MAX_STEPS):
    """Greedy forward selection with repeats among n candidates: start from none, add the one whose
    addition gives the highest `value(counts)` (ties: higher `tiebreak`, then the earlier one), stop
    when no addition raises it or after `steps`. Returns the (n,) counts."""
    counts, best = [0] * n, None
    for _ in range(steps):
        trials = [(value([c + (i == j) for j, c in enumerate(counts)]), tiebreak[i], -i) for i in range(n)]
        top = max(range(n), key=lambda i: trials[i])
        if best is not None and trials[top][0] <= best:
            break
        best, counts[top] = trials[top][0], counts[top] + 1
    return counts


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


def fit_candidates(train: list[Sample], backbones: Sequence[str], params: dict) -> tuple[list[Candidate], dict]:
    """Every variant on every backbone fitted on `train`; and the seconds each backbone took."""
    candidates, seconds = [], {}
    for backbone in backbones:
        start = time.perf_counter()
        for method, variant in VARIANTS:
            spec = {"method": method, "backbone": backbone, **variant}
            candidates.append((spec, create(method, **params, backbone=backbone, **variant).fit(train)))
        seconds[backbone] = time.perf_counter() - start
    return candidates, seconds


def rank(candidates: list[Candidate], val: list[Sample]) -> tuple[Detector, dict]:
    """Weight the fitted candidates on the validation images (module docstring); return the chosen
    detector (one candidate, or their ensemble) and the record of what was tried."""
    labels = np.array([s.label for s in val])
    dets = [det for _, det in candidates]
    masks = _val_masks(val, dets[0])  # the masks depend on image_size and crop only, which all share
    figures, z = [], []  # each candidate's figures and standardised prediction, standardised once
    for det in dets:
        pred = det.predict(val)
        figures.append(validation_figures(labels, masks, pred))
        z.append(standardized(pred, det.normal_scores_))
    own = [f["score"] for f in figures]
    n = len(dets)

    def image_value(counts):
        return metrics.image_auroc(labels, weighted_mean([p.scores for p in z], counts))

    def map_value(counts):
        fused = weighted_mean([p.maps for p in z], counts)
        return (metrics.pixel_auroc(masks, fused) + metrics.aupro(masks, fused)) / 2

    score_w = forward_select(n, image_value, own)
    map_w = forward_select(n, map_value, own) if masks is not None else score_w
    used = [i for i in range(n) if score_w[i] or map_w[i]]
    if len(used) == 1:
        chosen = dets[used[0]]
    else:
        chosen = Ensemble.assemble([dets[i] for i in used], [score_w[i] for i in used], [map_w[i] for i in used])
    record = {
        "criterion": CRITERION,
        "candidates": [
            {**spec, **fig, "score_weight": float(s), "map_weight": float(m)}
            for (spec, _), fig, s, m in zip(candidates, figures, score_w, map_w)
        ],
        "chosen": {"method": chosen.method, "backbone": chosen.backbone},
        "validation": validation_figures(labels, masks, fuse(z, score_w, map_w)),
    }
    return chosen, record


def select(split: Split, **params) -> tuple[Detector, dict]:
    """Fit the candidates on `split.train`, weight them on `split.val`, return the chosen detector
    and the record.

    Args:
        split: the protocol split; `split.test` is never read.
        params: parameters every candidate takes (`SHARED`); a `backbone` limits the candidates
            to that backbone.

    Returns:
        (the chosen detector, fitted on `split.train`; the record: criterion, candidates tried
        with their validation figures and weights, the choice and its validation figures, and a
        note when the default was taken).
    """
    _check_params(params)
    given = params.pop("backbone", None)
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
    candidates, record["fit_seconds"] = fit_candidates(train, BACKBONES if given is None else (given,), params)
    det, ranked = rank(candidates, val)
    log.info("chose %s on %s: validation score %.4f", det.method, det.backbone, ranked["validation"]["score"])
    return det, {**record, **ranked}


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
    """The candidates, their validation figures and weights as a plain-text table, then the choice."""
    head = ("image_auroc", "pixel_auroc", "aupro", "score", "score_w", "map_w")
    lines = [f"{'method':20s} {'backbone':20s} " + " ".join(f"{h:>11s}" for h in head)]
    for c in record["candidates"]:
        cells = ["n/a" if c.get(k) is None else f"{c[k]:.4f}" for k in head[:4]]
        cells += [f"{c.get(k, 0):g}" for k in ("score_weight", "map_weight")]
        lines.append(f"{candidate_label(c):20s} {c['backbone']:20s} " + " ".join(f"{x:>11s}" for x in cells))
    lines = lines if record["candidates"] else [record["note"]]
    chosen = f"chosen: {record['chosen']['method']} on {record['chosen']['backbone']}"
    fused = record.get("validation")
    if fused:
        chosen += (
            " (validation "
            + ", ".join(f"{k} {'n/a' if fused[k] is None else f'{fused[k]:.4f}'}" for k in head[:3])
            + ")"
        )
    lines += [chosen, f"criterion: {record['criterion']}"]
    return "\n".join(lines)
