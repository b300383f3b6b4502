"""Time per image of `anomap predict` for each `--pictures` choice, on one saved model.

    python benchmarks/pictures.py MODEL ../shared/data/glass_fabric/test --repeats 3

The modes run alternately (none, mask, heatmap, both, none, ...) into fresh folders after one
warm-up run, so a change of machine load hits every mode alike; prints the median and the
spread per mode and the ratio of each to `none`. Timings are wall-clock on whatever else the
machine is doing.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from anomap import load
from anomap.data import list_images
from anomap.pictures import PICTURES
from anomap.runs import predict_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model file written by `anomap fit`")
    parser.add_argument("paths", nargs="+", help="image files and folders")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--modes", default=",".join(PICTURES), help="comma-separated --pictures choices to time")
    args = parser.parse_args()
    det = load(args.model, device=args.device)
    n = len(list_images(args.paths))
    times: dict[str, list[float]] = {mode: [] for mode in args.modes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        predict_paths(det, args.paths, Path(tmp) / "warm-up")
        for repeat in range(args.repeats):
            for mode in times:
                start = time.perf_counter()
                predict_paths(det, args.paths, Path(tmp) / f"{mode}{repeat}", pictures=mode)
                times[mode].append(1000 * (time.perf_counter() - start) / n)
                print(f"{mode} run {repeat + 1}: {times[mode][-1]:.1f} ms per image", file=sys.stderr, flush=True)
    base = statistics.median(times["none"]) if "none" in times else float("nan")
    print("command: " + shlex.join(["python", *sys.argv]))
    print(f"{n} images, {args.repeats} runs per mode\n")
    print("| --pictures | ms per image (median) | min - max | / none |\n|---|---|---|---|")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {min(values):.1f} - {max(values):.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
