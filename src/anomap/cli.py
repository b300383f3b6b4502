"""The `anomap` command: parses arguments and runs the command (`anomap.commands`).

Every error anomap raises on purpose becomes one line on stderr and exit status 2 (1 for other
failures); `--debug` shows the traceback instead.

Building the parser imports nothing heavy (torch, matplotlib, the detectors, the report): each
command imports what it uses, so `anomap --help` and `anomap --version` start at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib import import_module
from pathlib import Path

from . import __version__, commands
from .commands import printable
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
    exp.set_defaults(func=commands.cmd_export)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    srv.add_argument(
        "--max-pending",
        type=int,
        help="most prediction requests in progress at once; more get 503 (default: 4 x --max-batch)",
    )
    srv.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    srv.add_argument("--key", metavar="FILE", help=KEY_HELP)
    srv.set_defaults(func=commands.cmd_serve)


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
    cal.set_defaults(func=commands.cmd_calibrate)

    sh = sub.add_parser("shift", help="write a domain-shifted copy of a category in MVTec AD layout")
    sh.add_argument("--data", required=True, help=DATA_HELP)
    sh.add_argument("--category", required=True, help=CATEGORY_HELP)
    sh.add_argument("--out", required=True, help="root folder of the shifted copy")
    sh.add_argument("--seed", type=int, default=42, help="seed of every image's shift parameters (default 42)")
    sh.add_argument("--overwrite", action="store_true", help="replace existing shifted images")
    sh.set_defaults(func=commands.cmd_shift)

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
    bench.set_defaults(func=commands.cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomap", description="Visual anomaly detection and localization.")
    parser.add_argument("--version", action="version", version=f"anomap {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="run `anomap COMMAND --help` for its options"
    )
    fit, pred = _add_fit_command(sub), _add_predict_command(sub)
    _add_evaluate_command(sub)
    _add_report_command(sub)
    _add_demo_command(sub)
    _add_engine_options(fit, pred)
    _add_protocol_commands(sub)
    _add_serve_command(sub)
    _add_export_command(sub)
    return parser


def _add_device_and_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help=DEVICE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_fit_command(sub) -> argparse.ArgumentParser:
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
    fit.set_defaults(func=commands.cmd_fit)
    _add_device_and_overwrite(fit)
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
    return fit


def _add_predict_command(sub) -> argparse.ArgumentParser:
    pred = sub.add_parser("predict", help="score images or folders with a saved model")
    pred.add_argument("model", help=MODEL_HELP)
    pred.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    pred.add_argument("--out", required=True, help="folder for scores.csv and pictures")
    pred.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unusable images with a warning (listed in skipped.csv) instead of stopping",
    )
    pred.set_defaults(func=commands.cmd_predict)
    _add_device_and_overwrite(pred)
    pred.add_argument("--key", metavar="FILE", help=KEY_HELP)
    return pred


def _add_evaluate_command(sub) -> None:
    ev = sub.add_parser("evaluate", help="all metrics on <data>/<category>/test")
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--data", required=True, help=DATA_HELP)
    ev.add_argument("--category", required=True, help=CATEGORY_HELP)
    ev.add_argument("--out", help="folder for metrics.json and pictures")
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder")
    ev.set_defaults(func=commands.cmd_evaluate)
    _add_device_and_overwrite(ev)
    ev.add_argument("--key", metavar="FILE", help=KEY_HELP)


def _add_report_command(sub) -> None:
    rep = sub.add_parser("report", help="rebuild DIR/report.html (and its plots) from a run folder's saved results")
    rep.add_argument(
        "run_dir",
        metavar="DIR",
        type=Path,
        help="folder written by `anomap evaluate --out DIR` or `anomap benchmark --out DIR`",
    )
    rep.add_argument("--zip", action="store_true", help="also write DIR.zip with the whole run folder")
    rep.add_argument("--overwrite", action="store_true", help="replace an existing DIR.zip")
    rep.set_defaults(func=commands.cmd_report)


def _add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="fit and evaluate PatchCore on the bundled demo data")
    demo.add_argument("--out", default="anomap-demo", help="folder for the model and the run (default %(default)s)")
    demo.add_argument("--data", help="root folder in MVTec AD layout (default: the bundled demo data)")
    demo.add_argument("--category", default="hazelnut_toy", help=CATEGORY_HELP + " (default %(default)s)")
    demo.set_defaults(func=commands.cmd_demo)
    _add_device_and_overwrite(demo)


def _one_line(err: BaseException) -> str:
    return printable(str(err))


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


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
