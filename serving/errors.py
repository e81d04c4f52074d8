"""The errors serving raises, with retrieval's query errors (the index checks queries).

Every one but UnknownIdError is a `QueryError` (HTTP 400 unless said otherwise); `code` is
the stable machine-readable name `serving.http` reports.
"""

from __future__ import annotations

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
        super().__init__(f"id {item_id!r} is not in the index of embedder {embedder!r} (run {run_id})")

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]
