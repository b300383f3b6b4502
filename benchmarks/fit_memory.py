"""Fit PatchCore on many synthetic images and report time and peak memory.

Shows that fitting streams: memory holds one block of at most `--coreset-chunk` float16 patch
features, its 128-d projection for the coreset, the bank built so far and the patches of the
threshold images, never the features of every image.

    python benchmarks/fit_memory.py --images 1000 --backbone wide_resnet50_2 --weights random \
        --device cpu --coreset-ratio 0.1
    python benchmarks/fit_memory.py --images 5000 --device cpu      # the large-set figure

Random weights are enough: memory and time do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomap import PatchCore


def synthetic_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Write `count` smooth random RGB PNGs of `size` x `size` (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if not path.exists():
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timed(phases: dict, name: str, fn):
    """Wrap `fn` so that its run time accumulates in phases[name]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            print(
                f"{name} done: {phases[name]:.1f} s in all, peak RSS {peak_rss_gb():.2f} GB",
                file=sys.stderr,
                flush=True,
            )

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--sampler", default="coreset")
    parser.add_argument("--coreset-chunk", type=int, default=250_000, help="patches per coreset block")
    parser.add_argument("--threshold-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "anomap-synthetic"))
    args = parser.parse_args()

    paths = synthetic_images(Path(args.cache) / str(args.image_size), args.images, args.image_size)
    base_rss = peak_rss_gb()
    det = PatchCore(
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        coreset_ratio=args.coreset_ratio,
        sampler=args.sampler,
        device=args.device,
        coreset_chunk=args.coreset_chunk,
        threshold_images=args.threshold_images,
        batch_size=args.batch_size,
    )
    phases: dict[str, float] = {}
    det._subsample = timed(phases, "sampler_s", det._subsample)
    det._leave_out_scores = timed(phases, "threshold_s", det._leave_out_scores)
    start = time.perf_counter()
    det.fit(paths)
    seconds = time.perf_counter() - start
    result = {
        "command": " ".join(sys.argv),
        "images": args.images,
        "threads": torch.get_num_threads(),
        "fit_seconds": round(seconds, 1),
        **{k: round(v, 1) for k, v in phases.items()},
        "features_s": round(seconds - sum(phases.values()), 1),
        "bank": list(det.memory_bank_.shape),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "rss_before_fit_gb": round(base_rss, 2),
    }
    if det.encoder_.device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
