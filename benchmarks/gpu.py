"""PatchCore on a CUDA GPU: model throughput, mixed-precision agreement, fit time, and end-to-end
throughput from PNG files.

    python benchmarks/gpu.py                      # wide_resnet50_2, random weights, 256 px
    python benchmarks/gpu.py --fit-images 1000 --batch 256 --out gpu.json

Speed does not depend on the weights' values, so the backbone has random weights and the images
are synthetic (smooth textures; half of the test images carry a bright or dark blob).

1. Model throughput: preprocessed (B, 3, 256, 256) batches already on the GPU -> image scores and
   anomaly maps on the GPU (`PatchCore.score_batch`), bank from 200 images at coreset 0.1, for
   precision fp32 / fp16 / bf16 (autocast backbone + half-precision search with fp32 re-ranking).
2. Agreement: Spearman rank correlation of each precision's image scores with fp32's.
3. Fit: `fit` on `--fit-images` images already on the GPU, with the leave-out threshold on one image
   (features + coreset) and with the default 200 threshold images; and with the random sampler
   instead of the coreset, which leaves the features' share.
4. End to end: `predict` on PNG files written to a temporary folder, and the decoding alone
   (`anomap.data.iter_batches`), which shows what bounds it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr

from anomap import PatchCore
from anomap.data import iter_batches


def textures(n: int, size: int, seed: int, device: str, blobs: bool = False) -> torch.Tensor:
    """(n, 3, size, size) smooth random textures in about [-2, 2]; with `blobs`, every second image
    has a bright or dark disc."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, size // 16, size // 16, generator=gen)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    if blobs:
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        for i in range(1, n, 2):
            cy, cx, r = torch.randint(20, size - 20, (2,), generator=gen).tolist() + [
                int(torch.randint(4, 16, (1,), generator=gen))
            ]
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            x[i, :, disc] += 3.0 if i % 4 == 1 else -3.0
    return x.clamp_(-2.5, 2.5).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(det: PatchCore, batch: torch.Tensor, repeats: int, device: str) -> float:
    """Images per second of `score_batch` on one resident batch, after two warm-up passes."""
    for _ in range(2):
        det.score_batch(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        det.score_batch(batch)
    sync(device)
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def backbone_throughput(det: PatchCore, batch: torch.Tensor, repeats: int, device: str) -> float:
    """Images per second of the backbone alone (the part of `score_batch` before the search)."""
    for _ in range(2):
        det.encoder_.features(batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        det.encoder_.features(batch)
    sync(device)
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def set_precision(det: PatchCore, precision: str) -> None:
    """Switch a fitted detector's precision (the bank stays the same)."""
    det.precision = det.encoder_.precision = precision
    det._half_bank = None


def timed_fit(params: dict, images: torch.Tensor, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    PatchCore(**params).fit(images)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="wide_resnet50_2")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bank-images", type=int, default=200)
    ap.add_argument("--fit-images", type=int, default=1000)
    ap.add_argument("--png-images", type=int, default=2000)
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = args.device
    base = dict(backbone=args.backbone, weights="random", image_size=args.size, device=dev, coreset_ratio=0.1)
    res: dict = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
    }

    det = PatchCore(**base, batch_size=64).fit(textures(args.bank_images, args.size, 0, dev))
    res["bank"] = det.memory_bank_.shape[0]
    batch = textures(args.batch, args.size, 1, dev)
    test = textures(512, args.size, 2, dev, blobs=True)
    reference = None
    for precision in ("fp32", "fp16", "bf16"):
        set_precision(det, precision)
        res[f"model_img_s_{precision}"] = throughput(det, batch, args.repeats, dev)
        res[f"backbone_img_s_{precision}"] = backbone_throughput(det, batch, args.repeats, dev)
        scores = torch.cat([det.score_batch(b)[0] for b in test.split(args.batch)]).cpu().numpy()
        if reference is None:
            reference = scores
        res[f"rank_corr_{precision}"] = float(spearmanr(reference, scores).statistic)
        print(
            f"{precision}: {res[f'model_img_s_{precision}']:.0f} img/s (backbone alone "
            f"{res[f'backbone_img_s_{precision}']:.0f} img/s), rank corr with fp32 "
            f"{res[f'rank_corr_{precision}']:.5f}",
            flush=True,
        )

    fit_images = textures(args.fit_images, args.size, 3, dev)
    for precision in ("fp32", "fp16"):
        params = dict(base, precision=precision, batch_size=128)
        res[f"fit_s_{precision}"] = timed_fit(dict(params, threshold_images=1), fit_images, dev)
        res[f"fit_s_{precision}_with_threshold"] = timed_fit(params, fit_images, dev)
        res[f"fit_s_{precision}_random_sampler"] = timed_fit(
            dict(params, threshold_images=1, sampler="random"), fit_images, dev
        )
        print(
            f"fit {args.fit_images} images {precision}: features + coreset {res[f'fit_s_{precision}']:.1f} s "
            f"(features + random sampler {res[f'fit_s_{precision}_random_sampler']:.1f} s), "
            f"with the 200-image threshold {res[f'fit_s_{precision}_with_threshold']:.1f} s",
            flush=True,
        )
    del fit_images

    set_precision(det, "fp16")
    det.batch_size = det.encoder_.batch_size = 128
    with tempfile.TemporaryDirectory() as tmp:
        pixels = (textures(args.png_images, args.size, 4, "cpu", blobs=True) * 50 + 128).clamp(0, 255)
        paths = []
        for i, img in enumerate(pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()):
            paths.append(str(Path(tmp) / f"{i:05d}.png"))
            Image.fromarray(img).save(paths[-1])
        start = time.perf_counter()
        for _ in iter_batches(paths, det.preprocess_, batch_size=128):
            pass
        res["decode_img_s"] = len(paths) / (time.perf_counter() - start)
        start = time.perf_counter()
        det.predict(paths)
        res["end_to_end_img_s"] = len(paths) / (time.perf_counter() - start)
    print(
        f"from PNG files: decoding alone {res['decode_img_s']:.0f} img/s, predict end to end "
        f"{res['end_to_end_img_s']:.0f} img/s",
        flush=True,
    )
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
