"""Re-ranking on the index's own vectors: alpha query expansion (alpha-QE) at query time.

alpha-QE (Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018): search the query's top n, then search again for the k results with

    q' = normalise(q + sum_i w_i x_i),   w_i = max(cos(q, x_i), 0) ** alpha

where q is the query and x_1..x_n its hits, both as unit directions in the space the index
searches (after its build-time PCA; with database-side augmentation, `retrieval.dba`, the
hits are the augmented vectors the index holds).  alpha = 0 weighs every hit 1 (average QE);
a large alpha keeps only near-copies.  For dot_product indexes the expanded query keeps the
query's length, so its scores stay on the scale of an unexpanded query's; for cosine the
length does not matter.  Squared L2 has no similarity to weigh by: refused.

`DatabaseAugmentation` (`retrieval.dba`) uses the same weighted average, with each indexed
vector as the query and its neighbours as the hits (`weighted_directions`).

Whether the query item itself is among the results: a vector or image query that matches an
indexed item finds it (usually first) in both rounds, and its vector is part of the
expansion; an id query with exclude_self leaves that row out of both rounds.

Imports NumPy only (serving imports this module at start).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.errors import QueryError

# The most first-round hits one query may expand with: a bound on a query's work (a row read
# per hit); on the sets measured the gain flattens by n = 10 or turns into a loss from n = 3.
MAX_EXPANSION_N = 100
# Distances whose scores are similarities, the weights of the average.
EXPANDABLE = ("cosine", "dot_product")


@dataclasses.dataclass(frozen=True)
class QueryExpansion:
    """alpha-QE of one query: expand with its top `n` hits (1..MAX_EXPANSION_N), weighted by
    their cosine similarity to the query to the power `alpha` (>= 0, finite).  Raises
    QueryError (code bad_expand) for other values."""

    n: int
    alpha: float

    def __post_init__(self) -> None:
        n, alpha = self.n, self.alpha
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_EXPANSION_N:
            raise QueryError(
                f"query expansion n must be an integer from 1 to {MAX_EXPANSION_N}, got {n!r}",
                code="bad_expand",
            )
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.integer, np.floating))
            or not math.isfinite(alpha)
            or alpha < 0
        ):
            raise QueryError(
                f"query expansion alpha must be a finite number >= 0, got {alpha!r}", code="bad_expand"
            )
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "alpha", float(alpha))

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "alpha": self.alpha}


def check_expandable(distance: str, label: str = "the index") -> None:
    """QueryError (code expand_unsupported) unless queries of a `distance` index can expand."""
    if distance not in EXPANDABLE:
        raise QueryError(
            f"query expansion needs similarities to weigh the hits by, and {label} is {distance}; "
            f"it works for {' and '.join(EXPANDABLE)} indexes only",
            code="expand_unsupported",
        )


def weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """max(s, 0) ** alpha for cosine similarities s (clipped to 1 first: float32 rounding gives
    1.0000001, whose large powers would overflow); 0 ** 0 is 1, so alpha = 0 weighs all 1."""
    return np.power(np.minimum(np.maximum(np.asarray(similarities, dtype=np.float64), 0.0), 1.0), alpha)


def weighted_directions(
    queries: np.ndarray,
    neighbours: Sequence[np.ndarray] | np.ndarray,
    alpha: float,
    keep_length: bool,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """float32 (q, d): each query's direction plus its neighbours' directions weighted by
    `weights` of their cosine to it (the query itself weighs 1), re-normalised; keep_length:
    scaled back to the query's own length (dot product) instead of 1.

    queries: (q, d).  neighbours: per query an (m_i, d) array, any m_i >= 0 (a query with
    none stays as it is); or one (q, m, d) array, of which `present` (q, m) bool, when given,
    says which rows count (DBA augments every row this way, without a loop per row).  Zero
    rows have no direction: a zero query stays zero, a zero neighbour weighs 0.  In float64,
    where no finite float32 vector's squared length overflows or underflows.
    """
    queries64 = np.asarray(queries, dtype=np.float64)
    lengths = np.linalg.norm(queries64, axis=1, keepdims=True)
    out = _directions(queries64, lengths)
    if isinstance(neighbours, np.ndarray) and neighbours.ndim == 3:
        hits64 = neighbours.astype(np.float64)
        hit_directions = _directions(hits64, np.linalg.norm(hits64, axis=2, keepdims=True))
        w = weights(np.einsum("qmd,qd->qm", hit_directions, out), alpha)
        if present is not None:
            w[~present] = 0.0
        out += np.einsum("qm,qmd->qd", w, hit_directions)
    else:
        for i, hits in enumerate(neighbours):
            if len(hits) == 0:
                continue
            hits64 = np.asarray(hits, dtype=np.float64)
            hit_directions = _directions(hits64, np.linalg.norm(hits64, axis=1, keepdims=True))
            out[i] += weights(hit_directions @ out[i], alpha) @ hit_directions  # zero rows add 0
    result = _directions(out, np.linalg.norm(out, axis=1, keepdims=True))
    if keep_length:
        result *= lengths
    return result.astype(np.float32)


def _directions(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """rows / lengths, zero rows staying zero (float64)."""
    return np.divide(rows, lengths, out=np.zeros_like(rows), where=lengths > 0)


def expanded_search_rows(
    index: Any,
    prepared: np.ndarray,
    k: int,
    expansion: QueryExpansion,
    exclude_rows: Sequence[int] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """alpha-QE through a `retrieval.searchable.SearchableIndex`: (q row arrays, float32 (q, k)
    scores NaN-padded), best first, like `search_batch_rows`.

    prepared: (q, d) queries already in the space the index searches (`index.prepare_queries`,
    or stored vectors); the first round asks the index for `expansion.n` hits, whose vectors
    (`index.indexed_vectors()`) expand each query, and the second for k.  exclude_rows: per
    query a row left out of both rounds (an id query's own row), or None.
    """
    check_expandable(index.distance, _label(index))
    vectors = index.indexed_vectors()
    if vectors is None:
        raise QueryError(
            f"{_label(index)} stores no vectors, so its queries cannot be expanded; query without expand",
            code="expand_unsupported",
        )
    prepared = np.asarray(prepared, dtype=np.float32)
    extra = 0 if exclude_rows is None else 1  # one more, in case the excluded row is among them
    first, _ = index.search_prepared_rows(prepared, expansion.n + extra)
    first = _without(first, exclude_rows, expansion.n)
    hits = [np.array([vectors[int(row)] for row in rows], dtype=np.float32) for rows in first]
    expanded = weighted_directions(prepared, hits, expansion.alpha, keep_length=index.distance != "cosine")
    rows, scores = index.search_prepared_rows(expanded, k + extra)
    if exclude_rows is None:
        return list(rows), scores
    kept = _without(rows, exclude_rows, k)
    out = np.full((len(kept), min(k, index.n)), np.nan, dtype=np.float32)
    for i, (before, after) in enumerate(zip(rows, kept)):
        out[i, : len(after)] = scores[i][: len(before)][np.isin(before, after)][: len(after)]
    return kept, out


def _without(row_lists: Sequence[np.ndarray], exclude: Sequence[int] | None, limit: int) -> list[np.ndarray]:
    if exclude is None:
        return [np.asarray(rows)[:limit] for rows in row_lists]
    return [np.asarray(rows)[np.asarray(rows) != row][:limit] for rows, row in zip(row_lists, exclude)]


def _label(index: Any) -> str:
    name = (index.embedder or {}).get("name")
    return "the index" if not isinstance(name, str) else f"the index of embedder {name!r}"
