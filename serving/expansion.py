"""Vector queries of the `Searcher`, plain or with alpha query expansion (`expand=`).

The expansion itself is `retrieval.rerank`: the first round asks the index for the query's
top n, their vectors are the index's own (`indexed_vectors`: in the space the index searches,
after its PCA, augmented with DBA), and the expanded query is searched for the k results.
Results are the same `SearchResult`s as unexpanded queries'.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retrieval.errors import QueryError
from retrieval.queries import check_k
from retrieval.rerank import EXPANDABLE, QueryExpansion, check_expandable, expanded_search_rows
from serving.queries import to_result
from serving.results import SearchResult
from serving.run_state import EmbedderState, RunState


def check_expansion(emb: EmbedderState, expand: object) -> None:
    """QueryError unless `expand` is None or a QueryExpansion the embedder's index can do."""
    if expand is None:
        return
    if not isinstance(expand, QueryExpansion):
        raise QueryError(
            f"expand must be a retrieval.rerank.QueryExpansion(n, alpha) or None, got {type(expand).__name__}",
            code="bad_expand",
        )
    check_expandable(emb.index.distance, f"the index of embedder {emb.name!r}")


def query_expansion(index: Any) -> bool:
    """Whether queries of `index` (a SearchableIndex) can be expanded (for `info()`)."""
    return index.distance in EXPANDABLE and index.indexed_vectors() is not None


def vector_results(
    state: RunState, emb: EmbedderState, vector: Any, k: int, expand: QueryExpansion | None
) -> SearchResult | list[SearchResult]:
    """One query (d,) -> SearchResult, or each row of (q, d) -> a list of them."""
    check_expansion(emb, expand)
    if isinstance(vector, (list, tuple)):
        try:
            vector = np.asarray(vector)  # once, e.g. a JSON list
        except (TypeError, ValueError):
            pass  # ragged: the index says what is wrong with it
    batch = isinstance(vector, np.ndarray) and vector.ndim == 2
    index = emb.index
    if expand is None:
        if batch:
            row_lists, scores = index.search_batch_rows(vector, k=k)
            return [to_result(state, emb, rows, row_scores) for rows, row_scores in zip(row_lists, scores)]
        return to_result(state, emb, *index.search_rows(vector, k=k))
    k = check_k(k, index.max_k, f"the index of embedder {emb.name!r}")
    prepared = index.prepare_queries(vector) if batch else index.prepare_query(vector)[None]
    row_lists, scores = expanded_search_rows(index, prepared, k, expand)
    results = [to_result(state, emb, rows, row_scores) for rows, row_scores in zip(row_lists, scores)]
    return results if batch else results[0]


def expanded_id_result(
    state: RunState, emb: EmbedderState, row: int, k: int, expand: QueryExpansion, exclude_self: bool
) -> SearchResult:
    """An id query with expansion: the item's stored vector (with DBA its original) is the
    query; exclude_self leaves its row out of both rounds."""
    check_expansion(emb, expand)
    query = np.array(emb.vectors[row], dtype=np.float32)[None]  # stored rows are in the index's space
    rows, scores = expanded_search_rows(
        emb.index, query, k, expand, exclude_rows=[row] if exclude_self else None
    )
    return to_result(state, emb, rows[0], scores[0])
