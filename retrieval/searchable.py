"""What a loaded index offers its readers, whatever its layout on disk.

`retrieval.index.Index` (one ScaNN searcher) and `retrieval.sharded.ShardedIndex` (several,
merged) both implement `SearchableIndex`; `retrieval.sharded.open_index` and
`retrieval.runs.open_index` return one.  Readers such as `serving` use only this interface,
never the index's file names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SearchableIndex(Protocol):
    """A loaded index: rows 0..n-1, each with an id, answering nearest-neighbour queries.

    Queries are vectors in the embedder's space, of dimension `input_dim`; the index checks
    them (`retrieval.queries`: numbers, dimension, finite, a direction for cosine), applies its
    build-time projection if it has one, and raises `retrieval.errors.QueryError` for a query
    the caller can fix.  Scores: similarities for cosine and dot product (highest first),
    squared distances for squared L2 (lowest first).
    """

    @property
    def n(self) -> int:
        """Number of indexed vectors (rows)."""

    @property
    def d(self) -> int:
        """Dimension of the indexed vectors (after any projection)."""

    @property
    def input_dim(self) -> int:
        """Dimension of query vectors: the embedder's (`d` unless there is a projection)."""

    @property
    def distance(self) -> str:
        """ "cosine", "dot_product" or "squared_l2"."""

    @property
    def method(self) -> str:
        """How it searches: "brute_force", "tree_ah", or "sharded(<N>x <methods>)"."""

    @property
    def ids(self) -> np.ndarray:
        """row -> id (a NumPy object array of str)."""

    @property
    def projection(self) -> np.ndarray | None:
        """The build-time PCA (float32 (d + 1, input_dim): mean, then axes), or None."""

    @property
    def recall(self) -> dict[str, Any]:
        """The recall record measured at build time (k, value, n_queries, target, per_k, ...)."""

    @property
    def search_defaults(self) -> dict[str, Any]:
        """Search knobs used when a query does not set them (k, and the tree-AH knobs)."""

    @property
    def max_k(self) -> int | None:
        """The most neighbours a query may ask (the build's --serve_max_k, up to which recall was
        measured; more is a QueryError with code bad_k), or None for an index built before it
        was recorded (no limit of its own)."""

    @property
    def embedder(self) -> dict[str, Any] | None:
        """The spec of the embedder that made the vectors (`EmbedderSpec.to_dict()`), or None."""

    @property
    def dba(self) -> dict[str, Any] | None:
        """The database-side augmentation the index was built with (`retrieval.dba`: n, alpha,
        ...), or None."""

    def metadata(self) -> Any:
        """Per-row metadata as a pyarrow Table without `id`, rows aligned with `ids`, or None."""

    def stored_vectors(self) -> Any:
        """The items' vectors by row (`[row]` gives float32 (d,), normalised for cosine), or None:
        the indexed vectors, or with DBA the originals (id queries use these)."""

    def indexed_vectors(self) -> Any:
        """The vectors the index searches by row (with DBA the augmented ones), or None."""

    def prepare_query(self, query: Any) -> np.ndarray:
        """One query (input_dim,) checked and mapped into the space the index searches:
        float32 (d,) (projected, normalised for cosine), as the search methods do."""

    def prepare_queries(self, queries: Any) -> np.ndarray:
        """Queries (q, input_dim) checked and mapped into the space the index searches (q, d)."""

    def search_prepared_rows(
        self, queries: np.ndarray, k: int | None = None
    ) -> tuple[Sequence[np.ndarray], np.ndarray]:
        """`search_batch_rows` of queries already in the index's space (q, d): prepared ones,
        stored or indexed vectors, or expanded queries (`retrieval.rerank`)."""

    def search_rows(self, query: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One query (input_dim,) -> (rows, float32 scores), best first, at most k."""

    def search_batch_rows(
        self, queries: Any, k: int | None = None
    ) -> tuple[Sequence[np.ndarray], np.ndarray]:
        """Queries (q, input_dim) -> (q row arrays, float32 (q, k) scores NaN-padded), best first."""

    def neighbours_of_row(self, row: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours (rows, float32 scores) of the indexed vector at `row`, best first."""
