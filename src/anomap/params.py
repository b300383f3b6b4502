"""Parameters declared once: type, allowed values and help text.

A detector declares each parameter as a dataclass field made by `param(default, check, help)`.
The same declaration checks the value when the detector is built (by the constructor, the CLI's
`--param` values or a model file's JSON), documents the CLI option, and says in one line what is
allowed when a value is refused. Checks only look at the value: nothing is allocated before they
pass. Limits on sizes keep a model file or a command line from asking for more memory than a
machine has.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ParamError

MAX_IMAGE_SIZE = 4096  # pixels per side: one float32 batch of 16 such images is 3.2 GB
MIN_IMAGE_SIZE = 32  # the stride-16 layer then still has a 2 x 2 grid
MAX_SEED = 2**32 - 1
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d{1,2})?)$")


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Int:
    """An integer in [lo, hi] (booleans and floats are refused)."""

    lo: int
    hi: int

    def describe(self) -> str:
        return f"an integer from {self.lo} to {self.hi}"

    def __call__(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise ValueError
        return int(value)


@dataclass(frozen=True)
class Float:
    """A finite number in the interval from lo to hi; `open_lo` / `open_hi` exclude the ends."""

    lo: float
    hi: float
    open_lo: bool = False
    open_hi: bool = False

    def describe(self) -> str:
        left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"a finite number in {left}{self.lo:g}, {self.hi:g}{right}"

    def __call__(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        value = float(value)
        if not math.isfinite(value):
            raise ValueError
        if (
            value < self.lo
            or value > self.hi
            or (self.open_lo and value == self.lo)
            or (self.open_hi and value == self.hi)
        ):
            raise ValueError
        return value


@dataclass(frozen=True)
class Choice:
    """One of the given strings."""

    options: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.options)

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.options:
            raise ValueError
        return value


@dataclass(frozen=True)
class Bool:
    """true or false."""

    def describe(self) -> str:
        return "true or false"

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value


@dataclass(frozen=True)
class Text:
    """A string of 1 to `max_len` printable characters."""

    max_len: int = 4096

    def describe(self) -> str:
        return f"a text of 1 to {self.max_len} printable characters"

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or not 0 < len(value) <= self.max_len or not value.isprintable():
            raise ValueError
        return value


@dataclass(frozen=True)
class Device:
    """auto, cpu, cuda or cuda:N."""

    def describe(self) -> str:
        return "auto, cpu, cuda or cuda:N"

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str) or not _DEVICE.match(value):
            raise ValueError
        return value


@dataclass(frozen=True)
class Names:
    """A non-empty sequence of distinct names among `options` (a lone string is refused)."""

    options: tuple[str, ...]

    def describe(self) -> str:
        return "a list of distinct names among " + ", ".join(self.options)

    def __call__(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise ValueError
        names = tuple(value)
        if any(not isinstance(v, str) or v not in self.options for v in names) or len(set(names)) != len(names):
            raise ValueError
        return names


@dataclass(frozen=True)
class Maybe:
    """None, or a value that passes `check`."""

    check: Any

    def describe(self) -> str:
        return f"null or {self.check.describe()}"

    def __call__(self, value: Any) -> Any:
        return None if value is None else self.check(value)


def param(default: Any, check: Any, help: str) -> Any:
    """A dataclass field with its check and help text (keyword-only through the dataclass)."""
    return field(default=default, metadata={"check": check, "help": help})


def check_value(name: str, check: Any, value: Any) -> Any:
    """`check(value)`, or a ParamError naming the parameter, the value and what is allowed."""
    try:
        return check(value)
    except (ValueError, TypeError, OverflowError):
        raise ParamError(f"{name} must be {check.describe()}, got {_kind(value)}") from None


def validate(obj: Any) -> None:
    """Check and normalise (e.g. lists to tuples) every declared field of a dataclass, in place."""
    for f in fields(obj):
        if "check" in f.metadata:
            object.__setattr__(obj, f.name, check_value(f.name, f.metadata["check"], getattr(obj, f.name)))


def declared(cls: type) -> dict[str, Any]:
    """Name -> dataclass field of every declared parameter of `cls`, in signature order."""
    return {f.name: f for f in fields(cls) if "check" in f.metadata}


def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse work whose buffers alone would exceed this machine's physical memory."""
    limit = machine_memory()
    if nbytes > limit:
        raise ParamError(
            f"{what} would need {nbytes / 2**30:.1f} GiB, more than this machine's "
            f"{limit / 2**30:.1f} GiB of memory; use a smaller image_size or fewer features"
        )


# Shared declarations ------------------------------------------------------------------------

IMAGE_SIZE = Int(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
SEED = Int(0, MAX_SEED)
BATCH_SIZE = Int(1, 1024)
BLUR_SIGMA = Float(0, 64)
EPOCHS = Int(1, 100_000)
LEARNING_RATE = Float(0, 10, open_lo=True)
HOLDOUT = Float(0, 1, open_hi=True)
THRESHOLD_IMAGES = Int(1, 1_000_000)
