"""Parsing the body of POST /v1/search (`serving.http`) into a query: JSON or
multipart/form-data, read up to a size limit, every field checked with an error message
written for this API (`ApiError`: HTTP status, error code, message).

A query is {"kind": "vector" | "image" | "id", "value": list of numbers | image bytes | id,
"k": int, "embedder": str or None, "exclude_self": bool}.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request

DEFAULT_K = 10
MAX_K = 1000
QUERY_KINDS = ("vector", "image", "id")
JSON_FIELDS = frozenset(QUERY_KINDS + ("k", "embedder", "exclude_self"))
FORM_FIELDS = frozenset(("image", "k", "embedder"))


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "bad_request", f"invalid Content-Length {length!r}") from None
        if declared > limit:
            raise ApiError(
                413, "body_too_large", f"request body of {declared} bytes exceeds the limit of {limit} bytes"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, limit: int) -> dict[str, Any]:
    """The query in the body of `request` (at most `limit` bytes); ApiError says what is wrong."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/json", "multipart/form-data", ""):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type!r} is not supported; send application/json or multipart/form-data",
        )
    body = await _read_body(request, limit)
    if media_type == "multipart/form-data":
        return await _parse_form(request, body, limit)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    return _parse_json(payload)


def _parse_json(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_json", f"the body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(payload.keys() - JSON_FIELDS)
    if unknown:
        raise ApiError(
            400,
            "unknown_field",
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(JSON_FIELDS))}",
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
    return query


def _common_fields(fields: dict[str, Any]) -> dict[str, Any]:
    kinds = [kind for kind in QUERY_KINDS if kind in fields]
    if len(kinds) != 1:
        got = ", ".join(kinds) or "none"
        raise ApiError(400, "query_kind", f'give exactly one of "vector", "image", "id" (got {got})')
    k = fields.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ApiError(400, "bad_k", f'"k" must be an integer from 1 to {MAX_K}, got {k!r}')
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
                f"unknown form field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(FORM_FIELDS))}",
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
                    400, "bad_k", f'"k" must be an integer from 1 to {MAX_K}, got {form["k"]!r}'
                ) from None
        if "embedder" in form:
            fields["embedder"] = form["embedder"] if isinstance(form["embedder"], str) else None
        query = _common_fields(fields)
    finally:
        await form.close()
    if not data:
        raise ApiError(400, "query_kind", 'the uploaded "image" file is empty')
    query.update(value=data, exclude_self=False)
    return query
