"""JSON bodies of the HTTP API (`serving.http`): any value the app answers with, metadata
included, encoded as valid JSON, and the error body every refusal shares.

Metadata values become JSON (NaN/inf -> null, bytes -> base64, dates -> ISO 8601, NumPy
scalars -> numbers), and a lone surrogate echoed from client input is written as its JSON
escape.  Errors are {"error": {"code": ..., "message": ...}}, the message cut to
MAX_MESSAGE_CHARS.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

# An error message is cut to this many characters (each echoed value is already shortened).
MAX_MESSAGE_CHARS = 2000


class SafeJSONResponse(JSONResponse):
    """Starlette's JSONResponse, its content made JSON by `jsonable` and never invalid JSON."""

    def render(self, content: Any) -> bytes:
        # A lone surrogate (JSON lets a client send "\ud800", and error messages echo it) cannot
        # be UTF-8: it is written as its JSON escape, which keeps the answer valid JSON.
        return json.dumps(
            jsonable(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8", "backslashreplace")


def jsonable(value: Any) -> Any:
    """Metadata values as JSON: NaN/inf -> null, bytes -> base64, dates -> ISO 8601."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalar
        return jsonable(value.item())
    return value


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> SafeJSONResponse:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return SafeJSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )
