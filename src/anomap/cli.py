"""The `anomap` command: parses arguments, calls the public API, prints results.

Every error anomap raises on purpose becomes one line on stderr and exit status 2 (1 for other
failures); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__, bench_report, benchmark, load, protocol, report, runs, shift
from .detectors import methods
from .errors import AnomapError

EXIT_ERROR = 2


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


def _fit_params(args: argparse.Namespace) -> dict:
    """Only the options the user gave, so each method keeps its own defaults for the rest."""
    given = {
        "backbone": args.backbone,
        "weights": args.weights,
        "layers": args.layers,
        "image_size": args.image_size,
        "crop": args.crop,
        "coreset_ratio": args.coreset_ratio,
        "device": args.device,
        "seed": args.seed,
    }
    params = {k: v for k, v in given.items() if v is not None}
    params.update(dict(args.param or []))
    return params


def cmd_fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    if args.split_seed is None:
        det = runs.fit_category(args.data, args.category, args.method, **_fit_params(args))
    else:
        det = protocol.fit_train_split(args.data, args.category, args.split_seed, args.method, **_fit_params(args))
    det.save(out)
    print(f"saved {det.method} model to {out} (threshold {det.threshold_:.6g})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_used_folder(out, args.overwrite)
    det = load(args.model, device=args.device)
    csv_path, pred, skipped = runs.predict_paths(det, args.paths, out, skip_bad=args.skip_bad)
    flagged = 0 if pred.labels is None else int(pred.labels.sum())
    print(f"scored {len(pred.scores)} images, {flagged} anomalous; wrote {csv_path} and pictures in {out}")
    if skipped:
        print(f"skipped {len(skipped)} unusable images, listed in {out / 'skipped.csv'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        _refuse_used_folder(out, args.overwrite)
    if args.zip:
        if out is None:
            raise AnomapError("--zip archives the run folder, so it needs --out DIR")
        _refuse_existing(report.zip_path(out), args.overwrite)
    det = load(args.model, device=args.device)
    result = runs.evaluate_to_folder(det, args.data, args.category, out)
    archive = report.write_zip(out) if args.zip else None
    if args.json:
        print(json.dumps(result))
    else:
        _print_metrics(result)
        if out is not None:
            print(f"results in {out}; report: {out / 'report.html'}")
        if archive is not None:
            print(f"archive: {archive}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if (args.run_dir / "results.json").is_file():
        path = bench_report.write_benchmark_report(args.run_dir)
    else:
        path = report.write_report(args.run_dir)
    print(f"report: {path}")
    if args.zip:
        print(f"archive: {report.write_zip(args.run_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_used_folder(out, args.overwrite)
    result = runs.demo(out, device=args.device or "auto", root=args.data, category=args.category)
    print(f"anomap demo: PatchCore (efficientnet_lite0) on {args.category}")
    _print_metrics(result)
    print(f"model, metrics and heatmaps in {out}")
    print(f"report: {out / 'report.html'}")
    return 0


def _print_metrics(result: dict) -> None:
    for key in ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "f1", "precision", "recall", "accuracy", "threshold"):
        value = result.get(key)
        print(f"  {key:12s} {'n/a' if value is None else f'{value:.4f}'}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    old, new = protocol.calibrate_file(args.model, args.data, args.category, args.method, args.seed, args.k,
                                       device=args.device)
    before = "none" if old is None else f"{old:.6g}"
    print(f"{args.model}: threshold {before} -> {new:.6g} ({args.method} on the validation split, seed {args.seed})")
    return 0


def cmd_shift(args: argparse.Namespace) -> int:
    folder = shift.shift_category(args.data, args.category, args.out, args.seed, overwrite=args.overwrite)
    print(f"wrote the shifted copy of {args.category} (seed {args.seed}) to {folder}")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out / "results.json", args.overwrite)
    given = {"backbone": args.backbone, "image_size": args.image_size, "device": args.device}
    params = {k: v for k, v in given.items() if v is not None} | dict(args.param or [])
    result = benchmark.run_benchmark(
        args.data, args.categories.split(","), args.methods.split(","), out, params=params, seeds=args.seeds,
        shift=args.shift, unified=args.unified, threshold=args.threshold, k=args.k)
    print("split sizes (normal+anomalous):\n" + benchmark.format_splits(result["splits"]) + "\n")
    print(benchmark.format_table(result["summary"]))
    print(f"results in {out / 'results.csv'} and {out / 'results.json'}; report: {out / 'report.html'}")
    return 0


def _add_protocol_commands(sub) -> None:
    cal = sub.add_parser("calibrate", help="set a model's threshold on the category's validation split")
    cal.add_argument("model")
    cal.add_argument("--data", required=True)
    cal.add_argument("--category", required=True)
    cal.add_argument("--method", default="f1", choices=protocol.THRESHOLDS)
    cal.add_argument("--k", type=float, default=3.0, help="sigma multiplier of --method sigma")
    cal.add_argument("--seed", type=int, default=42, help="seed of the split")
    cal.add_argument("--device", choices=["cpu", "cuda", "auto"])
    cal.set_defaults(func=cmd_calibrate)

    sh = sub.add_parser("shift", help="write a domain-shifted copy of a category in MVTec AD layout")
    sh.add_argument("--data", required=True)
    sh.add_argument("--category", required=True)
    sh.add_argument("--out", required=True, help="root folder of the shifted copy")
    sh.add_argument("--seed", type=int, default=42)
    sh.add_argument("--overwrite", action="store_true", help="replace existing shifted images")
    sh.set_defaults(func=cmd_shift)

    bench = sub.add_parser("benchmark", help="methods x categories under the evaluation protocol")
    bench.add_argument("--data", required=True)
    bench.add_argument("--categories", required=True, help="comma-separated")
    bench.add_argument("--methods", default="patchcore", help=f"comma-separated, from {', '.join(methods())}")
    bench.add_argument("--backbone")
    bench.add_argument("--image-size", type=int)
    bench.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="any other method parameter")
    bench.add_argument("--shift", action="store_true", help="add the domain-shift settings")
    bench.add_argument("--unified", action="store_true", help="add one model fitted on all categories")
    bench.add_argument("--seeds", type=_ints, default=[42], help="comma-separated, e.g. 42,43")
    bench.add_argument("--threshold", default="f1", choices=protocol.THRESHOLDS)
    bench.add_argument("--k", type=float, default=3.0, help="sigma multiplier of --threshold sigma")
    bench.add_argument("--out", required=True)
    bench.add_argument("--device", choices=["cpu", "cuda", "auto"])
    bench.add_argument("--overwrite", action="store_true", help="replace existing results")
    bench.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomap", description="Visual anomaly detection and localization.")
    parser.add_argument("--version", action="version", version=f"anomap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on <data>/<category>/train/good")
    fit.add_argument("--data", required=True, help="root folder in MVTec AD layout")
    fit.add_argument("--category", required=True)
    fit.add_argument("--out", required=True, help="model file to write")
    fit.add_argument("--method", default="patchcore", choices=methods())
    fit.add_argument("--backbone")
    fit.add_argument("--weights", help="'imagenet' (default), 'random' or a local weights file")
    fit.add_argument("--layers", nargs="+")
    fit.add_argument("--image-size", type=int)
    fit.add_argument("--crop", type=int, help="center crop after resizing (default: none)")
    fit.add_argument("--coreset-ratio", type=float)
    fit.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="any other method parameter")
    fit.set_defaults(func=cmd_fit)

    pred = sub.add_parser("predict", help="score images or folders with a saved model")
    pred.add_argument("model")
    pred.add_argument("paths", nargs="+")
    pred.add_argument("--out", required=True, help="folder for scores.csv and pictures")
    pred.add_argument("--skip-bad", action="store_true",
                      help="skip unusable images with a warning (listed in skipped.csv) instead of stopping")
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="all metrics on <data>/<category>/test")
    ev.add_argument("model")
    ev.add_argument("--data", required=True)
    ev.add_argument("--category", required=True)
    ev.add_argument("--out", help="folder for metrics.json and pictures")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder")
    ev.set_defaults(func=cmd_evaluate)

    rep = sub.add_parser("report", help="rebuild DIR/report.html (and its plots) from a run folder's saved results")
    rep.add_argument("run_dir", metavar="DIR", type=Path,
                     help="folder written by `anomap evaluate --out DIR` or `anomap benchmark --out DIR`")
    rep.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder (replaced)")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="fit and evaluate PatchCore on the bundled demo data")
    demo.add_argument("--out", default="anomap-demo")
    demo.add_argument("--data", default=str(runs.demo_root()), help="default: the bundled demo data")
    demo.add_argument("--category", default="hazelnut_toy")
    demo.set_defaults(func=cmd_demo)

    for p in (fit, pred, ev, demo):
        p.add_argument("--device", choices=["cpu", "cuda", "auto"])
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    fit.add_argument("--seed", type=int)
    fit.add_argument("--split-seed", type=int, help="fit only on the train part of the protocol split with "
                     "this seed, leaving the validation images unseen for `anomap calibrate`")
    _add_protocol_commands(sub)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="anomap: %(message)s")
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
        print(f"anomap: internal error: {type(err).__name__}: {_one_line(err)} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
