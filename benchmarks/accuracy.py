"""PatchCore, PaDiM and their ensemble on each offline backbone, and `--method auto`, in one table.

Protocol (`anomap.protocol.split_category`, seed 42): every detector is fitted on the train part
and measured on the test part; `auto` ranks the candidates of `anomap.selection` on the
validation part only (`selection.validation_figures`, `selection.choose`, the same functions
`select` uses) and is measured on the test part like the others. The ensemble of a backbone is
`Ensemble.assemble` of that backbone's fitted PatchCore and PaDiM (no other fit): its fit time
is theirs added. Image size 256, defaults otherwise. Timings are wall-clock on whatever else the
machine is doing; accuracy does not depend on it.

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

CATEGORIES = ("glass_fabric", "magnetic_tile", "hazelnut_toy")
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
COLUMNS = ("method", "backbone", *METRICS, "fit_s", "predict_ms")


def _timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def _test_metrics(labels, masks, pred) -> dict:
    return {
        "image_auroc": metrics.image_auroc(labels, pred.scores),
        "pixel_auroc": metrics.pixel_auroc(masks, pred.maps),
        "aupro": metrics.aupro(masks, pred.maps),
    }


def run_backbone(split, backbone: str, params: dict, test_masks, val_masks) -> tuple[list[dict], list[dict]]:
    """Test rows and validation candidates of PatchCore, PaDiM and their ensemble on one backbone."""
    test_labels = np.array([s.label for s in split.test])
    val_labels = np.array([s.label for s in split.val])
    members, fit_s, rows, candidates = {}, {}, [], []
    for method in ("patchcore", "padim"):
        fit = lambda m=method: create(m, **params, backbone=backbone).fit(split.train)  # noqa: E731
        members[method], fit_s[method] = _timed(fit)
    val = {m: det.predict(split.val) for m, det in members.items()}
    val["ensemble"] = selection.ensemble_prediction(
        val["patchcore"], val["padim"], [d.normal_scores_ for d in members.values()]
    )
    fit_s["ensemble"] = fit_s["patchcore"] + fit_s["padim"]
    dets = {**members, "ensemble": Ensemble.assemble(members["patchcore"], members["padim"])}
    for method, det in dets.items():
        pred, seconds = _timed(lambda d=det: d.predict(split.test))
        rows.append(
            {
                "method": method,
                "backbone": backbone,
                **_test_metrics(test_labels, test_masks, pred),
                "fit_s": fit_s[method],
                "predict_ms": 1000 * seconds / len(split.test),
            }
        )
        candidates.append(
            {"method": method, "backbone": backbone, **selection.validation_figures(val_labels, val_masks, val[method])}
        )
    return rows, candidates


def run_category(root: str, category: str, backbones, params: dict) -> dict:
    split = split_category(MVTecAD(root, category), 42)
    resize = Preprocess(size=params["image_size"])  # masks depend on the size (and crop) only
    test_masks, val_masks = load_masks(split.test, resize), load_masks(split.val, resize)
    rows, candidates = [], []
    for backbone in backbones:
        new_rows, new_candidates = run_backbone(split, backbone, params, test_masks, val_masks)
        rows += new_rows
        candidates += new_candidates
        print(markdown(new_rows), file=sys.stderr, flush=True)
    pool = [c for c in candidates if c["backbone"] in selection.BACKBONES]
    chosen = pool[selection.choose(pool)]
    picked = next(r for r in rows if (r["method"], r["backbone"]) == (chosen["method"], chosen["backbone"]))
    rows.append(
        {
            **picked,
            "method": "auto",
            "backbone": f"{chosen['method']}/{chosen['backbone']}",
            "fit_s": sum(
                r["fit_s"] for r in rows if r["backbone"] in selection.BACKBONES and r["method"] != "ensemble"
            ),
        }
    )
    return {"category": category, "counts": split.counts(), "rows": rows, "validation": candidates}


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
    single = [r for r in rows if r["method"] in ("patchcore", "padim")]
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
