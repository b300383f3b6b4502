"""The HTTP API and the page, as a FastAPI application.

Request bodies are read into memory up to the upload limit and parsed there (multipart included),
so nothing from a request reaches the filesystem. Every error is JSON: `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from .. import __version__
from .._images import DECODE_THREADS
from ..errors import DataError, ScoreError
from .batching import MicroBatcher
from .bodies import ApiError, read_images
from .model import ServedModel, Upload

MAX_BATCH_FILES = 64  # images in one /v1/predict/batch request
# the page loads only from this server: its own script, style and the pictures it receives
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {"page.js": "text/javascript", "page.css": "text/css"}
PICTURES = {
    "mask": "the binary mask as a base64 PNG at the image's size",
    "heatmap": "the heatmap overlay as a base64 PNG at the image's size",
}
IMAGE_BODY = {"type": "string", "format": "binary"}
BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": IMAGE_BODY}, "required": ["file"]}
            },
            "image/png": {"schema": IMAGE_BODY},
            "image/jpeg": {"schema": IMAGE_BODY},
            "application/octet-stream": {"schema": IMAGE_BODY},
        },
    }
}
BATCH_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": IMAGE_BODY}},
                    "required": ["files"],
                }
            }
        },
    }
}


def create_app(
    model: ServedModel,
    *,
    token: str | None = None,
    max_batch: int = 16,
    max_upload_mb: float = 20.0,
    max_pending: int = 64,
) -> FastAPI:
    """The application serving `model`.

    Args:
        token: when given, every /v1 call needs `Authorization: Bearer <token>`.
        max_batch: most images per forward pass.
        max_upload_mb: largest request body, in MiB (one image, or all images of a batch request).
        max_pending: most prediction requests in progress at once (being read, queued or scored);
            more are answered 503 at once, so that bodies held in memory stay bounded.
    """
    predictor = _Predictor(model, max_batch, int(max_upload_mb * 2**20), max_pending)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker = asyncio.create_task(predictor.batcher.run())
        yield
        worker.cancel()
        predictor.close()

    app = FastAPI(
        title="anomap",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served by _add_docs, without a CDN
        redoc_url=None,
        description="Anomaly scores, decisions and defect maps for images. Higher scores are more "
        "anomalous; an image is anomalous when its score is at least the threshold.",
    )
    _add_error_handlers(app)
    authorized = Depends(_authorization(token))

    @app.get("/health", summary="liveness: answers while the server runs")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="the served model", dependencies=[authorized])
    async def describe() -> dict[str, Any]:
        return model.describe() | {
            "limits": {
                "max_batch": max_batch,
                "max_upload_mb": max_upload_mb,
                "max_batch_files": MAX_BATCH_FILES,
                "max_pending": max_pending,
            }
        }

    @app.post(
        "/v1/predict",
        summary="score one image (a multipart file or the raw body)",
        dependencies=[authorized],
        openapi_extra=BODY_DOC,
    )
    async def predict_one(
        request: Request,
        mask: bool = Query(False, description=PICTURES["mask"]),
        heatmap: bool = Query(False, description=PICTURES["heatmap"]),
    ) -> dict[str, Any]:
        return (await predictor(request, mask, heatmap, many=False))[0]

    @app.post(
        "/v1/predict/batch",
        summary="score several images (multipart files), answered in order",
        dependencies=[authorized],
        openapi_extra=BATCH_DOC,
    )
    async def predict_batch(
        request: Request,
        mask: bool = Query(False, description=PICTURES["mask"]),
        heatmap: bool = Query(False, description=PICTURES["heatmap"]),
    ) -> dict[str, Any]:
        return {"results": await predictor(request, mask, heatmap, many=True)}

    _add_page(app)
    _add_docs(app)
    return app


async def _prepare(run, model: ServedModel, data: bytes, keep_image: bool, name: str | None) -> Upload:
    """Decode with `run` (a coroutine running a function on the image threads); DataError -> 415
    when the content is no supported image, else 400."""
    try:
        return await run(model.prepare, data, keep_image, name or "the upload")
    except DataError as err:
        status = 415 if isinstance(err.__cause__, Image.UnidentifiedImageError) else 400
        raise ApiError(status, str(err)) from None


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1e3, 2)


def _authorization(token: str | None):
    """A dependency refusing requests without the bearer token (constant-time comparison of
    SHA-256 digests, so neither the content nor the length of the token leaks)."""
    expected = None if token is None else hashlib.sha256(token.encode()).digest()

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if not (hmac.compare_digest(digest, expected) and scheme.lower() == "bearer"):
            raise ApiError(
                401,
                "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, err.status_code, headers=getattr(err, "headers", None))

    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{' '.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": problems}, 422)

    async def score_error(_: Request, err: ScoreError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, 500)

    async def bug(_: Request, err: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return JSONResponse({"error": f"internal error: {type(err).__name__}"}, 500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ScoreError, score_error)
    app.add_exception_handler(Exception, bug)


class _Predictor:
    """Answers prediction requests: bodies decoded (and pictures drawn) on image threads, scored
    in micro-batches on one scoring thread, at most `max_pending` requests in progress."""

    def __init__(self, model: ServedModel, max_batch: int, limit: int, max_pending: int) -> None:
        # decoding and pictures on as many threads as offline prediction decodes with; scoring on
        # one thread of its own, which keeps the backbone's thread pool
        self.images = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="anomap-serve-images")
        self.scoring = ThreadPoolExecutor(1, thread_name_prefix="anomap-serve-score")
        self.batcher = MicroBatcher(model.score, max_batch, executor=self.scoring)
        self.model, self.limit, self.admission = model, limit, _Admission(max_pending)

    def close(self) -> None:
        for pool in (self.images, self.scoring):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _in_images(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self.images, func, *args)

    async def __call__(self, request: Request, mask: bool, heatmap: bool, many: bool) -> list[dict[str, Any]]:
        start = time.perf_counter()
        with self.admission:
            bodies = await read_images(request, self.limit, MAX_BATCH_FILES if many else 1)
            uploads = await asyncio.gather(
                *(
                    _prepare(self._in_images, self.model, data, heatmap, f"files[{i}]" if many else None)
                    for i, data in enumerate(bodies)
                )
            )
            decoded = time.perf_counter()
            scored = await asyncio.gather(*(self.batcher.submit(u.tensor) for u in uploads))
            ready = time.perf_counter()
            answers = await asyncio.gather(
                *(self._in_images(self.model.answer, u, s, mask, heatmap) for u, s in zip(uploads, scored))
            )
        end = time.perf_counter()
        for answer, s in zip(answers, scored):
            answer["batch_size"] = s.batch_size
            answer["timing_ms"] = {
                "receive_and_decode": _ms(start, decoded),
                "score": round(s.seconds * 1e3, 2),
                "queue_and_score": _ms(decoded, ready),
                "pictures": _ms(ready, end),
                "total": _ms(start, end),
            }
        return answers


class _Admission:
    """At most `limit` requests inside the block at once (one event loop: no lock needed); one
    more gets 503 at once, before its body is read."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def __enter__(self) -> None:
        if self.active >= self.limit:
            raise ApiError(
                503, f"busy: {self.limit} requests are in progress (--max-pending); retry later", {"Retry-After": "1"}
            )
        self.active += 1

    def __exit__(self, *exc) -> None:
        self.active -= 1


