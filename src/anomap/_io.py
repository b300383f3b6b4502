"""Safe writes: every output goes to a new temporary file in the same folder, then is moved into
place, so an interrupted write leaves either the old file or the new one, never half of one.

Without `overwrite`, the move is a hard link, which fails if the name exists by then: a file that
appeared while the output was being made (another program, a second `anomap fit`) is never
replaced. A full disk is one `DiskFullError` (an `AnomapError`) that names the file; the old
file stays.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AnomapError

log = logging.getLogger(__name__)

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# hard links are not supported everywhere (FAT, exFAT, some network shares)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


class DiskFullError(AnomapError):
    """The disk filled up (or a quota was reached) while writing; the target was left as it was."""

    def __init__(self, path: Path, reason: str):
        super().__init__(
            f"{path}: {reason}; nothing was written there (a previous file is kept); free some space and run again"
        )
        self.reason = reason


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = True, durable: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary file next to `path`; on success it is synced and moved to `path`.

    The parent folder is created when missing. The temporary file `.<name>.<random>.tmp` is
    created exclusively (never an existing file or a symbolic link); a killed process can leave
    it behind, never a partial file under the target name. `durable=False` skips the two fsyncs
    (file and folder), which cost more than writing a picture: the rename is still atomic, but
    after a power cut the new file may be missing or empty. Only for files that can be made
    again (pictures drawn from saved results).

    Raises:
        AnomapError: `path` exists at the end and `overwrite` is False.
        DiskFullError: the disk filled up or a quota was reached.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temporary(path)
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as for any new file
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that replaced the file (safetensors) may have left 0o600
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        _place(tmp, path, overwrite)
        if durable:
            _sync_folder(path.parent)
    except Exception as err:
        if (reason := _disk_full(err)) is None:
            raise
        raise DiskFullError(path, reason) from err
    finally:
        tmp.unlink(missing_ok=True)


def _new_temporary(path: Path) -> Path:
    stem = os.fsdecode(os.fsencode(path.name)[:200])  # names are limited to 255 bytes
    for _ in range(100):
        tmp = path.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as err:  # no inode left is a full disk too
            if (reason := _disk_full(err)) is None:
                raise
            raise DiskFullError(path, reason) from err
    raise AnomapError(f"{path.parent}: cannot create a temporary file there")  # pragma: no cover


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move `tmp` to `path`; without `overwrite`, fail if `path` exists at that moment."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AnomapError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError as err:
        if err.errno not in _NO_LINKS:
            raise
        log.debug("%s: no hard links on this file system; checking for the name just before renaming", path)
        if os.path.lexists(path):
            raise AnomapError(f"{path} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)


def _disk_full(err: BaseException) -> str | None:
    """'no space left on device' / 'disk quota exceeded' when `err` (or its cause) says so, else None.

    Some writers (safetensors) report it only in their message, as the system's own text."""
    for _ in range(8):  # the error, its cause, their causes
        if isinstance(err, DiskFullError):
            return err.reason  # from a nested write: reported again for the outer target
        if err is None or isinstance(err, AnomapError):
            return None
        if getattr(err, "errno", None) in _FULL:
            return _FULL[err.errno]
        for code, reason in _FULL.items():
            if os.strerror(code).lower() in str(err).lower():
                return reason
        err = err.__cause__ or err.__context__
    return None


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; the rename itself is still atomic
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str, overwrite: bool = True) -> None:
    """Write a UTF-8 text file atomically (see `atomic_path`).

    File names that are not valid UTF-8 (kept by Python as surrogate escapes) are written back
    as their original bytes rather than failing.
    """
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True, durable: bool = True) -> None:
    """Write a binary file atomically (see `atomic_path`)."""
    with atomic_path(path, overwrite, durable) as tmp:
        tmp.write_bytes(data)


def refuse_inside(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is one of `inputs` or lies inside one of them (after resolving
    symbolic links and `..`), whether or not the output exists yet.

    Raises:
        AnomapError: naming the output and the input.
    """
    out = Path(os.path.realpath(output))
    for given in inputs:
        inp = Path(os.path.realpath(given))
        if out == inp or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
            raise AnomapError(f"{output} is the input {given}; write the output somewhere else")
        if out.is_relative_to(inp):
            raise AnomapError(f"{output} lies inside the input {given}; write the output outside it")
