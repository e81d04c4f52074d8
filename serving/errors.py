"""The errors serving raises, with retrieval's query errors (the index checks queries).

Every one but UnknownIdError is a `QueryError` (HTTP 400 unless said otherwise); `code` is
the stable machine-readable name `serving.http` reports.

Messages that name a value the client sent (an id, an embedder name, a field) show it
through `shorten`: at most ECHO_MAX_CHARS characters, so that a 1 MB id does not come back
as a 1 MB answer.
"""

from __future__ import annotations

from typing import Any

from retrieval.errors import DimensionMismatchError, ImgIndexError, NonFiniteQueryError, QueryError

__all__ = [
    "BadImageError",
    "DimensionMismatchError",
    "EmbedderRequiredError",
    "NonFiniteQueryError",
    "QueryError",
    "UnknownEmbedderError",
    "UnknownIdError",
]


# A value from the client is echoed in an error message with at most this many characters.
ECHO_MAX_CHARS = 200


def shorten(value: Any, limit: int = ECHO_MAX_CHARS) -> str:
    """repr(value) cut to `limit` characters with an ellipsis and the full length, for error
    messages that echo client input: shorten("x" * 10**6) -> "'xxx...x'... (1000002 chars)"."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


class UnknownEmbedderError(QueryError):
    code = "unknown_embedder"


class EmbedderRequiredError(QueryError):
    code = "embedder_required"


class BadImageError(QueryError):
    """The query image could not be decoded or is not acceptable (HTTP 422)."""

    code = "undecodable_image"


class UnknownIdError(ImgIndexError, KeyError):
    """An id query named an id that the index does not hold (HTTP 404)."""

    code = "unknown_id"

    def __init__(self, item_id: str, embedder: str, run_id: str):
        self.item_id, self.embedder, self.run_id = item_id, embedder, run_id
        super().__init__(f"id {shorten(item_id)} is not in the index of embedder {embedder!r} (run {run_id})")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]
