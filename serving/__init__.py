"""Serving: `Searcher` answers vector, image and id queries against a published run.

`serving.http` (optional extra `serve`: Starlette + hypercorn) puts it behind HTTP.
Importing this package loads NumPy only; ScaNN and pyarrow are imported by
`Searcher.open`, TensorFlow by the first image query.
"""

from retrieval.rerank import QueryExpansion
from serving.errors import (
    BadImageError,
    DimensionMismatchError,
    EmbedderRequiredError,
    NonFiniteQueryError,
    QueryError,
    UnknownEmbedderError,
    UnknownIdError,
)
from serving.results import SearchHit, SearchResult
from serving.searcher import Searcher

__all__ = [
    "BadImageError",
    "DimensionMismatchError",
    "EmbedderRequiredError",
    "NonFiniteQueryError",
    "QueryError",
    "QueryExpansion",
    "SearchHit",
    "SearchResult",
    "Searcher",
    "UnknownEmbedderError",
    "UnknownIdError",
]
