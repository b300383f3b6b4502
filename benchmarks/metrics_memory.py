"""Time and peak memory of the pixel metrics on many 256x256 maps.

Each metric runs in a fresh process so that its peak RSS is its own. The maps are float32
normal noise (nearly every pixel value distinct, the worst case for the exact curves) plus a
shift inside the masks; half of the images carry one to three rectangular defects.

    python benchmarks/metrics_memory.py --images 250 500 1000
"""

import argparse
import multiprocessing
import resource
import sys
import time

import numpy as np

from anomap.metrics import aupro, pixel_auroc

METRICS = {"pixel_auroc": pixel_auroc, "aupro": aupro}


def make_data(n_images: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Returns masks (N, size, size) bool and maps (N, size, size) float32."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for mask in masks[: n_images // 2]:
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, size - 40, size=2)
            height, width = rng.integers(4, 40, size=2)
            mask[top : top + height, left : left + width] = True
    maps = rng.standard_normal(masks.shape, dtype=np.float32)
    maps[masks] += 1.0
    return masks, maps


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(metric: str, n_images: int) -> tuple[float, float, float, float]:
    """Returns (value, seconds, peak RSS after building the data, peak RSS after the metric)."""
    masks, maps = make_data(n_images)
    data_rss = peak_rss_mib()
    start = time.perf_counter()
    value = METRICS[metric](masks, maps)
    return value, time.perf_counter() - start, data_rss, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[250, 500, 1000])
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(
        f"{'metric':<12} {'images':>6} {'pixels':>11} {'value':>8} {'seconds':>8} "
        f"{'data MiB':>9} {'peak MiB':>9} {'metric MiB':>10}"
    )
    for n_images in args.images:
        for metric in METRICS:
            with context.Pool(1) as pool:
                value, seconds, data_rss, peak = pool.apply(measure, (metric, n_images))
            print(
                f"{metric:<12} {n_images:>6} {n_images * 256 * 256:>11} {value:>8.4f} "
                f"{seconds:>8.2f} {data_rss:>9.0f} {peak:>9.0f} {peak - data_rss:>10.0f}"
            )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
