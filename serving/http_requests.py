"""Parsing the body of POST /v1/search (`serving.http`) into a query: JSON or
multipart/form-data, read up to a size limit within a time limit, every field checked with
an error message written for this API (`ApiError`: HTTP status, error code, message).

A query is {"kind": "vector" | "image" | "id", "value": list of numbers | image bytes | id,
"k": int, "embedder": str or None, "exclude_self": bool, "expand": QueryExpansion or None
(`serving.http_expand`)}.

Memory: a body is held once as bytes; parsing a JSON body holds it once more as text plus
the decoded image, and at most MAX_JSON_VALUES arrays, objects and values (counted on the
raw bytes before parsing, so that `[[[[...` 100,000 deep or a million empty lists never
reach the parser).  Values the client sent are echoed in messages through
`serving.errors.shorten`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from retrieval import queries
from retrieval.errors import QueryError
from serving import http_expand
from serving.errors import shorten

DEFAULT_K = 10
MAX_K = queries.MAX_K  # an index may serve fewer (its max_k, from the build's --serve_max_k)
QUERY_KINDS = ("vector", "image", "id")
JSON_FIELDS = frozenset(QUERY_KINDS + ("k", "embedder", "exclude_self", "expand"))
FORM_FIELDS = frozenset(("image", "k", "embedder") + http_expand.FORM_FIELDS)
# A JSON body may hold at most this many arrays, objects and values (counted as the bytes
# "[", "{" and "," outside strings would give, on the raw body: an upper bound).  A vector of
# dimension 4096 needs ~4,100; the limit keeps the parsed form of a 16 MiB body within a few
# MB (a million "[]" would take ~60 MB as Python lists) and its nesting far from the parser's
# recursion limit.
MAX_JSON_VALUES = 100_000
# JSON bodies above this size are parsed in a worker thread, not on the event loop.
PARSE_IN_THREAD_BYTES = 64 * 1024


class ApiError(Exception):
    """An answer other than 200: HTTP status, stable error code, message; `close`: end the
    connection after the answer (the rest of the request was not read); `headers`: extra."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.close, self.headers = close, dict(headers or {})


