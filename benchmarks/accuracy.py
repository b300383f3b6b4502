"""PatchCore (zero and reflected borders), PaDiM, their ensemble and auto on each offline backbone.

Protocol (`anomap.protocol.split_category`, seed 42): every candidate of `anomap.selection`
(`selection.VARIANTS` on each backbone) is fitted once on the train part and measured on the test
part. The ensemble row of a backbone is `Ensemble.assemble` of its PatchCore (zeros) and PaDiM with
equal weights (the default ensemble; no other fit): its fit time is theirs added. `auto` is
`selection.rank` of the candidates on the backbones of `selection.BACKBONES`, on the validation
part only, the same function `anomap fit --method auto` runs, measured on the test part like the
others. Image size 256, defaults otherwise. Timings are wall-clock on whatever else the machine
is doing; accuracy does not depend on it.

    python benchmarks/accuracy.py --data ../shared/data --out bench-accuracy
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from anomap import create, metrics, selection
from anomap._images import Preprocess
from anomap._io import write_text
from anomap.backbones import backbone_names
from anomap.data import MVTecAD, load_masks
from anomap.detectors.ensemble import Ensemble
from anomap.protocol import split_category
from anomap.runfolder import candidate_label

CATEGORIES = ("glass_fabric", "magnetic_tile", "hazelnut_toy")
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
COLUMNS = ("method", "backbone", *METRICS, "fit_s", "predict_ms")
SINGLE = ("patchcore", "patchcore (reflect)", "padim")


def _timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def measure(det, split, masks, method: str, backbone: str, fit_s: float) -> dict:
    """One row: test-part metrics of a fitted detector, its fit time and prediction time."""
    pred, seconds = _timed(lambda: det.predict(split.test))
    labels = np.array([s.label for s in split.test])
    return {
        "method": method,
        "backbone": backbone,
        "image_auroc": metrics.image_auroc(labels, pred.scores),
        "pixel_auroc": metrics.pixel_auroc(masks, pred.maps),
        "aupro": metrics.aupro(masks, pred.maps),
        "fit_s": fit_s,
        "predict_ms": 1000 * seconds / len(split.test),
    }


def weights_text(record: dict) -> str:
    """The candidates auto weighted: "label backbone (score weight/map weight)", joined by +."""
    used = [c for c in record["candidates"] if c["score_weight"] or c["map_weight"]]
    return " + ".join(f"{candidate_label(c)} {c['backbone']} ({c['score_weight']:g}/{c['map_weight']:g})" for c in used)


def run_category(root: str, category: str, backbones, params: dict) -> dict:
    split = split_category(MVTecAD(root, category), 42)
    masks = load_masks(split.test, Preprocess(size=params["image_size"]))  # size (and crop) only
    candidates, rows = [], []
    for backbone in backbones:
        fitted = []
        for method, variant in selection.VARIANTS:
            spec = {"method": method, "backbone": backbone, **variant}
            det, seconds = _timed(
                lambda m=method, v=variant, b=backbone: create(m, **params, backbone=b, **v).fit(split.train)
            )
            fitted.append((spec, det, seconds))
            label = candidate_label(spec if spec.get("border") == "reflect" else {"method": method})
            rows.append(measure(det, split, masks, label, backbone, seconds))
        pair = [(det, s) for spec, det, s in fitted if spec.get("border") != "reflect"]
        ensemble = Ensemble.assemble([det for det, _ in pair])
        rows.append(measure(ensemble, split, masks, "ensemble", backbone, sum(s for _, s in pair)))
        candidates += [(spec, det, s) for spec, det, s in fitted if backbone in selection.BACKBONES]
        print(markdown(rows[-4:]), file=sys.stderr, flush=True)
    (det, record), rank_s = _timed(
        lambda: selection.rank([(spec, det) for spec, det, _ in candidates], list(split.val))
    )
    fit_s = sum(s for *_, s in candidates) + rank_s  # every candidate's fit, then the ranking
    rows.append(measure(det, split, masks, "auto", weights_text(record), fit_s))
    return {"category": category, "counts": split.counts(), "rows": rows, "selection": record}


def markdown(rows: list[dict], bold: bool = False) -> str:
    """Rows as a markdown table; with `bold`, the best value of each metric in bold."""
    best = {m: max(r[m] for r in rows) for m in METRICS} if bold else {}

    def cell(row, column) -> str:
        value = row[column]
        if not isinstance(value, float):
            return str(value)
        text = f"{value:.1f}" if column in ("fit_s", "predict_ms") else f"{value:.3f}"
        return f"**{text}**" if best.get(column) is not None and round(value, 3) == round(best[column], 3) else text

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows])


def auto_gaps(rows: list[dict]) -> str:
    """How far the auto row is from the best PatchCore or PaDiM row on each metric (+ above, - below)."""
    auto = next(r for r in rows if r["method"] == "auto")
    single = [r for r in rows if r["method"] in SINGLE]
    gaps = []
    for metric in METRICS:
        best = max(single, key=lambda r: r[metric])
        gaps.append(f"{metric} {auto[metric] - best[metric]:+.3f} (best single: {best['method']} {best['backbone']})")
    return "auto against the best single method: " + "; ".join(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="root of the MVTec-layout categories")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=backbone_names())
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args()
    params = {"image_size": args.image_size, "device": args.device}
    results = []
    for category in args.categories:
        results.append(run_category(args.data, category, args.backbones, params))
        if args.out is not None:
            write_text(args.out / "results.json", json.dumps(results, indent=2))
    print("command: " + shlex.join(["python", *sys.argv]))
    for result in results:
        print(f"\n{result['category']} (test part of the seed-42 split; auto chose on the validation part)")
        print(markdown(result["rows"], bold=True))
        print(auto_gaps(result["rows"]))


if __name__ == "__main__":
    main()
