"""Request bodies: read with a size limit, split into image byte strings (raw or multipart)."""

from __future__ import annotations

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

RAW_TYPES = ("application/octet-stream",)  # besides image/*
ACCEPTED = "multipart/form-data (field 'file'), or a raw body with Content-Type image/png, image/jpeg, ..."


class ApiError(HTTPException):
    """An HTTP error answered as `{"error": detail}`."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)


async def read_images(request: Request, limit: int, max_files: int) -> list[bytes]:
    """The images of a request: the raw body, or each part of a multipart body, in order.

    Raises:
        ApiError: 413 for a body over `limit` bytes (refused before it is read further), 415 for a
            content type that is neither multipart nor an image, 400 for an empty or malformed
            body or more than `max_files` images.
    """
    media, _ = parse_options_header(request.headers.get("content-type"))
    media = media.decode("latin-1").lower()
    if media != "multipart/form-data" and not _is_image_type(media):
        raise ApiError(415, f"unsupported Content-Type {media or '(none)'!r}: send {ACCEPTED}")
    if media != "multipart/form-data" and max_files > 1:
        raise ApiError(415, "a batch is sent as multipart/form-data with one part per image (field 'files')")
    body = await _read_body(request, limit)
    if not body:
        raise ApiError(400, "the request body is empty: send an image")
    images = _multipart(body, request.headers["content-type"]) if media == "multipart/form-data" else [body]
    if not images:
        raise ApiError(400, "the multipart body holds no file: send the image in the field 'file'")
    if len(images) > max_files:
        more = f"at most {max_files} images per request" if max_files > 1 else "one image; use /v1/predict/batch"
        raise ApiError(400, f"{len(images)} files sent: send {more}")
    for i, data in enumerate(images):
        if not data:
            raise ApiError(400, f"files[{i}] is empty (0 bytes)")
    return images


def _is_image_type(media: str) -> bool:
    return media.startswith("image/") or media in RAW_TYPES


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = ApiError(413, f"the request body is larger than the limit of {limit / 2**20:g} MiB (--max-upload-mb)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart(body: bytes, content_type: str) -> list[bytes]:
    """The data of each part of a multipart/form-data body, in order; parts declared as another
    type than an image or octet-stream are refused with 415."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "the multipart Content-Type has no boundary")
    parts: list[dict] = []
    header: list[bytes] = [b"", b""]

    def begin() -> None:
        parts.append({"data": [], "type": b""})

    def field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        if header[0].lower() == b"content-type":
            parts[-1]["type"] = header[1]
        header[:] = [b"", b""]

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(chunk[start:end])

    ended: list[bool] = []
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": begin,
            "on_header_field": field,
            "on_header_value": value,
            "on_header_end": header_end,
            "on_part_data": data,
            "on_end": lambda: ended.append(True),
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as err:
        raise ApiError(400, f"malformed multipart body ({err})") from None
    if not ended:
        raise ApiError(400, "malformed multipart body (it ends before its closing boundary)")
    for i, part in enumerate(parts):
        media = parse_options_header(part["type"])[0].decode("latin-1").lower()
        if media and not _is_image_type(media):
            raise ApiError(415, f"files[{i}] is declared as {media!r}, not an image")
    return [b"".join(part["data"]) for part in parts]
