"""HTTP adapter for `serving.Searcher`: a Starlette (ASGI) app run by uvicorn.

Why Starlette + uvicorn: a small, well-maintained ASGI stack with few dependencies (anyio,
h11) that any ASGI server can also run; no gRPC toolchain or generated stubs, and FastAPI's
validation layer is not needed for three endpoints whose few fields are checked here with
error messages written for this API.

Endpoints (JSON in and out):

    POST /v1/search    {"vector": [...]} | {"image": "<base64>"} | {"id": "..."}
                       + "k" (1..1000, default 10), "embedder" (required when the run has
                       several), "exclude_self" (id queries only, default false);
                       or multipart/form-data with a file field "image" (+ "k", "embedder")
        -> {"embedder", "run_id", "k", "distance", "higher_is_better",
            "hits": [{"rank", "id", "score", "metadata": {...}}], "took_ms"}
    GET  /v1/healthz   {"status": "ok", "run_id": ...}
    GET  /v1/index     Searcher.info(): run, embedders (n, d, distance, method, recall, ...)

Scores: similarities for cosine / dot_product indexes (highest first), squared distances
for squared_l2 (lowest first); "higher_is_better" says which.  Ranks start at 1.

Errors are {"error": {"code": ..., "message": ...}}: 400 for a bad request (bad_json,
unknown_field, query_kind, bad_k, bad_vector, dimension_mismatch, non_finite, zero_vector,
bad_base64, bad_id, bad_embedder, embedder_required, unknown_embedder, bad_multipart), 404
unknown_id (and unknown paths), 405, 413 body_too_large (by Content-Length, and counted
while reading), 415 unsupported_media_type, 422 undecodable_image, 503 embedder_unavailable
(the image model cannot be loaded or has other weights than the index), 500 internal.

Queries run in Starlette's thread pool, so the event loop never waits for ScaNN or the
model.  With refresh_seconds, a lifespan task checks LATEST that often and loads a newly
published run in a worker thread, then swaps it in; queries never wait for it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from retrieval.errors import ConfigError, HandleError, QueryError
from serving.errors import BadImageError, UnknownIdError
from serving.http_requests import ApiError, parse_request
from serving.results import SearchResult
from serving.searcher import Searcher

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12 MB image, base64-encoded


class _JSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(
            _jsonable(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def _jsonable(value: Any) -> Any:
    """Metadata values as JSON: NaN/inf -> null, bytes -> base64, dates -> ISO 8601."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return _jsonable(float(value))
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalar
        return _jsonable(value.item())
    return value


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> _JSONResponse:
    return _JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(
    searcher: Searcher, refresh_seconds: float | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Starlette:
    """The ASGI app serving `searcher`; with refresh_seconds, LATEST is re-checked that often."""
    if refresh_seconds is not None and not refresh_seconds > 0:
        raise ConfigError(f"refresh_seconds must be > 0 or None, got {refresh_seconds!r}")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes!r}")

    async def search(request: Request) -> _JSONResponse:
        started = time.perf_counter()
        try:
            query = await parse_request(request, max_body_bytes)
            result = await run_in_threadpool(_run_query, searcher, query)
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message)
        return _JSONResponse(
            {
                "embedder": result.embedder,
                "run_id": result.run_id,
                "k": query["k"],
                "distance": result.distance,
                "higher_is_better": result.higher_is_better,
                "hits": [hit.to_dict() for hit in result],
                "took_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

    async def healthz(request: Request) -> _JSONResponse:
        return _JSONResponse({"status": "ok", "run_id": searcher.run_id})

    async def index_info(request: Request) -> _JSONResponse:
        return _JSONResponse(searcher.info())

    async def http_error(request: Request, exc: Exception) -> _JSONResponse:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (
            exc.detail
            if exc.status_code not in (404, 405)
            else (
                f"{request.method} {request.url.path} is not an endpoint; use POST /v1/search, "
                "GET /v1/healthz or GET /v1/index"
            )
        )
        # exc.headers carries what the status needs, e.g. Allow for 405.
        return _error(exc.status_code, code, str(message), headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> _JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not refresh_seconds:
            yield
            return
        import anyio

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_refresh_loop, searcher, refresh_seconds)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()

    return Starlette(
        routes=[
            Route("/v1/search", search, methods=["POST"]),
            Route("/v1/healthz", healthz, methods=["GET"]),
            Route("/v1/index", index_info, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


async def _refresh_loop(searcher: Searcher, seconds: float) -> None:
    import anyio
    import anyio.to_thread

    while True:
        await anyio.sleep(seconds)
        try:
            # Loading a run takes a worker thread; abandoned (not awaited) at shutdown.
            await anyio.to_thread.run_sync(searcher.refresh, abandon_on_cancel=True)
        except Exception:  # logged and recorded in info()["refresh"] by refresh()
            pass


# ------------------------------------------------------------------ running a query


def _run_query(searcher: Searcher, query: dict[str, Any]) -> SearchResult:
    kind, k, embedder = query["kind"], query["k"], query["embedder"]
    try:
        if kind == "vector":
            # A flat list of numbers (see _parse_json): one result.
            return cast(SearchResult, searcher.search_vector(query["value"], k=k, embedder=embedder))
        if kind == "image":
            return searcher.search_image(query["value"], k=k, embedder=embedder)
        return searcher.search_id(query["value"], k=k, embedder=embedder, exclude_self=query["exclude_self"])
    except UnknownIdError as exc:
        raise ApiError(404, exc.code, str(exc)) from None
    except BadImageError as exc:
        raise ApiError(422, exc.code, str(exc)) from None
    except QueryError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    except HandleError as exc:
        raise ApiError(503, "embedder_unavailable", str(exc)) from None
    except ConfigError as exc:
        raise ApiError(400, "bad_query", str(exc)) from None


# ------------------------------------------------------------------ running the server


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    refresh_seconds: float | None = 60,
    *,
    embedder: str | None = None,
    verify: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
    uvicorn_options: dict[str, Any] | None = None,
    **open_options: Any,
) -> None:
    """Open `path` (output root or run directory) and serve it with uvicorn until stopped.

    Binds 127.0.0.1 unless `host` says otherwise.  refresh_seconds: how often LATEST is
    re-checked (None: never; ignored for a run directory).  open_options go to
    Searcher.open (handles, model_cache_dir, allow_unpublished, max_image_pixels);
    uvicorn_options to uvicorn.run (e.g. limit_concurrency, ssl_keyfile).
    """
    import uvicorn

    searcher = Searcher.open(path, embedder=embedder, verify=verify, **open_options)
    if refresh_seconds and not searcher.info()["refresh"]["follows_latest"]:
        log.info("%s is a run directory: it is served as is, LATEST is not followed", path)
        refresh_seconds = None
    log.info(
        "serving run %s (%s) on http://%s:%d", searcher.run_id, ", ".join(searcher.embedders), host, port
    )
    app = create_app(searcher, refresh_seconds=refresh_seconds, max_body_bytes=max_body_bytes)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **(uvicorn_options or {}))