class ByteBudget:
    """The request-body bytes the server holds at once, across requests (`max_buffered_bytes`).
    Used from the event loop only (no lock)."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


@dataclasses.dataclass
class BodyLimits:
    """How a request body is read: at most max_bytes, all of it within timeout seconds
    (None: no limit) after the headers, its bytes taken from `budget` (given back by the
    caller through `release`)."""

    max_bytes: int
    timeout: float | None = None
    budget: ByteBudget | None = None
    held: int = 0  # bytes of `budget` this request holds

    def hold(self, n: int) -> None:
        if self.budget is None or n <= 0:
            return
        if not self.budget.take(n):
            raise ApiError(
                503,
                "overloaded",
                f"the server holds {self.budget.used} bytes of request bodies, its limit is "
                f"{self.budget.capacity} (max_buffered_bytes); retry shortly",
                close=True,
                headers={"Retry-After": "1"},
            )
        self.held += n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.held)
        self.held = 0


async def _read_body(request: Request, limits: BodyLimits) -> bytes:
    limit = limits.max_bytes
    length = request.headers.get("content-length")
    declared = None
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(
                400, "bad_request", f"invalid Content-Length {shorten(length)}", close=True
            ) from None
        if declared > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                close=True,
            )
        limits.hold(declared)
    chunks, size = [], 0
    try:
        with anyio.fail_after(limits.timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, "body_too_large", f"request body exceeds the limit of {limit} bytes", close=True
                    )
                if declared is None:
                    limits.hold(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408,
            "body_timeout",
            f"the request body did not arrive within {limits.timeout:g} s ({size} bytes received)",
            close=True,
        ) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection", close=True) from None
    return b"".join(chunks)


async def parse_request(request: Request, limits: BodyLimits | int) -> dict[str, Any]:
    """The query in the body of `request` (read as `limits` says; an int: at most that many
    bytes); ApiError says what is wrong."""
    if isinstance(limits, int):
        limits = BodyLimits(limits)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/json", "multipart/form-data", ""):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {shorten(media_type)} is not supported; send application/json or "
            "multipart/form-data",
            close=True,
        )
    body = await _read_body(request, limits)
    if media_type == "multipart/form-data":
        return await _parse_form(request, body, limits.max_bytes)
    if len(body) > PARSE_IN_THREAD_BYTES:
        payload = await run_in_threadpool(_loads, body)
    else:
        payload = _loads(body)
    return _parse_json(payload)


def _loads(body: bytes) -> Any:
    """The JSON value of `body`; ApiError bad_json when it is not JSON or holds too many values."""
    values = body.count(b"[") + body.count(b"{") + body.count(b",")
    if values > MAX_JSON_VALUES:
        raise ApiError(
            400,
            "bad_json",
            f"the body holds up to {values} JSON arrays, objects and values; at most "
            f"{MAX_JSON_VALUES} are accepted",
        )
    try:
        return json.loads(body)
    except RecursionError:  # nesting below MAX_JSON_VALUES but deeper than the parser goes
        raise ApiError(400, "bad_json", "the body is not valid JSON: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {shorten(str(exc))}") from None


def _parse_json(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_json", f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(payload.keys() - JSON_FIELDS)
    if unknown:
        raise ApiError(
            400,
            "unknown_field",
            f"unknown field(s) {_names(unknown)}; allowed: {', '.join(sorted(JSON_FIELDS))}",
        )
    query = _common_fields(payload)
    kind = query["kind"]
    value = payload[kind]
    if kind == "vector":
        if not isinstance(value, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
        ):
            raise ApiError(400, "bad_vector", '"vector" must be a flat list of numbers')
        query["value"] = value
    elif kind == "image":
        if not isinstance(value, str):
            raise ApiError(400, "bad_base64", '"image" must be a base64 string')
        query["value"] = _b64decode(value)
    else:
        if not isinstance(value, str) or not value:
            raise ApiError(400, "bad_id", '"id" must be a non-empty string')
        query["value"] = value
    exclude_self = payload.get("exclude_self", False)
    if not isinstance(exclude_self, bool) or (exclude_self and kind != "id"):
        raise ApiError(
            400, "bad_request", '"exclude_self" must be true or false, and applies to id queries only'
        )
    query["exclude_self"] = exclude_self
    query["expand"] = _expansion(http_expand.expand_from_json, payload.get("expand"))
    return query


def _expansion(parse: Any, value: Any) -> Any:
    """The query expansion `parse` makes of `value`; a bad one is a 400 bad_expand."""
    try:
        return parse(value)
    except QueryError as exc:
        raise ApiError(400, exc.code, str(exc)) from None


def _names(names: list[str]) -> str:
    """Field names the client sent, for a message: each and the whole list shortened."""
    shown = ", ".join(name if len(name) <= 50 else shorten(name, 50) for name in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _common_fields(fields: dict[str, Any]) -> dict[str, Any]:
    kinds = [kind for kind in QUERY_KINDS if kind in fields]
    if len(kinds) != 1:
        got = ", ".join(kinds) or "none"
        raise ApiError(400, "query_kind", f'give exactly one of "vector", "image", "id" (got {got})')
    k = fields.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ApiError(400, "bad_k", f'"k" must be an integer from 1 to {MAX_K}, got {shorten(k)}')
    embedder = fields.get("embedder")
    if embedder is not None and not isinstance(embedder, str):
        raise ApiError(400, "bad_embedder", '"embedder" must be a string')
    return {"kind": kinds[0], "k": k, "embedder": embedder}


def _b64decode(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f'"image" is not valid base64: {exc}') from None
    if not data:
        raise ApiError(400, "bad_base64", '"image" is empty')
    return data


async def _parse_form(request: Request, body: bytes, limit: int) -> dict[str, Any]:
    from starlette import formparsers
    from starlette.formparsers import MultiPartException, MultiPartParser

    if getattr(formparsers, "multipart", None) is None:  # pragma: no cover - extras dependent
        raise ApiError(
            415,
            "unsupported_media_type",
            "multipart uploads need the "
            "python-multipart package on the server; send JSON with a base64 image",
        )

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body
        yield b""

    try:
        form = await MultiPartParser(
            request.headers, stream(), max_files=1, max_fields=10, max_part_size=limit
        ).parse()
    except MultiPartException as exc:
        raise ApiError(400, "bad_multipart", f"invalid multipart/form-data body: {exc.message}") from None
    try:
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown form field(s) {_names(unknown)}; allowed: {', '.join(sorted(FORM_FIELDS))}",
            )
        if "image" not in form:
            raise ApiError(400, "query_kind", 'the multipart form needs a file field "image"')
        upload = form["image"]
        if isinstance(upload, str) or not hasattr(upload, "read"):
            raise ApiError(400, "bad_multipart", 'form field "image" must be a file upload')
        data = await upload.read()
        fields: dict[str, Any] = {"image": data}
        if "k" in form:
            try:
                fields["k"] = int(form["k"])  # type: ignore[arg-type]  # a file is refused below
            except (TypeError, ValueError):
                raise ApiError(
                    400, "bad_k", f'"k" must be an integer from 1 to {MAX_K}, got {shorten(form["k"])}'
                ) from None
        if "embedder" in form:
            fields["embedder"] = form["embedder"] if isinstance(form["embedder"], str) else None
        query = _common_fields(fields)
        query["expand"] = _expansion(http_expand.expand_from_form, form)
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "query_kind", 'the uploaded "image" file is empty')
    query.update(value=data, exclude_self=False)
    return query
