"""The `anomap` command: parses arguments, calls the public API, prints results.

Every error anomap raises on purpose becomes one line on stderr and exit status 2 (1 for other
failures); `--debug` shows the traceback instead.

Heavy modules (torch, matplotlib, the detectors, the report) are imported by the command that
uses them, so `anomap --help` and `anomap --version` start at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import import_module
from pathlib import Path

from . import __version__
from ._io import atomic_path, refuse_inside
from .errors import AnomapError

EXIT_ERROR = 2
DEVICE_HELP = (
    "where the networks run: cpu, cuda, or auto (a GPU when present); a saved model keeps "
    "its own setting unless this is given"
)
MODEL_HELP = "model file written by `anomap fit`"
KEY_HELP = "file holding the secret the model was signed with (`fit --sign-key`): refuse a model not signed with it"
DATA_HELP = "root folder in MVTec AD layout (<data>/<category>/train/good, test/<defect>, ground_truth/<defect>)"
CATEGORY_HELP = "category folder under --data"


class _Lazy(Sequence):
    """Choices looked up when argparse first checks a value or shows the command's help, so that
    building the parser imports nothing heavy. Give the option a metavar."""

    def __init__(self, lookup: Callable[[], Sequence[str]]) -> None:
        self._lookup = lookup

    def __getitem__(self, index):
        return self._lookup()[index]

    def __len__(self) -> int:
        return len(self._lookup())

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup())


def _module(name: str):
    return import_module(f".{name}", __package__)


METHODS = _Lazy(lambda: [*_module("detectors").methods(), "auto"])
THRESHOLDS = _Lazy(lambda: _module("protocol").THRESHOLDS)
PICTURES = _Lazy(lambda: _module("pictures").PICTURES)


def _param(text: str) -> tuple[str, object]:
    """Parse KEY=VALUE, the value as JSON when it is valid JSON, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


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