def _add_page(app: FastAPI) -> None:
    """The page at `/` and its two files, read once from the package (no request path is looked up)."""
    folder = resources.files("anomap.serve") / "static"
    files = {name: (folder / name).read_bytes() for name in ("index.html", *STATIC)}
    headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=headers)

    for name, media in STATIC.items():
        app.add_api_route(f"/static/{name}", _static(files[name], media, headers), include_in_schema=False)


def _add_docs(app: FastAPI) -> None:
    """OpenAPI docs at /docs, with Swagger UI's script and style served from the installed
    fastapi-offline package rather than a CDN, so that they work offline."""
    from fastapi.openapi.docs import get_swagger_ui_html

    folder = resources.files("fastapi_offline") / "static"
    headers = {"X-Content-Type-Options": "nosniff"}
    for name, media in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        app.add_api_route(
            f"/docs/{name}", _static((folder / name).read_bytes(), media, headers), include_in_schema=False
        )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="anomap API",
            swagger_js_url="/docs/swagger-ui-bundle.js",
            swagger_css_url="/docs/swagger-ui.css",
            swagger_favicon_url="data:,",
        )


def _static(content: bytes, media: str, headers: dict[str, str]):
    async def serve_file() -> Response:
        return Response(content, media_type=f"{media}; charset=utf-8", headers=headers)

    return serve_file
