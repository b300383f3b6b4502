"""The output folder of a distributed prediction.

Results arrive in any order; they are written into `parts/` in files of a few hundred rows, each
under a temporary name and then renamed, so a stopped run leaves only whole parts. `run.json`
describes the run (model, image listing, options); a rerun of the same command reads the parts,
skips the images they hold, and adds its own. At the end the parts are joined into
`scores.parquet` (path, score, decision; in input order) and `skipped.csv`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._io import atomic_path, write_text
from ..errors import AnomapError, DataError, ScoreError

log = logging.getLogger(__name__)

RUN_FILE, PARTS, SCORES, SKIPPED = "run.json", "parts", "scores.parquet", "skipped.csv"
PART_SCHEMA = pa.schema([("index", pa.int64()), ("score", pa.float32()), ("reason", pa.string())])


@dataclass(frozen=True)
class Summary:
    """What a distributed prediction wrote: `scored` images in `out/scores.parquet`, of which
    `anomalous` at or above the threshold, `skipped` unusable ones in `out/skipped.csv`, and
    `resumed` images whose results an earlier, stopped run had already written."""

    out: Path
    scored: int
    anomalous: int
    skipped: int
    resumed: int


def text(path: str | Path) -> str:
    """A path as UTF-8 text; bytes that are not UTF-8 become backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def listing_digest(paths: Sequence[Path]) -> str:
    """SHA-256 of the image listing, to recognise a rerun over the same images."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path) + b"\0")
    return digest.hexdigest()


def open_run(out: Path, run: dict, overwrite: bool) -> set[int]:
    """Prepare `out` for the run described by `run` (JSON-able) and return the indices of the
    images already done there. A folder of another run, or with other contents, is refused unless
    `overwrite`, which starts the run again (it removes the parts and the results files only)."""
    if out.exists() and not out.is_dir():
        raise AnomapError(f"{out} is a file, not a folder; choose another --out")
    saved = out / RUN_FILE
    if overwrite:
        shutil.rmtree(out / PARTS, ignore_errors=True)
        for name in (RUN_FILE, SCORES, SKIPPED):
            (out / name).unlink(missing_ok=True)
    elif saved.is_file():
        try:
            previous = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AnomapError(f"{saved}: unreadable ({err}); pass --overwrite to start the run again") from err
        changed = sorted(k for k in run.keys() | previous.keys() if run.get(k) != previous.get(k))
        if changed:
            raise AnomapError(
                f"{out} holds a run with other {', '.join(changed)}; rerun with the same model, "
                "images and options, choose another --out, or pass --overwrite to start again"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise AnomapError(f"{out} is not empty; pass --overwrite to replace its files or choose a new --out")
    write_text(saved, json.dumps(run, indent=2, sort_keys=True))
    return set(_read_parts(out)["index"].to_numpy().tolist())


def _read_parts(out: Path) -> pa.Table:
    """Every complete part in `out/parts` (index, score, reason)."""
    tables = [pq.read_table(p, schema=PART_SCHEMA) for p in sorted((out / PARTS).glob("part-*.parquet"))]
    return pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()


class PartWriter:
    """Takes result tables (index, score, reason, ...) as they arrive, drops images already done,
    and writes the rest into `out/parts` every `rows` rows or `seconds` seconds.

    Without `skip_bad`, an unusable image stops the run with its DataError (the parts written so
    far stay, so a rerun resumes); with it, the image is logged and kept as a skipped row.
    """

    def __init__(self, out: Path, done: set[int], skip_bad: bool, rows: int = 512, seconds: float = 30.0) -> None:
        self.folder, self.done, self.skip_bad = out / PARTS, done, skip_bad
        self.rows, self.seconds = rows, seconds
        self.pending: list[pa.Table] = []
        self.count, self.since = 0, time.monotonic()

    def add(self, table: pa.Table) -> int:
        """Queue one result table; returns how many new images it held."""
        index = table["index"].to_numpy()
        fresh = np.array([i not in self.done for i in index.tolist()], dtype=bool)
        table = table.select(PART_SCHEMA.names).cast(PART_SCHEMA).filter(pa.array(fresh))
        self._check(table)
        self.done.update(index[fresh].tolist())
        self.pending.append(table)
        self.count += table.num_rows
        if self.count >= self.rows or time.monotonic() - self.since >= self.seconds:
            self.flush()
        return table.num_rows

    def _check(self, table: pa.Table) -> None:
        reasons, scores = table["reason"].to_pylist(), table["score"].to_numpy(zero_copy_only=False)
        for reason in filter(None, reasons):
            if not self.skip_bad:
                raise DataError(reason)
            log.warning("skipped %s", reason)
        good = np.array([not r for r in reasons], dtype=bool)
        if not np.isfinite(scores[good]).all():
            raise ScoreError(
                "some scores are NaN or infinite; the model file or the backbone weights are broken, refit the model"
            )

    def flush(self) -> None:
        """Write the queued rows as one part (atomically)."""
        if self.count:
            with atomic_path(self.folder / f"part-{uuid.uuid4().hex}.parquet") as tmp:
                pq.write_table(pa.concat_tables(self.pending), tmp)
        self.pending, self.count, self.since = [], 0, time.monotonic()


def consolidate(out: Path, paths: Sequence[Path], threshold: float | None, resumed: int) -> Summary:
    """Join the parts into `scores.parquet` (path, score, decision, in input order) and
    `skipped.csv` (path, reason); each image gets exactly one row in one of them."""
    table = _read_parts(out)
    index, first = np.unique(table["index"].to_numpy(), return_index=True)  # sorted: input order
    if len(index) < table.num_rows:  # only when two runs wrote into the folder at once
        log.warning("%s: %d images have two results (identical); keeping one", out, table.num_rows - len(index))
    if len(index) != len(paths):
        raise AnomapError(
            f"{out}: {len(paths) - len(index)} of {len(paths)} images have no result; "
            "rerun the same command to complete the run"
        )
    scores = table["score"].to_numpy()[first]
    reasons = np.array(table["reason"].to_pylist(), dtype=object)[first]
    good = reasons == ""
    decision = None if threshold is None else np.where(scores[good] >= threshold, "anomalous", "normal")
    with atomic_path(out / SCORES) as tmp:
        pq.write_table(
            pa.table(
                {
                    "path": [text(paths[i]) for i in index[good]],
                    "score": pa.array(scores[good], pa.float32()),
                    "decision": pa.array(
                        [None] * len(scores[good]) if decision is None else decision.tolist(), pa.string()
                    ),
                }
            ),
            tmp,
        )
    if not good.all():
        buf = io.StringIO()
        csv.writer(buf).writerows([["path", "reason"], *([str(paths[i]), r] for i, r in zip(index, reasons) if r)])
        write_text(out / SKIPPED, buf.getvalue())
    flagged = 0 if decision is None else int((decision == "anomalous").sum())
    return Summary(out, int(good.sum()), flagged, int((~good).sum()), resumed)
