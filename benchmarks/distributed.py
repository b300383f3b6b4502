"""Scoring and fitting through anomap.distributed (Ray), measured against one process.

    python benchmarks/distributed.py cpu --data ../shared/data --category magnetic_tile --images 2000
    python benchmarks/distributed.py gpu --images 8000
    python benchmarks/distributed.py gpu-ray --images 8000 --gpus 1,2
    python benchmarks/distributed.py fit --images 20000 --gpus 1,2

cpu: the category's test images repeated into a listing of `--images` files; PatchCore
(efficientnet_lite0, 256 px, defaults) fitted on the first `--train` training images. Plain
`predict` in this process (scores only: what `anomap predict` does before drawing pictures), then
`anomap.distributed.predict` on a local Ray runtime with 1 and 2 scoring workers of one thread.
Ray's overhead per image: (time with 1 worker - plain time) / images; the Ray times include
starting the actors and loading the model in each.

gpu: JPEG files of synthetic 256 px textures (quality 90); wide_resnet50_2 with random weights,
256 px, fp16, bank from 200 images at coreset 0.1. The model alone on a resident batch; plain
`predict` (host decoding with PIL, float32 maps copied back); the JPEG files read by 8 threads and
decoded on the GPU with nvJPEG (`anomap.distributed.jpeg.decode_jpegs`), scores only.
gpu-ray: the same files and model through `anomap.distributed.predict(decode="gpu")`, one worker
per GPU, for each of `--gpus`.

fit: `--images` synthetic 256 px PNG files; wide_resnet50_2 with random weights, fp16, defaults
(coreset blocks of 100,000 patches); `anomap.distributed.fit` with one worker per GPU for each
of `--gpus`: time, peak host memory of the driver (ru_maxrss), peak GPU memory of the driver's GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomap import PatchCore, distributed, load  # Ray is imported on first use of distributed.*
from anomap.data import MVTecAD, list_images
from anomap.distributed.jpeg import decode_jpegs


def timed(fn, *args, **kwargs) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steady_rate(out: Path) -> float:
    """Images per second once results flow: the rows of every result part after the first over
    the time between the first part's writing and the last's (start-up left out)."""
    import pyarrow.parquet as pq

    parts = sorted((out / "parts").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(parts) < 3:
        return float("nan")
    rows = sum(pq.read_metadata(p).num_rows for p in parts[1:])
    return rows / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def cpu(args: argparse.Namespace, work: Path) -> dict:
    test = list_images([Path(args.data) / args.category / "test"])
    folder = work / "images"  # links with distinct names: each repeated file counts as an image
    folder.mkdir()
    for i in range(args.images):
        os.symlink(test[i % len(test)].resolve(), folder / f"{i:05d}{test[i % len(test)].suffix}")
    paths = list_images([folder])
    train = MVTecAD(args.data, args.category).train[: args.train]
    det = PatchCore(backbone="efficientnet_lite0", device="cpu").fit(train)
    model = det.save(work / "model.anomap")
    res = {"images": len(paths), "threads": torch.get_num_threads(), "bank": det.memory_bank_.shape[0]}
    res["plain_s"] = timed(load(model).predict, paths)
    print(f"plain predict: {res['plain_s']:.1f} s, {len(paths) / res['plain_s']:.1f} img/s", flush=True)
    import ray

    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")  # 2 scorers + 1 reader
    for workers in (1, 2):
        res[f"ray{workers}_s"] = timed(
            distributed.predict, model, [folder], work / f"out{workers}", workers=workers, part_size=100
        )
        res[f"ray{workers}_steady_img_s"] = steady_rate(work / f"out{workers}")
        print(
            f"ray, {workers} workers: {res[f'ray{workers}_s']:.1f} s, {len(paths) / res[f'ray{workers}_s']:.1f} "
            f"img/s ({res[f'ray{workers}_steady_img_s']:.1f} img/s once started)",
            flush=True,
        )
    ray.shutdown()
    res["overhead_ms_per_image"] = 1000 * (res["ray1_s"] - res["plain_s"]) / len(paths)
    return res


def textures(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random textures."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 16, size // 16, generator=gen)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False) + 0.3 * torch.randn(
        n, 3, size, size, generator=gen
    )
    return (x * 50 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_images(folder: Path, n: int, size: int, suffix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:06d}{suffix}" for i in range(n)]

    def save(i: int) -> None:
        pixels = textures(1, size, i)[0]
        Image.fromarray(pixels).save(paths[i], **({"quality": 90} if suffix == ".jpg" else {}))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(save, range(n)))
    return paths


def gpu_jpeg_stream(det: PatchCore, paths: list[Path], batch: int) -> None:
    """Read the files in 8 threads, decode them on the GPU and score them; scores only."""

    def read(chunk):
        data = [np.fromfile(p, np.uint8) for p in chunk]
        return np.concatenate(data), np.array([len(d) for d in data]), np.ones(len(data), np.int64)

    with ThreadPoolExecutor(8) as pool:
        pending = deque(pool.submit(read, paths[i : i + batch]) for i in range(0, len(paths), batch))
        scores = []
        while pending:
            data, sizes, turns = pending.popleft().result()
            scores.append(det.score_batch(decode_jpegs(data, sizes, turns, det.preprocess_, det.device_))[0])
        torch.cat(scores).cpu()


def scoring_setup(args: argparse.Namespace, work: Path) -> tuple[PatchCore, Path, list[Path]]:
    """The fitted detector, its model file and the JPEG files to score."""
    torch.backends.cudnn.benchmark = True
    params = dict(
        backbone="wide_resnet50_2",
        weights="random",
        image_size=256,
        device=args.device,
        precision="fp16" if args.device == "cuda" else "fp32",
        batch_size=args.batch,
    )
    det = PatchCore(**params).fit(write_images(work / "train", args.train, 256, ".png"))
    return det, det.save(work / "model.anomap"), write_images(work / "jpeg", args.images, 256, ".jpg")


def gpu(args: argparse.Namespace, work: Path) -> dict:
    det, _, paths = scoring_setup(args, work)
    res = {"images": len(paths), "batch": args.batch, "bank": det.memory_bank_.shape[0]}
    resident = torch.randn(args.batch, 3, 256, 256, device=det.device_)
    det.score_batch(resident)
    res["model_img_s"] = 20 * args.batch / timed(lambda: [det.score_batch(resident) for _ in range(20)])
    gpu_jpeg_stream(det, paths[: 4 * args.batch], args.batch)  # warm-up: nvJPEG, cuDNN plans
    res["gpu_decode_img_s"] = len(paths) / timed(gpu_jpeg_stream, det, paths, args.batch)
    res["plain_predict_img_s"] = len(paths) / timed(det.predict, paths)
    return res


def gpu_ray(args: argparse.Namespace, work: Path) -> dict:
    import ray

    _, model, paths = scoring_setup(args, work)
    res = {"images": len(paths), "batch": args.batch}
    ray.init(include_dashboard=False, logging_level="WARNING")
    gpus = 1 if args.device == "cuda" else 0
    for workers in args.gpus:
        seconds = timed(
            distributed.predict,
            model,
            [work / "jpeg"],
            work / f"ray{workers}",
            workers=workers,
            gpus_per_worker=gpus,
            decode="gpu",
            cpus_per_worker=2,
            part_size=2048,
        )
        res[f"ray_{workers}gpu_img_s"] = len(paths) / seconds
        res[f"ray_{workers}gpu_steady_img_s"] = steady_rate(work / f"ray{workers}")
        print(
            f"ray, {workers} workers: {res[f'ray_{workers}gpu_img_s']:.0f} img/s "
            f"({res[f'ray_{workers}gpu_steady_img_s']:.0f} img/s once started)",
            flush=True,
        )
    ray.shutdown()
    return res


def fit(args: argparse.Namespace, work: Path) -> dict:
    import ray

    paths = write_images(work / "train", args.images, 256, ".png")
    res = {"images": len(paths)}
    ray.init(include_dashboard=False, logging_level="WARNING")
    cuda = args.device == "cuda"
    for gpus in args.gpus:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        det = distributed.fit(
            paths,
            workers=gpus,
            gpus_per_worker=int(cuda),
            cpus_per_worker=4 if cuda else 1,
            backbone="wide_resnet50_2",
            weights="random",
            image_size=256,
            device=args.device,
            precision="fp16" if cuda else "fp32",
            batch_size=128,
        )
        res[f"fit_{gpus}gpu_s"] = time.perf_counter() - start
        res[f"fit_{gpus}gpu_bank"] = det.memory_bank_.shape[0]
        if cuda:
            res[f"fit_{gpus}gpu_driver_gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        res["driver_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
        del det
    ray.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cpu", "gpu", "gpu-ray", "fit"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--category", default="magnetic_tile")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument(
        "--train", type=int, default=100, help="training images: cpu, the category's first N; gpu, N synthetic ones"
    )
    ap.add_argument("--batch", type=int, default=256, help="gpu: images per scoring call")
    ap.add_argument("--device", default="cuda", help="gpu, gpu-ray, fit: cuda (cpu only to try the script)")
    ap.add_argument("--gpus", type=lambda t: [int(v) for v in t.split(",")], default=[1], help="e.g. 1,2")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {"cpu": cpu, "gpu": gpu, "gpu-ray": gpu_ray, "fit": fit}[args.what](args, Path(tmp))
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
