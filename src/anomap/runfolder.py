"""A run folder read as untrusted input: it may have been made by someone else and shared.

`read_run` is the one way in for the report (`anomap.report` describes the files). It checks:

- each JSON file is a regular file in the folder itself (not a symbolic link, FIFO or device),
  at most `MAX_JSON_BYTES`, UTF-8, nested at most `MAX_DEPTH` deep, with integers of at most
  `MAX_INT_DIGITS` digits, no NaN or Infinity and no repeated keys;
- every value the report uses has its declared type and range (labels 0 or 1, scores and
  thresholds of magnitude at most `MAX_MAGNITUDE`, a 2 x 2 confusion matrix of counts, curves of
  rates in [0, 1], ...), and every string is text or a file name (no unpaired surrogates);
- a picture path is a relative POSIX path that resolves inside the folder through real folders
  to a regular file: no symbolic link, `..`, absolute path, drive, URL, backslash or control
  character.

`read_results` checks a benchmark folder's results.json the same way. `output_folder` and
`archive_files` keep what the report writes and archives inside the folder.
Every problem is a `DataError` naming the file and the value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 2**20
MAX_DEPTH = 32
MAX_INT_DIGITS = 20
MAX_COUNT = 10**15  # confusion-matrix cells, split sizes
MAX_MAGNITUDE = 1e100  # scores, thresholds, metrics: their differences and squares stay finite
MAX_CURVE_POINTS = 100_000
METRICS = ("image_auroc", "image_auprc", "pixel_auroc", "aupro", "f1", "precision", "recall", "accuracy", "threshold")
DECISIONS = (None, "normal", "anomalous")

_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # strings (skipped) and brackets
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


@dataclass(frozen=True)
class Run:
    """The checked contents of a run folder.

    `records` are sorted by score, highest first; each has the keys path (str), label (0 or 1),
    score (float), defect (str or None), decision (None, "normal" or "anomalous") and picture
    (a path relative to the run folder, or None).
    """

    metrics: dict
    title: str | None
    threshold: float | None
    records: list[dict]
    pixel_curves: dict | None
    model: dict | None


class _Refused(ValueError):
    """A JSON value refused while parsing."""


def read_run(folder: str | Path) -> Run:
    """Read and check metrics.json, predictions.json and the optional pixel_curves.json and
    model.json of a run folder.

    Raises:
        DataError: a required file is missing, or any file or value breaks the rules above.
    """
    folder = Path(folder)
    check = _Checker(folder / "metrics.json")
    metrics = check.metrics(read_json(check.file, required=True))
    check = _Checker(folder / "predictions.json")
    doc = check.object(read_json(check.file, required=True), "the file")
    if not isinstance(images := doc.get("images"), list) or not images:
        raise check.fail("images", "a non-empty list of image records", images)
    records = [check.record(rec, f"images[{i}]") for i, rec in enumerate(images)]
    title, threshold = check.text(doc.get("title"), "title"), check.number(doc.get("threshold"), "threshold")
    check = _Checker(folder / "pixel_curves.json")
    curves = check.curves(read_json(check.file, required=False))
    check = _Checker(folder / "model.json")
    model = check.model(read_json(check.file, required=False))
    records.sort(key=lambda r: -r["score"])
    return Run(metrics, title, threshold, records, curves, model)


def read_json(path: Path, required: bool) -> object:
    """Parse a JSON file of a run folder under the limits above; None when it is absent and not
    `required`."""
    data = _read_bytes(path, required)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
        _check_depth(text)
        value = json.loads(
            text, parse_int=_int, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object
        )
    except (UnicodeDecodeError, json.JSONDecodeError, _Refused) as err:
        raise DataError(f"{path}: unreadable ({err}); rerun the evaluation to write it again") from None
    _check_strings(path, value, "the file")
    return value


def _read_bytes(path: Path, required: bool) -> bytes | None:
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise DataError(f"{path}: a symbolic link; a run folder's files must be in the folder itself")
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        if required:
            raise DataError(
                f"{path}: not found; a run folder needs metrics.json and predictions.json "
                "(run `anomap evaluate ... --out DIR` first)"
            ) from None
        return None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path}: not a regular file; a run folder holds only regular files")
        data = fh.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise DataError(f"{path}: larger than {MAX_JSON_BYTES} bytes, the limit for a run folder's JSON files")
    return data


def _check_depth(text: str) -> None:
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} deep")
        elif token in "]}":
            depth -= 1


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are allowed")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} is out of the range of floating-point numbers")
    return value


def _constant(text: str) -> float:
    raise _Refused(f"{text} is not a number; scores and metrics must be finite")


def _object(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Refused("a key appears more than once in one object")
    return out


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def _check_strings(path: Path, value: object, where: str) -> None:
    """Every string (keys too) must be text or a file name: no unpaired surrogates."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_strings(path, key, where)
            _check_strings(path, item, f"{where}.{key}" if where != "the file" else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(path, item, f"{where}[{i}]")
    elif isinstance(value, str):
        try:
            value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise DataError(
                f"{path}: {where} holds an unpaired surrogate; only text and file names are allowed"
            ) from None


class _Checker:
    """Type and range checks for the values of one JSON file, each error naming file and value."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, what: str, value: object) -> DataError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return DataError(f"{self.file}: {where} must be {what}, got {shown}; see anomap.report for the format")

    def object(self, value: object, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "a JSON object", value)
        return value

    def array(self, value: object, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(where, "a list", value)
        return value

    def number(self, value: object, where: str, optional: bool = True) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_MAGNITUDE:
            raise self.fail(
                where,
                f"a number between -{MAX_MAGNITUDE:g} and {MAX_MAGNITUDE:g}" + (" or null" if optional else ""),
                value,
            )
        return float(value)

    def text(self, value: object, where: str, optional: bool = True) -> str | None:
        if (value is None or isinstance(value, str)) if optional else (isinstance(value, str) and value):
            return value
        raise self.fail(where, "a string or null" if optional else "a non-empty string", value)

    def record(self, rec: object, where: str) -> dict:
        rec = self.object(rec, where)
        for key in ("path", "label", "score"):
            if key not in rec:
                raise DataError(f"{self.file}: {where} lacks {key!r}; see anomap.report for the format")
        if rec["label"] not in (0, 1) or isinstance(rec["label"], (bool, float)):
            raise self.fail(f"{where}.label", "0 (normal) or 1 (anomalous)", rec["label"])
        if rec.get("decision") not in DECISIONS:
            raise self.fail(f"{where}.decision", '"normal", "anomalous" or null', rec["decision"])
        return {
            "path": self.text(rec["path"], f"{where}.path", optional=False),
            "label": rec["label"],
            "score": self.number(rec["score"], f"{where}.score", optional=False),
            "defect": self.text(rec.get("defect"), f"{where}.defect"),
            "decision": rec.get("decision"),
            "picture": self.picture(rec.get("picture"), f"{where}.picture"),
        }

    def picture(self, value: object, where: str) -> str | None:
        """A relative POSIX path that reaches a regular file inside the folder through real folders."""
        if value is None:
            return None
        parts = value.split("/") if isinstance(value, str) else []
        if (
            not parts
            or any(p in ("", ".", "..") for p in parts)
            or ":" in parts[0]
            or "\\" in value
            or _CONTROL.search(value)
        ):
            raise self.fail(
                where,
                "a relative path inside the run folder (no '..', '/' first, drive, URL, "
                "backslash or control character)",
                value,
            )
        here = self.file.parent
        for i, part in enumerate(parts):
            here = here / part
            try:
                mode = os.lstat(here).st_mode
            except OSError:
                raise self.fail(where, "a file in the run folder", value) from None
            kind = stat.S_ISREG if i == len(parts) - 1 else stat.S_ISDIR
            if stat.S_ISLNK(mode) or not kind(mode):
                raise self.fail(where, "a regular file reached through real folders (no symbolic links)", value)
        return value

    def result(self, value: object, where: str, metrics: tuple[str, ...], seed: bool) -> None:
        """One benchmark row or summary entry (see `read_results`)."""
        entry = self.object(value, where)
        for key in ("category", "method", "setting"):
            name = entry.get(key)
            if (
                not isinstance(name, str)
                or name in ("", ".", "..")
                or "/" in name
                or "\\" in name
                or _CONTROL.search(name)
            ):
                raise self.fail(f"{where}.{key}", "a file name (no '/', '..' or control character)", name)
        if seed and not (type(entry.get("seed")) is int and 0 <= entry["seed"] < 2**32):
            raise self.fail(f"{where}.seed", "an integer from 0 to 2**32 - 1", entry.get("seed"))
        if type(entry.get("seeds", 1)) is not int:
            raise self.fail(f"{where}.seeds", "a count", entry["seeds"])
        for key in metrics:
            self.number(entry.get(key), f"{where}.{key}")
            self.number(entry.get(f"{key}_std"), f"{where}.{key}_std")

    def metrics(self, value: object) -> dict:
        result = self.object(value, "the file")
        for key in METRICS:
            self.number(result.get(key), key)
        matrix = result.get("confusion_matrix")
        if not (
            isinstance(matrix, list)
            and len(matrix) == 2
            and all(isinstance(row, list) and len(row) == 2 for row in matrix)
            and all(_is_count(n) for row in matrix for n in row)
        ):
            raise self.fail("confusion_matrix", "[[TN, FP], [FN, TP]], four counts", matrix)
        return result

    def curves(self, value: object) -> dict | None:
        if value is None:
            return None
        doc = self.object(value, "the file")
        for curve, (x, y) in (("roc", ("fpr", "tpr")), ("pro", ("fpr", "pro"))):
            points = self.object(doc.get(curve), curve)
            xs, ys = points.get(x), points.get(y)
            if not (
                isinstance(xs, list)
                and isinstance(ys, list)
                and 0 < len(xs) == len(ys) <= MAX_CURVE_POINTS
                and all(type(v) in (int, float) and 0 <= v <= 1 for v in xs + ys)
            ):
                raise self.fail(
                    curve, f"{{{x!r}: [...], {y!r}: [...]}}, lists of equal length of rates in [0, 1]", points
                )
        return doc

    def model(self, value: object) -> dict | None:
        if value is None:
            return None
        doc = self.object(value, "the file")
        for key in ("method", "anomap_version"):
            self.text(doc.get(key), key)
        if doc.get("params") is not None:
            self.object(doc["params"], "params")
        self.number(doc.get("threshold"), "threshold")
        if doc.get("selection") is not None:
            self.selection(doc["selection"])
        return doc

    def selection(self, value: object) -> None:
        """The record of `--method auto` (`anomap.selection`): criterion, candidates (with their
        optional border and weights), choice and its optional validation figures."""
        doc = self.object(value, "selection")
        self.text(doc.get("criterion"), "selection.criterion")
        self.text(doc.get("note"), "selection.note")
        for key in ("method", "backbone"):
            self.text(self.object(doc.get("chosen"), "selection.chosen").get(key), f"selection.chosen.{key}", False)
        for key, number in self.object(doc.get("validation") or {}, "selection.validation").items():
            self.number(number, f"selection.validation.{key}")
        for i, c in enumerate(self.array(doc.get("candidates"), "selection.candidates")):
            where = f"selection.candidates[{i}]"
            for key in ("method", "backbone"):
                self.text(self.object(c, where).get(key), f"{where}.{key}", False)
            self.text(c.get("border"), f"{where}.border")
            for key in ("image_auroc", "pixel_auroc", "aupro", "score"):
                self.number(c.get(key), f"{where}.{key}")
            if "score_weight" in c or "map_weight" in c:
                for key in ("score_weight", "map_weight"):
                    self.number(c.get(key), f"{where}.{key}", optional=False)


def candidate_label(candidate: dict) -> str:
    """A selection candidate's method, with its edge padding when it has one: "patchcore (reflect)"."""
    border = candidate.get("border")
    return candidate["method"] if border is None else f"{candidate['method']} ({border})"


def read_results(folder: str | Path, metrics: tuple[str, ...], parts: tuple[str, ...]) -> dict:
    """Read and check a benchmark folder's results.json: `config` (an object whose categories,
    methods and seeds are lists), `rows` and `summary` (objects naming category, method and
    setting as file names, with each of `metrics` and its `_std` a number or null; rows also a
    seed), and the optional `splits` (per key, per one of `parts`, normal and anomalous counts).

    Raises:
        DataError: the file is missing, or any file or value breaks these rules or those above.
    """
    check = _Checker(Path(folder) / "results.json")
    doc = check.object(read_json(check.file, required=True), "the file")
    config = check.object(doc.get("config"), "config")
    for key in ("categories", "methods", "seeds"):
        check.array(config.get(key, []), f"config.{key}")
    for key in ("rows", "summary"):
        for i, entry in enumerate(check.array(doc.get(key), key)):
            check.result(entry, f"{key}[{i}]", metrics, seed=key == "rows")
    splits = check.object(doc.get("splits") or {}, "splits")
    for name, split in splits.items():
        for part in parts:
            counts = check.object(check.object(split, f"splits.{name}").get(part, {}), f"splits.{name}.{part}")
            for kind in ("normal", "anomalous"):
                if not (counts.get(kind) is None or _is_count(counts[kind])):
                    raise check.fail(f"splits.{name}.{part}.{kind}", "a count or null", counts[kind])
    return doc


def output_folder(folder: str | Path, name: str) -> Path:
    """`folder/name`, for the report to write into: created when missing, refused when it is a
    symbolic link (which could lead out of the folder) or not a folder."""
    path = Path(folder) / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.mkdir()
        return path
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        raise DataError(
            f"{path}: not a real folder (a symbolic link or a file); the report writes only inside "
            "the run folder: remove it and run again"
        )
    return path


def archive_files(folder: str | Path) -> list[Path]:
    """The regular files under `folder` that go into its archive, sorted: no model files
    (`*.anomap`), no hidden files or folders, and nothing reached through a symbolic link."""
    found, skipped = [], []
    for top, subfolders, names in os.walk(folder):  # os.walk does not enter linked folders
        skipped += [Path(top, d) for d in subfolders if os.path.islink(Path(top, d))]
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and not os.path.islink(Path(top, d))]
        for name in names:
            path = Path(top, name)
            if name.startswith(".") or path.suffix == ".anomap":
                continue
            (found if stat.S_ISREG(os.lstat(path).st_mode) else skipped).append(path)
    if skipped:
        log.warning("left out of the archive: %d symbolic links or special files, e.g. %s", len(skipped), skipped[0])
    return sorted(found)
