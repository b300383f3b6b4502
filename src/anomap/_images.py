"""Image files: finding them, decoding them into numpy arrays (every failure a DataError), preprocessing."""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image

from ._io import write_bytes
from .errors import DataError

if TYPE_CHECKING:  # decoding and resizing need only numpy and Pillow (see anomap.runtime)
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
# threads that decode images (or draw pictures): two on small machines (one works while the other
# waits for a file), up to eight where there are cores to feed a GPU
DECODE_THREADS = min(8, max(2, (os.cpu_count() or 2) // 2))
IMAGENET_STD = (0.229, 0.224, 0.225)
SUFFIXES_TEXT = "/".join(sorted(s[1:] for s in IMAGE_SUFFIXES))
MIN_SIDE = 8  # pixels; smaller images carry no usable texture for patch features
# Only these decoders run, whatever the file is named: fewer, well-tested parsers face untrusted
# files (PIL's JPEG opener also covers multi-picture camera JPEGs).
FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

# What PIL raises on damaged or unsupported content, besides its own error types.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# warnings.catch_warnings swaps a process-wide filter list; serialise our own uses of it.
_WARNINGS_LOCK = threading.Lock()
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> the transpose that undoes it


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (case-insensitive)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _walk(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted; each real folder is visited once."""
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:  # a symlink back to a visited folder
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [p for p in (Path(folder, n) for n in names) if is_image_file(p)]
    return sorted(found)


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named in `paths`: files as given, folders searched recursively and sorted.

    Files named explicitly are kept whatever their extension (their content decides); in
    folders, only visible files with an image extension count. Duplicates are dropped.

    Raises:
        DataError: a path does not exist, or no image is found at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if path.is_dir():
            images = _walk(path)
            if not images:
                log.warning("%s: no images (%s) in this folder", path, SUFFIXES_TEXT)
            found.update(dict.fromkeys(images))
        elif path.is_file():
            found[path] = None
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError(f"no images ({SUFFIXES_TEXT}) found in {', '.join(map(str, paths))}")
    return list(found)


def _open(path: Path, data: bytes | None = None) -> Image.Image:
    """Open `path` lazily (header only), checking size limits; the content decides the format.
    With `data`, the image is those bytes and `path` only names it in messages."""
    try:
        if (path.stat().st_size if data is None else len(data)) == 0:
            raise DataError(f"{path}: the file is empty (0 bytes); replace or remove it")
        with _pil_warnings(path):
            img = Image.open(path if data is None else io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: the image is too large to decode safely ({err}); downscale it first") from err
    except Image.UnidentifiedImageError as err:
        raise DataError(f"{path}: not a PNG, JPEG, BMP or TIFF image; remove it or convert it to PNG") from err
    except PermissionError as err:
        raise DataError(f"{path}: cannot be read (permission denied); check its permissions") from err
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such file") from err
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: cannot be opened ({err})") from err
    if min(img.size) < MIN_SIDE:
        w, h = img.size
        img.close()
        raise DataError(f"{path}: {w}x{h} pixels is too small; images need at least {MIN_SIDE} px a side")
    return img


def _decoded(path: Path, data: bytes | None = None) -> Image.Image:
    """Fully decode `path` (or `data`, see `_open`) and apply its EXIF orientation."""
    img = _open(path, data)
    try:
        with img:
            img.load()
            method = _TRANSPOSE.get(_orientation(img, path))
            return img.copy() if method is None else img.transpose(method)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: the image is truncated or damaged ({err}); replace it") from err


@contextmanager
def _pil_warnings(path: Path) -> Iterator[None]:
    """PIL's warnings while reading `path` (damaged metadata) become one log line naming the file,
    not Python's raw two-line warning text; a decompression-bomb warning is raised as an error."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
    if caught:
        problems = "; ".join(dict.fromkeys(str(w.message) for w in caught))
        log.warning("%s: damaged metadata, read as far as possible (%s)", path, problems)


def _orientation(img: Image.Image, path: Path) -> int:
    """The EXIF orientation; 1 when absent or unreadable (logged by `_pil_warnings`)."""
    with _pil_warnings(path):
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except _DECODE_ERRORS as err:
            warnings.warn(f"unreadable EXIF data ({err})", stacklevel=1)
            orientation = 1
    return orientation if isinstance(orientation, int) else 1


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image as `load_image` returns it, reading only the header."""
    path = Path(path)
    with _open(path) as img:
        w, h = img.size
        orientation = _orientation(img, path)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file into RGB.

    Grayscale, palette and CMYK images are converted to RGB; 16-bit grayscale is scaled to
    8 bits (65535 -> 255, rounded); transparent images are composited on black (a pixel with
    alpha 0 becomes black); EXIF orientation is applied.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        DataError: the file is missing, empty, unreadable, not an image, truncated, smaller
            than MIN_SIDE px a side, larger than PIL's decompression-bomb limit, or of a
            floating-point pixel type.
    """
    path = Path(path)
    return _rgb(path, _decoded(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """`load_image` for an encoded image held in memory (e.g. an upload): the same formats,
    checks and conversions; nothing touches the filesystem. `name` only labels errors.

    Returns:
        (H, W, 3) uint8 array.

    Raises:
        DataError: as for `load_image`.
    """
    return _rgb(Path(name), _decoded(Path(name), data))


def _rgb(path: Path, img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a decoded image; DataError naming `path` for float or unconvertible pixels."""
    if img.mode == "F":
        raise DataError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
    try:
        return _to_rgb(img)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: pixel type {img.mode} cannot be converted to RGB ({err})") from err


def _to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a decoded image of any mode except "F"."""
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        # (H, W, 3) * (H, W, 1): composite on black, rounded
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:] + 127) // 255
        return rgb.astype(np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a ground-truth mask; every non-zero pixel is anomalous.

    Single-channel masks (0/255, 0/1, 16-bit) are compared with zero; colour masks count a
    pixel as anomalous when any colour channel is non-zero (alpha is ignored).

    Returns:
        (H, W) bool array.

    Raises:
        DataError: as for `load_image`.
    """
    path = Path(path)
    img = _decoded(path)
    if img.mode in {"1", "L", "F"} | _SIXTEEN_BIT_MODES:
        return np.asarray(img) != 0
    try:
        return np.asarray(img.convert("RGB")).any(axis=2)
    except _DECODE_ERRORS as err:
        raise DataError(f"{path}: pixel type {img.mode} cannot be read as a mask ({err})") from err


def png_bytes(array: np.ndarray, runs: bool = False) -> bytes:
    """A uint8 array (H, W) (grey) or (H, W, 3) (RGB) encoded as PNG.

    Every row gets PNG's "Sub" filter (the difference to the pixel on its left) and the rows are
    deflated at zlib level 1, which takes about half the time of PIL's encoder (it tries four
    filters per row) for files a few percent larger; pictures are written for every scored image.
    `runs` uses zlib's run-length strategy: faster again and as small for drawn pictures
    (heatmaps, masks), but larger for photographs.
    """
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) uint8 array, got {array.dtype} of shape {array.shape}")
    height, width = array.shape[:2]
    step = 1 if array.ndim == 2 else 3  # bytes per pixel
    rows = np.ascontiguousarray(array).reshape(height, width * step)
    filtered = np.empty((height, width * step + 1), np.uint8)
    filtered[:, 0] = 1  # the filter type of each row: Sub
    filtered[:, 1 : step + 1] = rows[:, :step]
    np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, step + 1 :])  # modulo 256
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE if runs else zlib.Z_DEFAULT_STRATEGY)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if step == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        _png_chunk(kind, data)
        for kind, data in (
            (b"IHDR", header),
            (b"IDAT", deflate.compress(filtered.tobytes()) + deflate.flush()),
            (b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(path: str | Path, array: np.ndarray, runs: bool = False, durable: bool = True) -> None:
    """Write a uint8 array (H, W) or (H, W, 3) as PNG (see `png_bytes`), atomically (`durable`:
    see `anomap._io.atomic_path`)."""
    write_bytes(path, png_bytes(array, runs), durable=durable)


@dataclass(frozen=True)
class Preprocess:
    """Resize, centre-crop and normalise images; resize and crop masks the same way.

    Args:
        size: "square": both sides become `size` (aspect ignored); "shorter": the shorter side
            becomes `size`, keeping the aspect, and `crop` is then required.
        crop: side of the centred square crop taken after resizing; None for no crop.
        resize: "square" or "shorter".
        mean, std: per-channel RGB normalisation of values scaled to [0, 1].
    """

    size: int = 256
    crop: int | None = None
    resize: str = "square"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # tuples even when rebuilt from JSON lists, so instances stay hashable and comparable
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.resize not in ("square", "shorter"):
            raise ValueError(f"resize must be 'square' or 'shorter', got {self.resize!r}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.resize == "shorter" and self.crop is None:
            raise ValueError("resize='shorter' keeps the aspect ratio, so it needs a crop size")
        if self.crop is not None and not 1 <= self.crop <= self.size:
            raise ValueError(f"crop must be between 1 and size={self.size}, got {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")

    @property
    def output_size(self) -> int:
        """Side S of the square outputs."""
        return self.size if self.crop is None else self.crop

    def image(self, img: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32 normalised (antialiased bilinear resize)."""
        import torch

        shift, scale = self.normalization()
        pixels = self.pixels(img).astype(np.float32)  # (S, S, 3) in [0, 255]
        pixels -= shift
        pixels *= scale
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def pixels(self, img: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (S, S, 3) uint8 resized (antialiased bilinear) and cropped."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} of shape {img.shape}")
        return np.asarray(self._resize(Image.fromarray(img), Image.Resampling.BILINEAR))

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """(3,) float32 shift and scale: a normalised value is (pixel - shift) * scale."""
        return (
            np.float32(255) * np.array(self.mean, np.float32),
            1 / (np.float32(255) * np.array(self.std, np.float32)),
        )

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centred crop of a resized width x height image."""
        left, top = round((width - self.crop) / 2), round((height - self.crop) / 2)
        return left, top, left + self.crop, top + self.crop

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool -> (S, S) bool, nearest-neighbour, aligned with `image`."""
        if mask.ndim != 2:
            raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
        grey = Image.fromarray(mask.astype(bool).astype(np.uint8) * 255)
        return np.asarray(self._resize(grey, Image.Resampling.NEAREST)) > 127

    def _resize(self, img: Image.Image, resample: Image.Resampling) -> Image.Image:
        w, h = img.size
        if self.resize == "square":
            img = img.resize((self.size, self.size), resample)
        else:
            scale = self.size / min(w, h)
            img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), resample)
        return img if self.crop is None else img.crop(self.crop_box(img.width, img.height))
