"""PatchCore accuracy, speed and memory on MVTec-layout sets, per sampler setting, with and
without the paper's reweighting.

    python benchmarks/patchcore.py --data ../shared/data \
        --categories glass_fabric,magnetic_tile,hazelnut_toy --backbone efficientnet_lite0

Each (category, sampler) runs in its own process so that peak RSS is that run's own. Prints a
markdown table; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

SETTINGS = {
    "coreset 0.1": {"sampler": "coreset", "coreset_ratio": 0.1},
    "coreset 0.01": {"sampler": "coreset", "coreset_ratio": 0.01},
    "random 0.1": {"sampler": "random", "coreset_ratio": 0.1},
    "coreset 0.1 crop 224": {"sampler": "coreset", "coreset_ratio": 0.1, "crop": 224},
}


def run_one(root: str, category: str, setting: str, backbone: str, image_size: int) -> list[dict]:
    """Fit once, predict with and without reweighting; one row each."""
    from anomap import PatchCore, metrics
    from anomap.data import MVTecAD, load_masks

    data = MVTecAD(root, category)
    det = PatchCore(backbone=backbone, image_size=image_size, device="cpu", **SETTINGS[setting])
    start = time.perf_counter()
    det.fit(data.train)
    fit_s = time.perf_counter() - start
    labels = np.array([s.label for s in data.test])
    masks = load_masks(data.test, det.preprocess_) if data.has_masks else None
    det.predict(data.test[:1])  # warm-up: thread pools and kernels, not part of the timing
    rows = []
    for reweight in (False, True):
        det.reweight = reweight
        start = time.perf_counter()
        pred = det.predict(data.test)
        ms = (time.perf_counter() - start) / len(data.test) * 1000
        m = metrics.evaluate(labels, pred.scores, det.threshold_, masks=masks, maps=pred.maps)
        rows.append(
            {
                "category": category,
                "setting": setting,
                "reweight": reweight,
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"],
                "fit_s": fit_s,
                "predict_ms": ms,
                "bank": det.memory_bank_.shape[0],
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            }
        )
    return rows


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--categories", default="glass_fabric,magnetic_tile,hazelnut_toy")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out")
    parser.add_argument("--one", nargs=2, metavar=("CATEGORY", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.data, *args.one, args.backbone, args.image_size)))
        return
    rows = []
    for category in args.categories.split(","):
        for setting in args.settings.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--data",
                args.data,
                "--backbone",
                args.backbone,
                "--image-size",
                str(args.image_size),
                "--one",
                category,
                setting,
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])
            print(f"done {category} / {setting}", file=sys.stderr)
    keys = [
        "category",
        "setting",
        "reweight",
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "fit_s",
        "predict_ms",
        "peak_rss_gb",
        "bank",
    ]
    print("command: " + " ".join(sys.argv))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row[k]) for k in keys) + " |")
    if args.out:
        from anomap._io import write_text

        write_text(args.out, json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
