"""How PatchCore's fit and predict cost grow with the training set: fit on the first N training
images of a category, report the fit phases, predict time, peak memory, bank size and accuracy on
the whole test set.

    python benchmarks/scaling.py --data ../shared/data --category magnetic_tile --sizes 90,180,360,761
    python benchmarks/scaling.py --data ../shared/data --category magnetic_tile --sizes 761 \
        --param search=exact --param coreset_chunk=250000        # the exact form, for comparison
    python benchmarks/scaling.py --synthetic --sizes 1000,5000,20000 --device cuda \
        --backbone wide_resnet50_2 --weights random              # GPU: fit time per image only

Each N runs in its own process, so that peak RSS is that run's own. Timings are wall-clock on
whatever else the machine is doing. `fit_s` = `features_s` + `coreset_s` + `threshold_s`
(features_s is the rest: decoding, the backbone and the embedding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fit_memory import peak_rss_gb, synthetic_images, timed


def run_one(args: argparse.Namespace, n: int) -> dict:
    """Fit on n images, then predict the test set (real data only); one row."""
    import numpy as np

    from anomap import PatchCore, metrics
    from anomap.data import MVTecAD, load_masks

    if args.synthetic:
        train, data = synthetic_images(Path(args.cache) / str(args.image_size), n, args.image_size), None
    else:
        data = MVTecAD(args.data, args.category)
        train = data.train[:n]
    params = dict(json.loads(p) for p in args.params)
    det = PatchCore(
        backbone=args.backbone, weights=args.weights, image_size=args.image_size, device=args.device, **params
    )
    phases: dict[str, float] = {}
    det._subsample = timed(phases, "coreset_s", det._subsample)
    det._leave_out_scores = timed(phases, "threshold_s", det._leave_out_scores)
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    row = {
        "n": len(train),
        "fit_s": fit_s,
        "features_s": fit_s - sum(phases.values()),
        **phases,
        "fit_ms_per_image": fit_s / len(train) * 1000,
        "bank": det.memory_bank_.shape[0],
        "search": det._search_kind(),
    }
    if data is not None:
        labels = np.array([s.label for s in data.test])
        masks = load_masks(data.test, det.preprocess_) if data.has_masks else None
        det.predict(data.test[:1])  # warm-up: thread pools, kernels and the index
        start = time.perf_counter()
        pred = det.predict(data.test)
        row["predict_ms"] = (time.perf_counter() - start) / len(data.test) * 1000
        m = metrics.evaluate(labels, pred.scores, det.threshold_, masks=masks, maps=pred.maps)
        row |= {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"]}
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="root of the MVTec-layout categories")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--sizes", default="90,180,360,761", help="comma-separated training set sizes")
    parser.add_argument("--synthetic", action="store_true", help="fit on synthetic images; no accuracy")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "anomap-synthetic"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        type=_param,
        metavar="KEY=VALUE",
        help="a PatchCore parameter (JSON value)",
    )
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", str(n)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"done N={n}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.out:
        from anomap._io import write_text

        write_text(args.out, json.dumps(rows, indent=2))


def _param(text: str) -> str:
    key, _, value = text.partition("=")
    try:
        return json.dumps([key, json.loads(value)])
    except json.JSONDecodeError:
        return json.dumps([key, value])


def print_table(rows: list[dict]) -> None:
    keys = [
        k
        for k in (
            "n",
            "fit_s",
            "features_s",
            "coreset_s",
            "threshold_s",
            "fit_ms_per_image",
            "predict_ms",
            "peak_rss_gb",
            "bank",
            "search",
            "image_auroc",
            "pixel_auroc",
            "aupro",
        )
        if k in rows[0]
    ]
    print("command: python " + " ".join(sys.argv))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
