"""Query vectors checked and made ready for ScaNN: the one place that does it.

Every loaded index (`retrieval.index.Index`, `retrieval.sharded.ShardedIndex`) calls these on
the vectors its callers hand it, so serving and the Python API refuse the same queries with
the same errors:

- the vector must be real numbers of the dimension the index takes (the embedder's; an index
  with a build-time PCA projects the query itself);
- every component must be finite after conversion to float32;
- for cosine, the query is reduced to its direction (`retrieval.exact.unit_rows`, safe for
  huge and tiny values), and a vector without one (all zeros, or projected to zero) is refused.

The errors are `QueryError`s with a stable `code` (HTTP maps them to 400).
"""

from __future__ import annotations

import math

import numpy as np

from retrieval.errors import DimensionMismatchError, NonFiniteQueryError, QueryError
from retrieval.exact import unit_rows

# Below this, float64 query values lose precision (or become 0) as float32.
_FLOAT32_TINY = 1e-30
# The most neighbours any query may ask (HTTP's limit too); an index built with
# --serve_max_k serves at most that many.
MAX_K = 1000


def check_k(k: object, max_k: int | None = None, label: str = "the index") -> int:
    """k as an int, or QueryError (code bad_k) unless it is an integer >= 1 and at most
    `max_k`: the largest k whose recall the index's build measured (None: no limit, an index
    built before the build measured recall per k)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"k must be an integer >= 1, got {k!r}", code="bad_k")
    if max_k is not None and k > max_k:
        raise QueryError(
            f"k={int(k)} is above the most {label} serves, {max_k} (its build measured recall up "
            f"to k={max_k}); ask for k <= {max_k}, or rebuild it with a larger --serve_max_k "
            f"(at most {MAX_K})",
            code="bad_k",
        )
    return int(k)


def prepare_query(
    vector: object,
    *,
    dim: int,
    distance: str,
    projection: np.ndarray | None = None,
    label: str = "the index",
) -> np.ndarray:
    """One query of shape (dim,) -> float32 (index dimension,) ready for ScaNN.

    dim: the dimension callers send (the embedder's); distance: the index's;
    projection: its build-time PCA (`retrieval.projection`), or None; label: how messages
    name the index.
    """
    query = vector if isinstance(vector, np.ndarray) else None
    if query is not None and projection is None and query.shape == (dim,) and query.dtype.kind in "fiu":
        # The common case, on a fast path: a finite vector far from float32's limits
        # (NaN and infinity fail both comparisons and take the general path, which says why).
        with np.errstate(over="ignore"):
            q = query.astype(np.float32)
            norm2 = float(np.dot(q, q))
        if _FLOAT32_TINY < norm2 < math.inf:
            return q / np.float32(math.sqrt(norm2)) if distance == "cosine" else q
    arr = _as_numbers(vector)
    if arr.ndim != 1:
        raise DimensionMismatchError(
            f"search() takes one query of shape ({dim},), got shape {arr.shape}; "
            "use search_batch() for several",
            expected=dim,
            got=arr.shape[-1] if arr.ndim else "a scalar",
        )
    return _prepare(arr[None, :], dim, distance, projection, label, single=True)[0]


def prepare_queries(
    vectors: object,
    *,
    dim: int,
    distance: str,
    projection: np.ndarray | None = None,
    label: str = "the index",
) -> np.ndarray:
    """Queries of shape (q, dim) -> float32 (q, index dimension) ready for ScaNN; see
    `prepare_query`.  Errors name the first bad row."""
    arr = _as_numbers(vectors)
    if arr.ndim != 2:
        got = arr.shape[-1] if arr.ndim else "a scalar"
        raise DimensionMismatchError(
            f"search_batch() takes queries of shape (q, {dim}), got shape {arr.shape}",
            expected=dim,
            got=got,
        )
    return _prepare(arr, dim, distance, projection, label, single=False)


def _as_numbers(vector: object) -> np.ndarray:
    try:
        arr = np.asarray(vector)
        if arr.dtype == bool or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise TypeError(arr.dtype)
    except (TypeError, ValueError) as exc:
        raise QueryError(
            f"the query vector must be numbers, got {type(vector).__name__} ({exc})", code="bad_vector"
        ) from exc
    return arr


def _prepare(
    arr: np.ndarray, dim: int, distance: str, projection: np.ndarray | None, label: str, single: bool
) -> np.ndarray:
    if arr.shape[-1] != dim:
        got = arr.shape[-1]
        shape = arr.shape[1:] if single else arr.shape
        raise DimensionMismatchError(
            f"{label} holds vectors of dimension {dim}, got {got} (query shape {shape})",
            expected=dim,
            got=got,
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        queries = np.array(arr, dtype=np.float32, order="C")
    bad = ~np.isfinite(queries).all(axis=1)
    if bad.any():
        where = "" if single else f" (row {int(np.argmax(bad))})"
        raise NonFiniteQueryError(
            f"query vector{where} contains NaN or infinite values (after conversion to float32); "
            "all components must be finite"
        )
    if projection is None and distance == "cosine" and arr.dtype.itemsize > 4:
        # A direction is scale-free: rows of values too small for float32 (1e-50 from a
        # float64 client would become 0) are scaled by their largest magnitude first.
        wide = arr.astype(np.float64, copy=False)
        largest = np.abs(wide).max(axis=1)
        tiny = (largest > 0) & (largest < _FLOAT32_TINY)
        if tiny.any():
            queries[tiny] = wide[tiny] / largest[tiny, None]
    if projection is not None:
        from retrieval.projection import project

        queries = project(queries, projection)
    elif distance == "cosine":
        queries = unit_rows(queries, in_place=True)
    if distance == "cosine":
        zero = ~queries.any(axis=1)
        if zero.any():
            where = "" if single else f" (row {int(np.argmax(zero))})"
            what = "projects to zero by the index's PCA" if projection is not None else "is all zeros"
            raise QueryError(
                f"the query vector{where} {what}: a zero vector has no direction; "
                "cosine similarity is undefined for it",
                code="zero_vector",
            )
    return queries
