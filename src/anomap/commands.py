"""What each `anomap` command does, once `anomap.cli` has parsed its arguments: check the
arguments, call the public API, print what was done (one escaped line per result).

Heavy modules (torch, matplotlib, the detectors, the report) are imported by the command that
uses them, so that `anomap --help` starts at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import import_module
from pathlib import Path

from ._io import atomic_path, refuse_inside
from .errors import AnomapError


def _module(name: str):
    return import_module(f".{name}", __package__)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    """Refuse an existing output file unless `overwrite`."""
    if path.exists() and not overwrite:
        raise AnomapError(f"{path} already exists; pass --overwrite to replace it")


def _refuse_used_folder(folder: Path, overwrite: bool) -> None:
    """Refuse an output folder that is a file, or a folder with contents unless `overwrite`
    (which replaces same-named files and leaves the others)."""
    if folder.exists() and not folder.is_dir():
        raise AnomapError(f"{folder} is a file, not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise AnomapError(f"{folder} is not empty; pass --overwrite to replace its files or choose a new --out")


def _read_key(path: str | None) -> bytes | None:
    """The secret held in a key file (its bytes less a trailing newline), or None without one."""
    if path is None:
        return None
    try:
        key = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise AnomapError(f"cannot read the key file {path}: {err.strerror or err}") from None
    if len(key) < 16:
        raise AnomapError(f"{path}: a key file must hold at least 16 bytes of secret, it holds {len(key)}")
    return key


def _fit_params(args: argparse.Namespace) -> dict:
    """Only the options the user gave, so each method keeps its own defaults for the rest."""
    given = {
        "backbone": args.backbone,
        "weights": args.weights,
        "layers": args.layers,
        "image_size": args.image_size,
        "crop": args.crop,
        "coreset_ratio": args.coreset_ratio,
        "batch_size": args.batch_size,
        "device": args.device,
        "seed": args.seed,
    }
    params = {k: v for k, v in given.items() if v is not None}
    params.update(dict(args.param or []))
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    key = _read_key(args.sign_key)  # an unusable key file fails before the fit, not after
    refuse_inside(out, [args.data, *([args.weights] if args.weights and Path(args.weights).is_file() else [])])
    _refuse_existing(out, args.overwrite)
    if _engine(args) == "ray":
        return _fit_ray(args, out, key)
    if args.method == "auto":
        return _fit_auto(args, out, key)
    from . import runs

    if args.split_seed is None:
        det = runs.fit_category(args.data, args.category, args.method, **_fit_params(args))
    else:
        det = runs.fit_train_split(args.data, args.category, args.split_seed, args.method, **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the fit
        det.save(tmp, key=key)
    say(f"saved {det.method} model to {out} (threshold {det.threshold_:.6g})")
    return 0


def _fit_auto(args: argparse.Namespace, out: Path, key: bytes | None) -> int:
    from . import selection

    if args.split_seed is None:
        raise AnomapError(
            "--method auto ranks its candidates on the validation part of the protocol split: give --split-seed S"
        )
    det, record = selection.fit_auto(args.data, args.category, args.split_seed, **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the selection
        selection.save_selected(det, record, tmp, key=key)
    print(selection.format_record(record))
    say(
        f"saved {det.method} ({det.backbone}) model to {out} (threshold {det.threshold_:.6g}); "
        "the selection record is in its metadata"
    )
    return 0


def _engine(args: argparse.Namespace) -> str:
    """The engine asked for; options that only Ray uses are refused without it."""
    if args.engine != "ray":
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("address", "workers", "gpus_per_worker", "decode")
            if getattr(args, k, None)
        ]
        if given:
            raise AnomapError(f"{', '.join(given)} only apply with --engine ray")
    return args.engine


def _ray_options(args: argparse.Namespace) -> dict:
    workers = 1 if args.workers is None else args.workers
    return {"workers": workers, "gpus_per_worker": args.gpus_per_worker or 0.0, "address": args.address}


def _fit_ray(args: argparse.Namespace, out: Path, key: bytes | None) -> int:
    from . import distributed  # Ray is imported only for --engine ray

    if args.method != "patchcore":
        raise AnomapError(f"--engine ray fits patchcore only, not {args.method}")
    det = distributed.fit_category(args.data, args.category, args.split_seed, **_ray_options(args), **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the fit
        det.save(tmp, key=key)
    say(f"saved patchcore model to {out} (threshold {det.threshold_:.6g}, {det.memory_bank_.shape[0]} bank entries)")
    return 0


def _predict_ray(args: argparse.Namespace) -> int:
    from . import distributed

    if args.device:
        raise AnomapError("with --engine ray the workers use GPUs when --gpus-per-worker is given; drop --device")
    summary = distributed.predict(
        args.model,
        args.paths,
        args.out,
        **_ray_options(args),
        batch_size=args.batch_size,
        pictures=args.pictures or "none",
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        decode=args.decode or "cpu",
        key=_read_key(args.key),
    )
    earlier = f" ({summary.resumed} by an earlier run)" if summary.resumed else ""
    say(
        f"scored {summary.scored + summary.skipped} images{earlier}, {summary.anomalous} anomalous; "
        f"wrote {summary.out / 'scores.parquet'}"
    )
    if summary.skipped:
        say(f"skipped {summary.skipped} unusable images, listed in {summary.out / 'skipped.csv'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_inside(out, [*args.paths, args.model])
    if _engine(args) == "ray":
        return _predict_ray(args)
    if args.batch_size:
        raise AnomapError("--batch-size only applies with --engine ray; the model's batch size is used")
    _refuse_used_folder(out, args.overwrite)
    from . import runs

    pictures = args.pictures or "both"
    scored = runs.predict_paths(
        _load_model(args.model, args.device, _read_key(args.key)),
        args.paths,
        out,
        skip_bad=args.skip_bad,
        pictures=pictures,
    )
    wrote = f"{scored.csv}" + ("" if pictures == "none" else f" and {pictures} pictures in {out}")
    say(f"scored {len(scored.scores)} images, {scored.flagged} anomalous; wrote {wrote}")
    if scored.skipped:
        say(f"skipped {len(scored.skipped)} unusable images, listed in {out / 'skipped.csv'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import report, runs

    out = Path(args.out) if args.out else None
    if out is not None:
        refuse_inside(out, [args.data, args.model])
        _refuse_used_folder(out, args.overwrite)
    if args.zip:
        if out is None:
            raise AnomapError("--zip archives the run folder, so it needs --out DIR")
        _refuse_existing(report.zip_path(out), args.overwrite)
    det = _load_model(args.model, args.device, _read_key(args.key))
    result = runs.evaluate_to_folder(det, args.data, args.category, out)
    archive = report.write_zip(out, args.overwrite) if args.zip else None
    if args.json:
        print(json.dumps(result))
    else:
        _print_metrics(result)
        if out is not None:
            say(f"results in {out}; report: {out / 'report.html'}")
        if archive is not None:
            say(f"archive: {archive}")
    return 0


def _load_model(path: str, device: str | None, key: bytes | None = None):
    """A model file (with `key`: signed with it), or an exported `.onnx` file scored through
    onnxruntime (on the CPU)."""
    if Path(path).suffix.lower() != ".onnx":
        return _module("detectors").load(path, device=device, key=key)
    if key is not None:
        raise AnomapError(f"{path}: exported files carry no signature; --key applies to model files")
    if device == "cuda":
        raise AnomapError(f"{path}: exported models run on the CPU here; leave out --device cuda")
    return _module("runtime").load(path)


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_inside(out, [args.model])
    _refuse_existing(out, args.overwrite)
    from .export import export_file

    start = time.perf_counter()
    export_file(args.model, out, format=args.format, precision=args.precision, key=_read_key(args.key))
    companion = out.with_suffix(".bin") if args.format == "openvino" else out.with_name(out.name + ".data")
    size = out.stat().st_size + (companion.stat().st_size if companion.is_file() else 0)
    say(
        f"exported {args.model} to {out} ({args.format}, {args.precision}, {size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    if args.zip:
        _refuse_existing(report.zip_path(args.run_dir), args.overwrite)
    if (args.run_dir / "results.json").is_file():
        path = report.write_benchmark_report(args.run_dir)
    else:
        path = report.write_report(args.run_dir)
    say(f"report: {path}")
    if args.zip:
        say(f"archive: {report.write_zip(args.run_dir, args.overwrite)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import runs

    out = Path(args.out)
    refuse_inside(out, [args.data or runs.demo_root()])
    _refuse_used_folder(out, args.overwrite)
    result = runs.demo(out, device=args.device or "auto", root=args.data, category=args.category)
    say(f"anomap demo: PatchCore (efficientnet_lite1) on {args.category}")
    _print_metrics(result)
    say(f"model, metrics and heatmaps in {out}")
    say(f"report: {out / 'report.html'}")
    return 0


def _print_metrics(result: dict) -> None:
    from .metric_table import RUN

    for metric in RUN:
        print(f"  {metric.key:12s} {metric.format(result.get(metric.key))}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import runs

    refuse_inside(args.model, [args.data])  # the model file is rewritten
    old, new = runs.calibrate_file(
        args.model,
        args.data,
        args.category,
        args.method,
        args.seed,
        args.k,
        device=args.device,
        key=_read_key(args.key),
    )
    before = "none" if old is None else f"{old:.6g}"
    say(f"{args.model}: threshold {before} -> {new:.6g} ({args.method} on the validation split, seed {args.seed})")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from . import shift

    folder = shift.shift_category(args.data, args.category, args.out, args.seed, overwrite=args.overwrite)
    say(f"wrote the shifted copy of {args.category} (seed {args.seed}) to {folder}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from . import benchmark

    out = Path(args.out)
    refuse_inside(out, [args.data])
    _refuse_existing(out / "results.json", args.overwrite)
    given = {"backbone": args.backbone, "image_size": args.image_size, "device": args.device}
    params = {k: v for k, v in given.items() if v is not None} | dict(args.param or [])
    result = benchmark.run_benchmark(
        args.data,
        args.categories.split(","),
        args.methods.split(","),
        out,
        params=params,
        seeds=args.seeds,
        shift=args.shift,
        unified=args.unified,
        threshold=args.threshold,
        k=args.k,
    )
    print("split sizes (normal+anomalous):\n" + benchmark.format_splits(result["splits"]) + "\n")
    print(benchmark.format_table(result["summary"]))
    say(f"results in {out / 'results.csv'} and {out / 'results.json'}; report: {out / 'report.html'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import serve  # fastapi, uvicorn and torch are imported only when serving

    serving = serve.prepare(
        args.model,
        host=args.host,
        port=args.port,
        token_file=args.token_file,
        max_batch=args.max_batch,
        max_upload_mb=args.max_upload_mb,
        max_pending=args.max_pending,
        device=args.device,
        key=_read_key(args.key),
    )
    warning = serve.exposure_warning(args.host, args.token_file is not None)
    if warning:
        say(f"anomap: warning: {warning}", file=sys.stderr)
    say(
        f"anomap: serving {serving.model.detector.method} model {args.model} on {serving.url} "
        f"(page /, API /v1, docs /docs); Ctrl-C stops",
        flush=True,
    )
    serving.run()
    print("anomap: stopped", flush=True)
    return 0


def printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\n, \\x1b, \\u202e): one line,
    and a file name cannot move the cursor or set the terminal's title."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def say(text: str, **kwargs) -> None:
    """Print one line, escaped: paths in it may hold any character."""
    print(printable(text), **kwargs)
