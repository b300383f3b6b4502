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

from . import __version__, load, runs
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
    if path.exists() and not overwrite:
        raise AnomapError(f"{path} already exists; pass --overwrite to replace it")


def _fit_params(args: argparse.Namespace) -> dict:
    """Only the options the user gave, so each method keeps its own defaults for the rest."""
    given = {
        "backbone": args.backbone,
        "weights": args.weights,
        "layers": args.layers,
        "image_size": args.image_size,
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
    det = runs.fit_category(args.data, args.category, args.method, **_fit_params(args))
    det.save(out)
    print(f"saved {det.method} model to {out} (threshold {det.threshold_:.6g})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out / "scores.csv", args.overwrite)
    det = load(args.model, device=args.device)
    csv_path, pred = runs.predict_paths(det, args.paths, out)
    flagged = 0 if pred.labels is None else int(pred.labels.sum())
    print(f"scored {len(pred.scores)} images, {flagged} anomalous; wrote {csv_path} and pictures in {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        _refuse_existing(out / "metrics.json", args.overwrite)
    det = load(args.model, device=args.device)
    result = runs.evaluate_to_folder(det, args.data, args.category, out)
    if args.json:
        print(json.dumps(result))
    else:
        _print_metrics(result)
        if out is not None:
            print(f"results in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out / "model.anomap", args.overwrite)
    result = runs.demo(out, device=args.device or "auto", root=args.data, category=args.category)
    print(f"anomap demo: PatchCore (efficientnet_lite0) on {args.category}")
    _print_metrics(result)
    print(f"model, metrics and heatmaps in {out}")
    return 0


def _print_metrics(result: dict) -> None:
    for key in ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "f1", "precision", "recall", "accuracy", "threshold"):
        value = result.get(key)
        print(f"  {key:12s} {'n/a' if value is None else f'{value:.4f}'}")


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
    fit.add_argument("--coreset-ratio", type=float)
    fit.add_argument("--param", type=_param, action="append", metavar="KEY=VALUE", help="any other method parameter")
    fit.set_defaults(func=cmd_fit)

    pred = sub.add_parser("predict", help="score images or folders with a saved model")
    pred.add_argument("model")
    pred.add_argument("paths", nargs="+")
    pred.add_argument("--out", required=True, help="folder for scores.csv and pictures")
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="all metrics on <data>/<category>/test")
    ev.add_argument("model")
    ev.add_argument("--data", required=True)
    ev.add_argument("--category", required=True)
    ev.add_argument("--out", help="folder for metrics.json and pictures")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="fit and evaluate PatchCore on the bundled demo data")
    demo.add_argument("--out", default="anomap-demo")
    demo.add_argument("--data", default=str(runs.demo_root()), help="default: the bundled demo data")
    demo.add_argument("--category", default="hazelnut_toy")
    demo.set_defaults(func=cmd_demo)

    for p in (fit, pred, ev, demo):
        p.add_argument("--device", choices=["cpu", "cuda", "auto"])
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    fit.add_argument("--seed", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="anomap: %(message)s")
    try:
        return args.func(args)
    except AnomapError as err:
        if args.debug:
            raise
        print(f"anomap: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, MemoryError) as err:
        if args.debug:
            raise
        print(f"anomap: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("anomap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
