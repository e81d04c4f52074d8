"""HTTP adapter for `serving.Searcher`: a Starlette (ASGI) app, run by hypercorn
(`serving.http_server`).

Why Starlette: a small, well-maintained ASGI toolkit with few dependencies (anyio) that any
ASGI server can run; no gRPC toolchain or generated stubs, and FastAPI's validation layer is
not needed for a few endpoints whose fields are checked here with error messages written for
this API.  Why hypercorn: see `serving.http_server`.

Endpoints (JSON in and out; the OpenAPI description is served at /v1/openapi.json):

    POST /v1/search    {"vector": [...]} | {"image": "<base64>"} | {"id": "..."}
                       + "k" (1..1000, default 10), "embedder" (required when the run has
                       several), "exclude_self" (id queries only, default false), "expand"
                       ({"n", "alpha"}: alpha query expansion, cosine / dot_product only);
                       or multipart/form-data with a file field "image" (+ "k", "embedder",
                       "expand_n" and "expand_alpha")
        -> {"embedder", "run_id", "k", "distance", "higher_is_better",
            "hits": [{"rank", "id", "score", "metadata": {...}}], "took_ms"}
    GET  /v1/healthz   {"status": "ok", "run_id": ...}
    GET  /v1/index     Searcher.info() with paths relative to the served root
    GET  /v1/openapi.json

Scores: similarities for cosine / dot_product indexes (highest first; cosine within
[-1, 1]), squared distances for squared_l2 (lowest first); "higher_is_better" says which.
Ranks start at 1.  A hit's metadata has no "source" (shard paths of the server) unless the
app was made with expose_source=True (`imgindex serve --expose_source`).

Errors are {"error": {"code": ..., "message": ...}} (`serving.http_json`); the codes are listed
in `serving.openapi.ERROR_CODES`.  Messages echo client input shortened (`serving.errors.shorten`).

Limits (`ServerLimits`, flags of `imgindex serve`): the server (`serving.http_server`) closes
a connection whose request headers do not arrive within keep_alive_timeout (a new connection,
or one idle between requests) and refuses connections beyond max_connections; the app answers
408 when a body does not arrive within body_timeout, 503 "overloaded" beyond max_requests
requests at once or max_buffered_bytes of bodies held at once, and lets max_image_queries
image queries decode and embed at once (others wait up to image_wait_seconds, then 503
"overloaded").

Queries run in Starlette's thread pool, so the event loop never waits for ScaNN or the
model.  With refresh_seconds, a lifespan task checks LATEST that often and loads a newly
published run in a worker thread, then swaps it in; queries never wait for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from retrieval.errors import ConfigError, HandleError, QueryError
from serving.errors import BadImageError, UnknownIdError, shorten
from serving.http_json import SafeJSONResponse, error_response
from serving.http_requests import MAX_K, ApiError, BodyLimits, ByteBudget, parse_request
from serving.limits import ServerLimits
from serving.results import SearchResult
from serving.searcher import Searcher

__all__ = ["create_app", "public_info"]

log = logging.getLogger(__name__)


def _client(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "-"


def create_app(
    searcher: Searcher,
    refresh_seconds: float | None = None,
    max_body_bytes: int | None = None,
    *,
    limits: ServerLimits | None = None,
    expose_source: bool = False,
) -> Starlette:
    """The ASGI app serving `searcher`; with refresh_seconds, LATEST is re-checked that often.

    limits: the app's part of `ServerLimits` (body size and time, requests, buffered bytes,
    image queries); max_body_bytes overrides limits.max_body_bytes.  expose_source: keep the
    "source" metadata of hits (shard paths on the server; off by default).
    """
    if refresh_seconds is not None and not refresh_seconds > 0:
        raise ConfigError(f"refresh_seconds must be > 0 or None, got {refresh_seconds!r}")
    limits = limits or ServerLimits()
    if max_body_bytes is not None:
        limits = dataclasses.replace(
            limits,
            max_body_bytes=max_body_bytes,
            max_buffered_bytes=max(limits.max_buffered_bytes, max_body_bytes),
        )
    limits.check()
    budget = ByteBudget(limits.max_buffered_bytes)
    active = [0]  # requests being read or answered (event loop only)
    image_slots: list[anyio.Semaphore] = []  # made on first use, inside the event loop

    def refuse(request: Request, exc: ApiError) -> SafeJSONResponse:
        # 4xx: the client's doing (INFO); overloaded: load shed (WARNING); other 5xx: ERROR.
        level = (
            logging.INFO
            if exc.status < 500
            else logging.WARNING
            if exc.code == "overloaded"
            else logging.ERROR
        )
        log.log(
            level,
            "refused %s %s from %s: %d %s: %s",
            request.method,
            request.url.path,
            _client(request),
            exc.status,
            exc.code,
            shorten(exc.message, 300),
        )
        headers = dict(exc.headers)
        if exc.close:
            headers["Connection"] = "close"
        return error_response(exc.status, exc.code, exc.message, headers=headers)

    async def search(request: Request) -> SafeJSONResponse:
        started = time.perf_counter()
        body = BodyLimits(limits.max_body_bytes, limits.body_timeout, budget)
        counted = False
        try:
            query = await parse_request(request, body)
            # Requests whose body is read count against max_requests; those still reading
            # are bounded by max_connections, body_timeout and max_buffered_bytes, so that
            # stalled uploads cannot take the slots of queries.
            if active[0] >= limits.max_requests:
                raise ApiError(
                    503,
                    "overloaded",
                    f"the server is answering {active[0]} requests, its limit (max_requests); retry shortly",
                    headers={"Retry-After": "1"},
                )
            active[0] += 1
            counted = True
            if query["kind"] == "image":
                result = await _image_query(searcher, query, limits, image_slots)
            else:
                result = await run_in_threadpool(_run_query, searcher, query)
        except ApiError as exc:
            return refuse(request, exc)
        finally:
            body.release()
            if counted:
                active[0] -= 1
        hits = [hit.to_dict() for hit in result]
        if not expose_source:
            for hit in hits:
                hit["metadata"] = {k: v for k, v in hit["metadata"].items() if k != "source"}
        return SafeJSONResponse(
            {
                "embedder": result.embedder,
                "run_id": result.run_id,
                "k": query["k"],
                "distance": result.distance,
                "higher_is_better": result.higher_is_better,
                "hits": hits,
                "took_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )

    async def healthz(request: Request) -> SafeJSONResponse:
        return SafeJSONResponse({"status": "ok", "run_id": searcher.run_id})

    async def index_info(request: Request) -> SafeJSONResponse:
        return SafeJSONResponse(public_info(searcher.info(), expose_source=expose_source))

    async def openapi(request: Request) -> SafeJSONResponse:
        from serving.openapi import openapi_document, query_examples

        return SafeJSONResponse(openapi_document(query_examples(searcher.info(), searcher.first_ids())))

    async def http_error(request: Request, exc: Exception) -> SafeJSONResponse:
        assert isinstance(exc, HTTPException)  # registered for HTTPException only
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = (
            exc.detail
            if exc.status_code not in (404, 405)
            else (
                f"{request.method} {shorten(request.url.path, 100)} is not an endpoint; use POST "
                "/v1/search, GET /v1/healthz, GET /v1/index or GET /v1/openapi.json"
            )
        )
        log.info(
            "refused %s %s from %s: %d %s",
            request.method,
            shorten(request.url.path, 100),
            _client(request),
            exc.status_code,
            code,
        )
        # exc.headers carries what the status needs, e.g. Allow for 405.
        return error_response(exc.status_code, code, str(message), headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> SafeJSONResponse:
        log.error(
            "internal error on %s %s from %s",
            request.method,
            request.url.path,
            _client(request),
            exc_info=exc,
        )
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not refresh_seconds:
            yield
            return
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
            Route("/v1/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )


async def _image_query(
    searcher: Searcher, query: dict[str, Any], limits: ServerLimits, slots: list[anyio.Semaphore]
) -> SearchResult:
    """An image query once one of max_image_queries slots is free (waiting at most
    image_wait_seconds): the decode and the model hold the memory, so they are bounded."""
    if not slots:
        slots.append(anyio.Semaphore(limits.max_image_queries))
    slot = slots[0]
    try:
        with anyio.fail_after(limits.image_wait_seconds):
            await slot.acquire()
    except TimeoutError:
        raise ApiError(
            503,
            "overloaded",
            f"{limits.max_image_queries} image queries are being answered (max_image_queries) and "
            f"this one waited {limits.image_wait_seconds:g} s for its turn; retry shortly",
            headers={"Retry-After": "1"},
        ) from None
    try:
        return await run_in_threadpool(_run_query, searcher, query)
    finally:
        slot.release()


async def _refresh_loop(searcher: Searcher, seconds: float) -> None:
    import anyio.to_thread

    while True:
        await anyio.sleep(seconds)
        try:
            # Loading a run takes a worker thread; abandoned (not awaited) at shutdown.
            await anyio.to_thread.run_sync(searcher.refresh, abandon_on_cancel=True)
        except Exception:  # logged and recorded in info()["refresh"] by refresh()
            pass


def public_info(info: dict[str, Any], expose_source: bool = False) -> dict[str, Any]:
    """`Searcher.info()` as GET /v1/index shows it: no absolute server paths.  Paths are
    relative to the served root (the output root, or the run directory when one is served):
    run_dir "runs/<run_id>", index_dir "runs/<run_id>/index/<name>"; a handle that is a local
    path keeps its last component; error messages lose the root's absolute path."""
    base = info["root"] if info["root"] is not None else info["run_dir"]
    if "://" in base:  # an object-store root: its runs are served from <cache>/.../runs/<run_id>
        base = os.path.dirname(os.path.dirname(info["run_dir"]))
    base = os.path.abspath(base)

    def relative(path: Any) -> Any:
        if not isinstance(path, str):
            return path
        full = os.path.abspath(path)
        if full == base or full.startswith(base + os.sep):
            return os.path.relpath(full, base)
        return os.path.basename(full.rstrip(os.sep)) or "."

    def scrub(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        return text.replace(base + os.sep, "").replace(base, ".")

    out = dict(info)
    out["root"] = "." if info["root"] is not None else None
    out["run_dir"] = relative(info["run_dir"])
    embedders = {}
    for name, emb in info["embedders"].items():
        emb = dict(emb)
        emb["index_dir"] = relative(emb.get("index_dir"))
        # The most this API lets a query ask of the index: its own max_k, or for an index
        # built before it had one, the API's limit.
        emb["max_k"] = min(emb.get("max_k") or MAX_K, MAX_K)
        handle = emb.get("handle")
        if isinstance(handle, str) and _is_local_path(handle):
            emb["handle"] = os.path.basename(handle.rstrip("/")) or handle
        if not expose_source:
            emb["metadata_columns"] = [c for c in emb.get("metadata_columns", []) if c != "source"]
        embedders[name] = emb
    out["embedders"] = embedders
    refresh = dict(info["refresh"])
    refresh["last_error"] = scrub(refresh.get("last_error"))
    refresh["failed_run"] = relative(refresh.get("failed_run"))
    out["refresh"] = refresh
    return out


def _is_local_path(handle: str) -> bool:
    """A handle naming a file on the server (not builtin:..., https://..., gs://...)."""
    scheme = handle.split(":", 1)[0] if ":" in handle else ""
    return not scheme or len(scheme) == 1 or "/" in scheme  # "C:\\..." or "./a:b"


# ------------------------------------------------------------------ running a query


def _run_query(searcher: Searcher, query: dict[str, Any]) -> SearchResult:
    kind, k, embedder, expand = query["kind"], query["k"], query["embedder"], query.get("expand")
    try:
        if kind == "vector":
            # A flat list of numbers (see _parse_json): one result.
            return cast(
                SearchResult, searcher.search_vector(query["value"], k=k, embedder=embedder, expand=expand)
            )
        if kind == "image":
            return searcher.search_image(query["value"], k=k, embedder=embedder, expand=expand)
        return searcher.search_id(
            query["value"], k=k, embedder=embedder, exclude_self=query["exclude_self"], expand=expand
        )
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
