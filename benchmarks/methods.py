"""Accuracy and speed of every registered method on MVTec-layout categories, in one table.

Every method runs with the offline efficientnet_lite0 backbone at 256 px and its other defaults;
`psfe` runs as its ablation: statistics "variance" or "variance+entropy" x reference "none" or
"train". Fit time includes building the backbone; predict time is per test image. Timings are
wall-clock on whatever else the machine is doing.

    python benchmarks/methods.py --data /work/shared/data --categories glass_fabric hazelnut_toy \
        --methods padim psfe global_knn patchcore --out bench-methods
"""

import argparse
import csv
import inspect
import io
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from anomap import create, methods
from anomap._io import write_text
from anomap.data import MVTecAD, load_masks
from anomap.detectors import REGISTRY
from anomap.metrics import evaluate

CATEGORIES = ("glass_fabric", "magnetic_tile", "hazelnut_toy")
COMMON = {"backbone": "efficientnet_lite0", "image_size": 256}
PSFE_ABLATION = {
    f"psfe[{'+'.join(stats)},{reference}]": {"stats": stats, "reference": reference}
    for reference in ("none", "train")
    for stats in (("variance",), ("variance", "entropy"))
}
COLUMNS = ("category", "method", "image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_ms")


def variants(method: str) -> dict[str, dict]:
    """Row label -> extra parameters of the runs of one method."""
    return PSFE_ABLATION if method == "psfe" else {method: {}}


def run(data: MVTecAD, method: str, params: dict, device: str) -> dict:
    """Fit on the train split, predict the test split; metrics and timings."""
    accepted = inspect.signature(REGISTRY[method]).parameters
    common = {k: v for k, v in COMMON.items() if k in accepted}  # conv_ae has no backbone
    det = create(method, **common, **params, device=device)
    start = time.perf_counter()
    det.fit(data.train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = det.predict(data.test)
    predict_ms = 1000 * (time.perf_counter() - start) / len(data.test)
    labels = np.array([s.label for s in data.test])
    masks = load_masks(data.test, det.preprocess_)
    result = evaluate(labels, pred.scores, det.threshold_, masks=masks, maps=pred.maps)
    return {key: result[key] for key in ("image_auroc", "pixel_auroc", "aupro")} | {
        "fit_s": fit_s,
        "predict_ms": predict_ms,
    }


def markdown(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "results.json", json.dumps(rows, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="root of the MVTec-layout categories")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.csv and results.json")
    args = parser.parse_args()
    rows = []
    for category in args.categories:
        data = MVTecAD(args.data, category)
        for method in args.methods or methods():
            for label, params in variants(method).items():
                rows.append({"category": category, "method": label} | run(data, method, params, args.device))
                print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                if args.out is not None:
                    write_results(args.out, rows)
    print("command: " + shlex.join(["python", *sys.argv]))
    print(markdown(rows))


if __name__ == "__main__":
    main()