def _sign(path: Path, args: argparse.Namespace) -> None:
    """Sign a just-written model file with --sign-key, when given."""
    if args.sign_key:
        _module("detectors.model_file").sign(path, _read_key(args.sign_key))


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
    _read_key(args.sign_key)  # an unusable key file fails before the fit, not after
    refuse_inside(out, [args.data, *([args.weights] if args.weights and Path(args.weights).is_file() else [])])
    _refuse_existing(out, args.overwrite)
    if _engine(args) == "ray":
        return _fit_ray(args, out)
    if args.method == "auto":
        return _fit_auto(args, out)
    from . import runs

    if args.split_seed is None:
        det = runs.fit_category(args.data, args.category, args.method, **_fit_params(args))
    else:
        det = runs.fit_train_split(args.data, args.category, args.split_seed, args.method, **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the fit
        det.save(tmp)
        _sign(tmp, args)
    _say(f"saved {det.method} model to {out} (threshold {det.threshold_:.6g})")
    return 0


def _fit_auto(args: argparse.Namespace, out: Path) -> int:
    from . import selection

    if args.split_seed is None:
        raise AnomapError(
            "--method auto ranks its candidates on the validation part of the protocol split: give --split-seed S"
        )
    det, record = selection.fit_auto(args.data, args.category, args.split_seed, **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the selection
        selection.save_selected(det, record, tmp)
        _sign(tmp, args)
    print(selection.format_record(record))
    _say(
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


def _fit_ray(args: argparse.Namespace, out: Path) -> int:
    from . import distributed  # Ray is imported only for --engine ray

    if args.method != "patchcore":
        raise AnomapError(f"--engine ray fits patchcore only, not {args.method}")
    det = distributed.fit_category(args.data, args.category, args.split_seed, **_ray_options(args), **_fit_params(args))
    with atomic_path(out, args.overwrite) as tmp:  # fails if `out` appeared during the fit
        det.save(tmp)
        _sign(tmp, args)
    _say(f"saved patchcore model to {out} (threshold {det.threshold_:.6g}, {det.memory_bank_.shape[0]} bank entries)")
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
    )
    earlier = f" ({summary.resumed} by an earlier run)" if summary.resumed else ""
    _say(
        f"scored {summary.scored + summary.skipped} images{earlier}, {summary.anomalous} anomalous; "
        f"wrote {summary.out / 'scores.parquet'}"
    )
    if summary.skipped:
        _say(f"skipped {summary.skipped} unusable images, listed in {summary.out / 'skipped.csv'}")
    return 0


def _add_engine_options(fit: argparse.ArgumentParser, pred: argparse.ArgumentParser) -> None:
    for p in (fit, pred):
        p.add_argument(
            "--engine",
            choices=["local", "ray"],
            default="local",
            help="ray: spread the work over the workers of a Ray cluster (the 'ray' extra)",
        )
        p.add_argument(
            "--address",
            help="with --engine ray: the cluster, 'auto' (the one this machine is in) or "
            "ray://HOST:PORT; default: a Ray runtime started on this machine",
        )
        p.add_argument("--workers", type=int, help="with --engine ray: worker processes (default 1)")
        p.add_argument("--gpus-per-worker", type=float, help="with --engine ray: GPUs per worker (default 0)")
    fit.add_argument("--batch-size", type=int, help="images per forward pass")
    pred.add_argument(
        "--batch-size",
        type=int,
        help="with --engine ray: images per scoring call (default: the "
        "model's batch size, which gives the same scores as without Ray)",
    )
    pred.add_argument(
        "--pictures",
        choices=PICTURES,
        metavar="WHICH",
        help="per-image PNGs to write: %(choices)s; default: both (a heatmap overlay and the defect "
        "mask at the threshold), with --engine ray none",
    )
    pred.add_argument(
        "--decode",
        choices=["cpu", "gpu"],
        help="with --engine ray: where images are decoded; gpu "
        "reads JPEG files only and decodes them on the workers' GPUs",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_inside(out, [*args.paths, args.model])
    if _engine(args) == "ray":
        if args.key:  # the workers load the file checked here
            _load_model(args.model, "cpu", _read_key(args.key))
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
    _say(f"scored {len(scored.scores)} images, {scored.flagged} anomalous; wrote {wrote}")
    if scored.skipped:
        _say(f"skipped {len(scored.skipped)} unusable images, listed in {out / 'skipped.csv'}")
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
            _say(f"results in {out}; report: {out / 'report.html'}")
        if archive is not None:
            _say(f"archive: {archive}")
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
    _say(
        f"exported {args.model} to {out} ({args.format}, {args.precision}, {size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _add_export_command(sub) -> None:
    exp = sub.add_parser(
        "export", help="export a model as one graph, pixels in, scores, maps and labels out (ONNX or OpenVINO IR)"
    )
    exp.add_argument("model", help=MODEL_HELP)
    exp.add_argument(
        "--format",
        choices=["onnx", "openvino"],
        default="onnx",
        help="onnx (default; a .onnx file) or openvino (a .xml file and its .bin)",
    )
    exp.add_argument("--out", required=True, help="file to write: .onnx, or .xml for --format openvino")
    exp.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="fp16 stores the weights in float16 (half the file); both compute in float32",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.add_argument("--key", metavar="FILE", help=KEY_HELP)
    exp.set_defaults(func=cmd_export)


def cmd_report(args: argparse.Namespace) -> int:
    from . import report

    if args.zip:
        _refuse_existing(report.zip_path(args.run_dir), args.overwrite)
    if (args.run_dir / "results.json").is_file():
        path = report.write_benchmark_report(args.run_dir)
    else:
        path = report.write_report(args.run_dir)
    _say(f"report: {path}")
    if args.zip:
        _say(f"archive: {report.write_zip(args.run_dir, args.overwrite)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import runs

    out = Path(args.out)
    refuse_inside(out, [args.data or runs.demo_root()])
    _refuse_used_folder(out, args.overwrite)
    result = runs.demo(out, device=args.device or "auto", root=args.data, category=args.category)
    _say(f"anomap demo: PatchCore (efficientnet_lite1) on {args.category}")
    _print_metrics(result)
    _say(f"model, metrics and heatmaps in {out}")
    _say(f"report: {out / 'report.html'}")
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
    _say(f"{args.model}: threshold {before} -> {new:.6g} ({args.method} on the validation split, seed {args.seed})")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    from . import shift

    folder = shift.shift_category(args.data, args.category, args.out, args.seed, overwrite=args.overwrite)
    _say(f"wrote the shifted copy of {args.category} (seed {args.seed}) to {folder}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    _say(f"results in {out / 'results.csv'} and {out / 'results.json'}; report: {out / 'report.html'}")
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
        device=args.device,
        key=_read_key(args.key),
    )
    warning = serve.exposure_warning(args.host, args.token_file is not None)
    if warning:
        _say(f"anomap: warning: {warning}", file=sys.stderr)
    _say(
        f"anomap: serving {serving.model.detector.method} model {args.model} on {serving.url} "
        f"(page /, API /v1, docs /docs); Ctrl-C stops",
        flush=True,
    )
    serving.run()
    print("anomap: stopped", flush=True)
    return 0


def _add_serve_command(sub) -> None:
    srv = sub.add_parser("serve", help="serve a model over HTTP: a JSON API and a web page")
    srv.add_argument("model", help=MODEL_HELP + ", or an exported .onnx or OpenVINO .xml file")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    srv.add_argument(
        "--token-file", help="file holding a token that every /v1 call must send as 'Authorization: Bearer <token>'"
    )
    srv.add_argument("--max-batch", type=int, default=16, help="most images scored together")
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MiB")
    srv.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    srv.add_argument("--key", metavar="FILE", help=KEY_HELP)
    srv.set_defaults(func=cmd_serve)


def _add_protocol_commands(sub) -> None:
    cal = sub.add_parser("calibrate", help="set a model's threshold on the category's validation split")
    cal.add_argument("model", help=MODEL_HELP + " (rewritten with the new threshold)")
    cal.add_argument("--data", required=True, help=DATA_HELP)
    cal.add_argument("--category", required=True, help=CATEGORY_HELP)
    cal.add_argument(
        "--method",
        default="f1",
        choices=THRESHOLDS,
        metavar="METHOD",
        help="%(choices)s (default %(default)s): the F1-maximizing cut, or mean + k std of the "
        "validation normals' scores",
    )
    cal.add_argument("--k", type=float, default=3.0, help="sigma multiplier of --method sigma")
    cal.add_argument("--seed", type=int, default=42, help="seed of the split")
    cal.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    cal.add_argument("--key", metavar="FILE", help=KEY_HELP + "; the rewritten file is signed with it again")
    cal.set_defaults(func=cmd_calibrate)

    sh = sub.add_parser("shift", help="write a domain-shifted copy of a category in MVTec AD layout")
    sh.add_argument("--data", required=True, help=DATA_HELP)
    sh.add_argument("--category", required=True, help=CATEGORY_HELP)
    sh.add_argument("--out", required=True, help="root folder of the shifted copy")
    sh.add_argument("--seed", type=int, default=42, help="seed of every image's shift parameters (default 42)")
    sh.add_argument("--overwrite", action="store_true", help="replace existing shifted images")
    sh.set_defaults(func=cmd_shift)

    bench = sub.add_parser("benchmark", help="methods x categories under the evaluation protocol")
    bench.add_argument("--data", required=True, help=DATA_HELP)
    bench.add_argument("--categories", required=True, help="comma-separated category folders under --data")
    bench.add_argument(
        "--methods",
        default="patchcore",
        help="comma-separated method names (see `anomap fit --help`), or auto; default patchcore",
    )
    bench.add_argument("--backbone", help="backbone of every method that has one (default: each method's own)")
    bench.add_argument("--image-size", type=int, help="images are resized to this side (default: each method's own)")
    bench.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="any other method parameter")
    bench.add_argument("--shift", action="store_true", help="add the domain-shift settings")
    bench.add_argument("--unified", action="store_true", help="add one model fitted on all categories")
    bench.add_argument("--seeds", type=_ints, default=[42], help="comma-separated, e.g. 42,43")
    bench.add_argument(
        "--threshold",
        default="f1",
        choices=THRESHOLDS,
        metavar="METHOD",
        help="how each model's threshold is set on the validation split: %(choices)s "
        "(default %(default)s; see `anomap calibrate --help`)",
    )
    bench.add_argument("--k", type=float, default=3.0, help="sigma multiplier of --threshold sigma")
    bench.add_argument(
        "--out", required=True, help="folder for results.csv, results.json, report.html and the run folders"
    )
    bench.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    bench.add_argument("--overwrite", action="store_true", help="replace existing results")
    bench.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomap", description="Visual anomaly detection and localization.")
    parser.add_argument("--version", action="version", version=f"anomap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="run `anomap COMMAND --help` for its options"
    )

    fit = sub.add_parser("fit", help="fit a model on <data>/<category>/train/good")
    fit.add_argument("--data", required=True, help=DATA_HELP)
    fit.add_argument("--category", required=True, help=CATEGORY_HELP)
    fit.add_argument("--out", required=True, help="model file to write")
    fit.add_argument(
        "--method",
        default="patchcore",
        choices=METHODS,
        metavar="METHOD",
        help="%(choices)s (default %(default)s); auto: the best candidate on the validation split (needs --split-seed)",
    )
    fit.add_argument(
        "--backbone",
        help="pretrained network whose features are used, e.g. efficientnet_lite1 "
        "(offline) or wide_resnet50_2 (default: the method's own)",
    )
    fit.add_argument("--weights", help="'imagenet' (default), 'random' or a local weights file")
    fit.add_argument("--layers", nargs="+", help="backbone layers used, e.g. layer2 layer3 (default: the method's own)")
    fit.add_argument("--image-size", type=int, help="images are resized to this side in pixels (default 256)")
    fit.add_argument("--crop", type=int, help="center crop after resizing (default: none)")
    fit.add_argument(
        "--coreset-ratio", type=float, help="patchcore: share of the patches kept in the memory bank (default 0.1)"
    )
    fit.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="any other method parameter")
    fit.set_defaults(func=cmd_fit)

    pred = sub.add_parser("predict", help="score images or folders with a saved model")
    pred.add_argument("model", help=MODEL_HELP)
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    pred.add_argument("--out", required=True, help="folder for scores.csv and pictures")
    pred.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unusable images with a warning (listed in skipped.csv) instead of stopping",
    )
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="all metrics on <data>/<category>/test")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--data", required=True, help=DATA_HELP)
    ev.add_argument("--category", required=True, help=CATEGORY_HELP)
    ev.add_argument("--out", help="folder for metrics.json and pictures")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder")
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="rebuild DIR/report.html (and its plots) from a run folder's saved results")
    rep.add_argument(
        "run_dir",
        metavar="DIR",
        type=Path,
        help="folder written by `anomap evaluate --out DIR` or `anomap benchmark --out DIR`",
    )
    rep.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder")
    rep.add_argument("--overwrite", action="store_true", help="replace an existing DIR.zip")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="fit and evaluate PatchCore on the bundled demo data")
    demo.add_argument("--out", default="anomap-demo", help="folder for the model and the run (default %(default)s)")
    demo.add_argument("--data", help="root folder in MVTec AD layout (default: the bundled demo data)")
    demo.add_argument("--category", default="hazelnut_toy", help=CATEGORY_HELP + " (default %(default)s)")
    demo.set_defaults(func=cmd_demo)

    for p in (fit, pred, ev, demo):
        p.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    fit.add_argument("--seed", type=int, help="seeds every random choice of the method (default 42)")
    fit.add_argument(
        "--split-seed",
        type=int,
        help="fit only on the train part of the protocol split with "
        "this seed, leaving the validation images unseen for `anomap calibrate`",
    )
    fit.add_argument(
        "--sign-key",
        metavar="FILE",
        help="file holding a secret (16 bytes or more): sign the model with an HMAC-SHA256 that `--key FILE` checks",
    )
    for p in (pred, ev):
        p.add_argument("--key", metavar="FILE", help=KEY_HELP)
    _add_engine_options(fit, pred)
    _add_protocol_commands(sub)
    _add_serve_command(sub)
    _add_export_command(sub)
    return parser


def _printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\n, \\x1b, \\u202e): one line,
    and a file name cannot move the cursor or set the terminal's title."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _say(text: str, **kwargs) -> None:
    """Print one line, escaped: paths in it may hold any character."""
    print(_printable(text), **kwargs)


def _one_line(err: BaseException) -> str:
    return _printable(str(err))


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _printable(super().format(record))


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (PIL, torch) as one log line rather than Python's two-line form."""
    logging.getLogger("anomap").warning("warning from %s: %s", Path(filename).name, message)


def _set_up_logging(debug: bool) -> None:
    """Log records and warnings go to stderr as `anomap: ...` lines, escaped unless `debug`."""
    handler = logging.StreamHandler()
    handler.setFormatter((logging.Formatter if debug else _OneLineFormatter)("anomap: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:
        warnings.showwarning = _log_warning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_up_logging(args.debug)
    try:
        return args.func(args)
    except AnomapError as err:
        if args.debug:
            raise
        print(f"anomap: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, MemoryError) as err:
        if args.debug:
            raise
        print(f"anomap: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anomap: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in anomap: still one line, the traceback with --debug
        if args.debug:
            raise
        print(
            f"anomap: internal error: {type(err).__name__}: {_one_line(err)} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
