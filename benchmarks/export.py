"""Exported models against the torch model: predict speed from decoded images and from files,
peak memory, metrics and file size, for the torch model, the onnxruntime export and the OpenVINO
export (fp32 and fp16).

    python benchmarks/export.py --data ../shared/data --category glass_fabric
    python benchmarks/export.py --data ../shared/data --category magnetic_tile --export-only

Fits PatchCore (efficientnet_lite0, 256 px, default parameters) on the category's training images
unless --model names a model file, exports it, then scores the whole test set in one process per
runtime, so that each peak RSS is that runtime's own (the runtime processes import no torch).
Every runtime gets --threads threads; ms per image is the best of --repeats passes over the test
set, after a warm-up on two images: "decoded" from images already decoded in memory (resizing and
normalization included), "files" from the image files (decoding included, two decoding threads
one batch ahead). Metrics come from anomap.metrics on the "files" pass. Timings are wall-clock on
whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (engine, format, precision, file name)
    "torch": ("torch", None, "fp32", "model.anomap"),
    "onnxruntime": ("onnxruntime", "onnx", "fp32", "model.onnx"),
    "openvino": ("openvino", "openvino", "fp32", "model.xml"),
    "onnxruntime fp16": ("onnxruntime", "onnx", "fp16", "model-fp16.onnx"),
    "openvino fp16": ("openvino", "openvino", "fp16", "model-fp16.xml"),
}


def worker(args: argparse.Namespace) -> dict:
    """Score the images listed in --images with one runtime; save the scores and maps; timings."""
    import numpy as np

    from anomap._images import load_image

    engine, _, _, name = VARIANTS[args.worker]
    paths = json.loads(Path(args.images).read_text())
    if engine == "torch":
        import torch

        from anomap import load

        torch.set_num_threads(args.threads)
        model = load(Path(args.folder) / name, device="cpu")
    else:
        from anomap import runtime

        model = runtime.load(Path(args.folder) / name, threads=args.threads, engine=engine)
    decoded = [load_image(p) for p in paths]
    model.predict(decoded[:2])
    row = {"decoded_ms": _best_ms(lambda: model.predict(decoded), len(paths), args.repeats)}
    row["files_ms"] = _best_ms(lambda: model.predict(paths), len(paths), args.repeats)
    pred = model.predict(paths)
    row["peak_rss_gb"] = _peak_rss_gb()
    np.savez(Path(args.folder) / f"{args.worker}.npz", scores=pred.scores, maps=pred.maps)
    return row


def _peak_rss_gb() -> float:
    """Peak resident memory of this process's own image (VmHWM): unlike ru_maxrss, it does not
    carry over the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS is measured on Linux only)")


def _best_ms(run, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / n * 1000)
    return best


def export_all(model: Path, folder: Path, variants: list[str]) -> dict[str, dict]:
    """Export the model file for every variant; export seconds and bytes on disk of each."""
    from anomap.export import export_file

    rows = {"torch": {"export_s": None, "mb": model.stat().st_size / 1e6}}
    for name in variants:
        _, fmt, precision, file_name = VARIANTS[name]
        if fmt is None:
            continue
        start = time.perf_counter()
        path = export_file(model, folder / file_name, format=fmt, precision=precision)
        files = [path, path.with_suffix(".bin"), path.with_name(path.name + ".data")]
        rows[name] = {
            "export_s": time.perf_counter() - start,
            "mb": sum(f.stat().st_size for f in files if f.is_file()) / 1e6,
        }
    return rows


def measure(args: argparse.Namespace, folder: Path, det, samples, variants: list[str], rows: dict) -> None:
    """Run every variant's worker, add its timings and metrics to rows[name]."""
    import numpy as np

    from anomap import metrics
    from anomap.data import load_masks

    (folder / "images.json").write_text(json.dumps([str(s.path) for s in samples]))
    labels = np.array([s.label for s in samples])
    masks = load_masks(samples, det.preprocess_)
    for name in variants:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--folder",
            str(folder),
            "--images",
            str(folder / "images.json"),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[name] |= json.loads(out.strip().splitlines()[-1])
        saved = np.load(folder / f"{name}.npz")
        m = metrics.evaluate(labels, saved["scores"], det.threshold_, masks=masks, maps=saved["maps"])
        rows[name] |= {k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
        print(f"done {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)


def fitted(args: argparse.Namespace, folder: Path):
    """The model (fitted here unless --model is given), saved as folder/model.anomap."""
    from anomap import PatchCore, load
    from anomap.data import MVTecAD

    if args.model:
        det = load(args.model, device="cpu")
    else:
        start = time.perf_counter()
        det = PatchCore(backbone="efficientnet_lite0", image_size=args.image_size, device="cpu")
        det.fit(MVTecAD(args.data, args.category).train)
        print(f"fit: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    det.save(folder / "model.anomap")
    return det


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="root of the MVTec-layout categories")
    parser.add_argument("--category", default="glass_fabric")
    parser.add_argument("--model", help="a model file to export instead of fitting one")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--export-only", action="store_true", help="only the export time and file size")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    from anomap.data import MVTecAD

    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="anomap-export-bench-") as tmp:
        folder = Path(tmp)
        det = fitted(args, folder)
        rows = export_all(folder / "model.anomap", folder, variants)
        if not args.export_only:
            measure(args, folder, det, MVTecAD(args.data, args.category).test, variants, rows)
    print_table(rows, det)


def print_table(rows: dict[str, dict], det) -> None:
    columns = [
        ("export_s", "export s", "{:.1f}"),
        ("mb", "file MB", "{:.1f}"),
        ("decoded_ms", "ms/img decoded", "{:.1f}"),
        ("files_ms", "ms/img files", "{:.1f}"),
        ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
        ("image_auroc", "image AUROC", "{:.4f}"),
        ("pixel_auroc", "pixel AUROC", "{:.4f}"),
        ("aupro", "AUPRO", "{:.4f}"),
    ]
    columns = [c for c in columns if any(row.get(c[0]) is not None for row in rows.values())]
    print("command: python " + " ".join(sys.argv))
    print(f"model: {det!r}")
    print("| runtime | " + " | ".join(title for _, title, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        cells = ["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
