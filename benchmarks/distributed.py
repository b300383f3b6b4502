"""Scoring and fitting through anomap.distributed (Ray), measured against one process.

    python benchmarks/distributed.py cpu --data ../shared/data --category magnetic_tile --images 2000
    CUDA_VISIBLE_DEVICES=0 python benchmarks/distributed.py gpu --images 8000 --train 200
    python benchmarks/distributed.py gpu-ray --images 40000 --train 200 --gpus 1,2 [--gpu-calls 1]
    python benchmarks/distributed.py fit --images 20000 --gpus 1,2

cpu: the category's test images repeated into a listing of `--images` files; PatchCore
(efficientnet_lite0, 256 px, defaults) fitted on the first `--train` training images. Plain
`predict` in this process with 1 thread and with torch's default (scores only: what `anomap
predict` does before drawing pictures), then `anomap.distributed.predict` on a local Ray runtime
with 1 and 2 scoring workers of one thread. Ray's overhead per image: (time with 1 worker - plain
time with 1 thread) / images; the Ray times include starting the actors and loading the model.

gpu: JPEG files of synthetic 256 px textures (quality 90); wide_resnet50_2 with random weights,
256 px, fp16, bank from `--train` synthetic images at coreset 0.1. The model alone on a resident
batch; plain `predict` (host decoding with PIL, float32 maps copied back); then the Ray workers'
own code without Ray: `read_batch` (file bytes, header checks) in 8 processes and the scoring actor
(`Scorer`: nvJPEG decoding, resizing and scoring on the GPU, scores only) called from 1 to 3
threads, each thread on a CUDA stream of its own, for batches of 128 and 256.
gpu-ray: the same files and model through `anomap.distributed.predict(decode="gpu")`, one worker
per GPU, for each of `--gpus`, on `--images` / 5 and on `--images` files. Steady rate: the extra
images of the long run over its extra time (start-up cancels out); also the rows of the result
parts written after the first fifth of the images over the time they took (parts of 1,024 rows);
and the time to the first part (start-up). `--gpu-calls` sets how many batches a worker scores at
once (`anomap.distributed.scoring.GPU_CALLS`).

fit: `--images` synthetic 256 px PNG files; wide_resnet50_2 with random weights, fp16, defaults
(coreset blocks of 100,000 patches); `anomap.distributed.fit` with one worker per GPU for each
of `--gpus`: time, peak host memory of the driver (ru_maxrss), peak GPU memory of the driver's GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomap import PatchCore, distributed, load
from anomap.data import MVTecAD, list_images
from anomap.distributed import scoring
from anomap.distributed.workers import Scorer, read_batch


def timed(fn, *args, **kwargs) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steady_rate(out: Path, after: float = 0.0) -> float:
    """Images per second once results flow: the rows of the result parts written after the first
    `after` share of the images (at least the first part) over the time since that part was written."""
    import pyarrow.parquet as pq

    parts = sorted((out / "parts").glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = np.cumsum([pq.read_metadata(p).num_rows for p in parts] or [0])
    first = int(np.searchsorted(rows, after * rows[-1]))
    if len(parts) - first < 3:
        return float("nan")
    return float(rows[-1] - rows[first]) / (parts[-1].stat().st_mtime - parts[first].stat().st_mtime)


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
    plain = load(model)
    for threads in sorted({1, res["threads"]}):  # 1: as many threads as a worker has
        torch.set_num_threads(threads)
        res[f"plain_{threads}thread_s"] = timed(plain.predict, paths)
        print(
            f"plain predict, {threads} threads: {res[f'plain_{threads}thread_s']:.1f} s, "
            f"{len(paths) / res[f'plain_{threads}thread_s']:.1f} img/s",
            flush=True,
        )
    torch.set_num_threads(res["threads"])
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
    res["overhead_ms_per_image"] = 1000 * (res["ray1_s"] - res["plain_1thread_s"]) / len(paths)
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


def worker_stream(scorer: Scorer, readers: Executor, preprocess, paths: list[Path], batch: int, threads: int):
    """The Ray workers' code without Ray: `read_batch` on `readers`, `scorer` called from
    `threads` threads. Returns the (N,) scores."""
    rows = [
        {"start": np.array([s]), "files": np.array([b"\0".join(map(os.fsencode, paths[s : s + batch]))], object)}
        for s in range(0, len(paths), batch)
    ]
    with ThreadPoolExecutor(threads) as scorers:
        read = [readers.submit(read_batch, row, preprocess, True) for row in rows]
        scored = [scorers.submit(lambda f: scorer(f.result()), f) for f in read]
        return np.concatenate([f.result()["score"] for f in scored])


def scoring_setup(args: argparse.Namespace, work: Path) -> tuple[PatchCore, Path, list[Path]]:
    """The fitted detector, its model file and the JPEG files to score."""
    torch.backends.cudnn.benchmark = True
    params = dict(
        backbone=args.backbone,
        weights="random",
        image_size=256,
        device=args.device,
        precision="fp16" if args.device == "cuda" else "fp32",
        batch_size=args.batch,
    )
    det = PatchCore(**params).fit(write_images(work / "train", args.train, 256, ".png"))
    return det, det.save(work / "model.anomap"), write_images(work / "jpeg", args.images, 256, ".jpg")


def gpu(args: argparse.Namespace, work: Path) -> dict:
    det, model, paths = scoring_setup(args, work)
    res = {"images": len(paths), "batch": args.batch, "bank": det.memory_bank_.shape[0]}
    resident = torch.randn(args.batch, 3, 256, 256, device=det.device_)
    det.score_batch(resident)
    res["model_img_s"] = 20 * args.batch / timed(lambda: [det.score_batch(resident) for _ in range(20)])
    print(f"model alone: {res['model_img_s']:.0f} img/s", flush=True)
    scorer = Scorer(str(model), None, gpus=int(args.device == "cuda"), threads=4, raw=True, maps=False)
    with ProcessPoolExecutor(8, mp_context=multiprocessing.get_context("spawn")) as readers:
        worker_stream(scorer, readers, det.preprocess_, paths[: 16 * 128], 128, 2)  # warm-up: processes, cuDNN
        for batch in (128, 256):
            for threads in (1, 2, 3):
                rate = len(paths) / timed(worker_stream, scorer, readers, det.preprocess_, paths, batch, threads)
                res[f"workers_code_b{batch}_t{threads}_img_s"] = rate
                print(f"worker code, batches of {batch}, {threads} scoring threads: {rate:.0f} img/s", flush=True)
    res["plain_predict_img_s"] = len(paths) / timed(det.predict, paths)
    return res


def ray_run(model: Path, folder: Path, out: Path, workers: int, gpus: int) -> float:
    """Seconds `anomap.distributed.predict` takes on `folder`, GPU decoding, `workers` workers."""
    return timed(
        distributed.predict,
        model,
        [folder],
        out,
        workers=workers,
        gpus_per_worker=gpus,
        decode="gpu",
        cpus_per_worker=2,
        part_size=1024,
    )


def gpu_ray(args: argparse.Namespace, work: Path) -> dict:
    import ray

    _, model, paths = scoring_setup(args, work)
    short, warm = work / "short", work / "warm"  # the first fifth of the files; a warm-up run's few
    for folder, n in ((short, len(paths) // 5), (warm, 4 * args.batch)):
        folder.mkdir()
        for p in paths[:n]:
            os.symlink(p, folder / p.name)
    res = {"images": len(paths), "short_images": len(paths) // 5, "batch": args.batch}
    ray.init(include_dashboard=False, logging_level="WARNING")
    gpus = 1 if args.device == "cuda" else 0
    ray_run(model, warm, work / "warm_out", max(args.gpus), gpus)  # first worker start-up, compiled files
    for workers in args.gpus:
        t_short = ray_run(model, short, work / f"short{workers}", workers, gpus)
        started = time.time()
        t_long = ray_run(model, work / "jpeg", work / f"ray{workers}", workers, gpus)
        first_part = min(p.stat().st_mtime for p in (work / f"ray{workers}" / "parts").glob("*.parquet"))
        figures = {
            "end_to_end_img_s": len(paths) / t_long,
            "short_end_to_end_img_s": res["short_images"] / t_short,
            "steady_img_s": (len(paths) - res["short_images"]) / (t_long - t_short),
            "parts_steady_img_s": steady_rate(work / f"ray{workers}", after=0.2),
            "long_s": t_long,
            "first_part_s": first_part - started,
            "short_s": t_short,
        }
        res |= {f"ray_{workers}gpu_{k}": v for k, v in figures.items()}
        print(f"ray, {workers} workers: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
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
            backbone=args.backbone,
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
    ap.add_argument("--backbone", default="wide_resnet50_2", help="gpu, gpu-ray, fit")
    ap.add_argument("--device", default="cuda", help="gpu, gpu-ray, fit: cuda (cpu only to try the script)")
    ap.add_argument("--gpus", type=lambda t: [int(v) for v in t.split(",")], default=[1], help="e.g. 1,2")
    ap.add_argument("--gpu-calls", type=int, help="gpu-ray: batches a worker scores at once (default: the library's)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    scoring.GPU_CALLS = args.gpu_calls or scoring.GPU_CALLS
    with tempfile.TemporaryDirectory() as tmp:
        res = {"cpu": cpu, "gpu": gpu, "gpu-ray": gpu_ray, "fit": fit}[args.what](args, Path(tmp))
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
