"""Exact (brute-force) top-k search in NumPy: the baseline that ANN recall is measured against.

Scores follow ScaNN's convention so the two can be compared directly:

- "dot_product": score = <q, x>, higher is better.
- "cosine": score = <q/|q|, x>, higher is better.  The database must already be
  L2-normalised (see `normalize_rows`); queries are normalised here.
- "squared_l2": score = |q - x|^2, lower is better.

The query x database score matrix is computed block by block, so memory stays
bounded by `block_elements` scores however large q and n are.  Ties are broken
by database row index (lower index first), which makes results deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import ConfigError

if TYPE_CHECKING:  # numpy.typing costs an import at run time
    import numpy.typing as npt

DISTANCES = ("dot_product", "cosine", "squared_l2")

# 4M float32 scores = 16 MiB per block (plus the int64 argpartition result).
DEFAULT_BLOCK_ELEMENTS = 1 << 22
_QUERY_BLOCK_ROWS = 256


def check_distance(distance: str) -> None:
    """Raise ConfigError unless `distance` is one of DISTANCES."""
    if distance not in DISTANCES:
        raise ConfigError(f"Unknown distance {distance!r}; allowed values: {', '.join(DISTANCES)}.")


_SMALL_NORM = 1e-15  # below this a float32 norm may have lost precision to underflow


def unit_rows(
    x: npt.ArrayLike, in_place: bool = False, on_zero_rows: Callable[[np.ndarray], None] | None = None
) -> np.ndarray:
    """Return `x` (2-D) as float32 with every row scaled to unit L2 norm; all-zero rows
    stay zero, or `on_zero_rows(indices)` is called first (it may raise; nothing is
    written before it).

    A new array unless `in_place` and `x` is already a float32 C-contiguous ndarray, which
    is then modified and returned.  A float32 sum of squares overflows above ~1.8e19 and
    underflows below ~1e-19: such rows (rare) are scaled by their largest component and
    normalised in float64 instead, so any finite non-zero row keeps its direction.
    """
    out = np.array(x, dtype=np.float32, order="C", copy=None if in_place else True)
    if len(out) == 1:  # one query: scalar arithmetic, faster than the array path below
        with np.errstate(over="ignore", under="ignore"):  # the extreme rows go below
            norm = math.sqrt(float(np.dot(out[0], out[0])))
        if _SMALL_NORM < norm < math.inf:
            out /= np.float32(norm)
            return out
    # einsum, unlike np.linalg.norm(axis=1), allocates no (n, d) temporary.
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    extreme = np.flatnonzero(~(norms > _SMALL_NORM) | ~(norms < np.inf))
    if extreme.size:
        rows = out[extreme].astype(np.float64)
        largest = np.abs(rows).max(axis=1, keepdims=True)
        zero = largest[:, 0] == 0
        if zero.any() and on_zero_rows is not None:
            on_zero_rows(extreme[zero])
        largest[zero] = 1.0
        rows /= largest
        lengths = np.linalg.norm(rows, axis=1, keepdims=True)
        lengths[zero] = 1.0
        out[extreme] = rows / lengths
        norms[extreme] = 1.0
    out /= norms[:, None]
    return out


def normalize_rows(
    x: npt.ArrayLike, what: str = "vectors", in_place: bool = False, row_offset: int = 0
) -> np.ndarray:
    """`unit_rows`, refusing zero rows: raises ConfigError naming the first (numbered from
    `row_offset`, for a chunk of a larger matrix), since a zero vector has no direction, so
    cosine is undefined for it."""

    def refuse(zero_rows: np.ndarray) -> None:
        raise ConfigError(
            f"{what}: {zero_rows.size} row(s) have zero L2 norm (first: row {row_offset + zero_rows[0]}); "
            "cosine distance is undefined for zero vectors. Remove them or use "
            "distance='squared_l2'."
        )

    return unit_rows(x, in_place, on_zero_rows=refuse)


def exact_search(
    queries: npt.ArrayLike,
    database: npt.ArrayLike,
    k: int,
    distance: str,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k neighbours of each query row among the database rows.

    Args:
      queries: (q, d) array.
      database: (n, d) array; for "cosine" its rows must be unit-normalised.
      k: number of neighbours; values above n are clamped to n.
      distance: one of DISTANCES.
      block_elements: upper bound on the number of scores materialised at once.

    Returns:
      (indices int64 [q, min(k, n)], scores float32 [q, min(k, n)]), best first.
    """
    check_distance(distance)
    queries, database = _check_arrays(queries, database)
    queries, k = _prepare(queries, database.shape[0], k, distance)
    # Keys are "higher is better" throughout: squared_l2 keys are negated distances.
    db_sq_norms = _sq_norms(database) if distance == "squared_l2" else None

    if queries.shape[0] == 0:
        return _no_results(k)
    q_block, db_block = _block_sizes(queries.shape[0], block_elements)
    indices = np.empty((queries.shape[0], k), dtype=np.int64)
    keys = np.empty((queries.shape[0], k), dtype=np.float32)
    for q0 in range(0, queries.shape[0], q_block):
        q_rows = slice(q0, q0 + q_block)
        indices[q_rows], keys[q_rows] = _search_query_block(
            queries[q_rows], database, db_sq_norms, k, db_block
        )
    if distance == "squared_l2":
        # Keys are -sum((q - x)^2) <= 0, so abs() is the distance, and never -0.0.
        np.abs(keys, out=keys)
    return indices, keys


def exact_search_by_chunks(
    queries: npt.ArrayLike,
    database: np.ndarray,
    k: int,
    distance: str,
    *,
    normalize_database: bool = False,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`exact_search` over `database` one row chunk at a time; same results and ties.

    For a database too large to copy (e.g. a memory map: its pages are released after each
    chunk).  normalize_database: L2-normalise each chunk first (cosine over raw rows).
    For dot product and cosine, each query block's top k is carried from chunk to chunk, so
    after the first block only the scores that beat the current k-th best are gathered,
    which saves time on top of the matrix products.
    """
    check_distance(distance)
    if distance == "squared_l2":
        return _by_chunks_merged(queries, database, k, distance, normalize_database, chunk_rows)
    from retrieval.npy_stream import CHUNK_ROWS, chunk_bounds, release_pages

    queries, _ = _check_arrays(queries, database[:1])  # the rows are checked chunk by chunk
    queries, k = _prepare(queries, database.shape[0], k, distance)
    if queries.shape[0] == 0:
        return _no_results(k)
    q_block, db_block = _block_sizes(queries.shape[0], DEFAULT_BLOCK_ELEMENTS)
    starts = range(0, queries.shape[0], q_block)
    best: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(starts)
    for start, stop in chunk_bounds(database.shape[0], chunk_rows or CHUNK_ROWS):
        chunk = np.asarray(database[start:stop], dtype=np.float32)
        if normalize_database:
            chunk = normalize_rows(chunk, what="database", row_offset=start)
        check_finite(chunk, "database", row_offset=start)
        for i, q0 in enumerate(starts):
            best[i] = _search_query_block(
                queries[q0 : q0 + q_block], chunk, None, k, db_block, best=best[i], offset=start
            )
        release_pages(database)
    done = [b for b in best if b is not None]  # all of them: every block saw every chunk
    return np.concatenate([b[0] for b in done]), np.concatenate([b[1] for b in done])


def _by_chunks_merged(
    queries: npt.ArrayLike,
    database: np.ndarray,
    k: int,
    distance: str,
    normalize_database: bool,
    chunk_rows: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """exact_search on each chunk, merged.  Used for squared_l2, whose scan keys (an
    expansion) are re-scored exactly only at the end of each chunk, so a threshold carried
    from earlier chunks would compare keys of different precision."""
    from retrieval.npy_stream import CHUNK_ROWS, chunk_bounds, release_pages

    best: tuple[np.ndarray, np.ndarray] | None = None
    for start, stop in chunk_bounds(database.shape[0], chunk_rows or CHUNK_ROWS):
        chunk = database[start:stop]
        if normalize_database:
            chunk = normalize_rows(chunk, what="database", row_offset=start)
        rows, scores = exact_search(queries, chunk, k, distance)
        release_pages(database)
        rows = rows + start
        if best is not None:
            rows = np.concatenate([best[0], rows], axis=1)
            scores = np.concatenate([best[1], scores], axis=1)
            # Stable, and earlier chunks come first: equal scores keep the lower row first.
            order = np.argsort(scores, axis=1, kind="stable")[:, :k]
            rows = np.take_along_axis(rows, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
        best = rows, scores
    assert best is not None  # chunk_bounds gives at least one chunk
    return best


def _prepare(queries: np.ndarray, n: int, k: int, distance: str) -> tuple[np.ndarray, int]:
    """(queries, k): queries normalised for cosine, k checked and clamped to the n rows."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}.")
    if distance == "cosine":
        queries = normalize_rows(queries, what="queries")
    return queries, min(k, n)


def _no_results(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)


def _block_sizes(num_queries: int, block_elements: int) -> tuple[int, int]:
    """(query rows, database rows) per scored block, at most block_elements scores."""
    q_block = max(1, min(_QUERY_BLOCK_ROWS, block_elements, num_queries))
    return q_block, max(1, block_elements // q_block)


def _check_arrays(queries: npt.ArrayLike, database: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    queries = np.asarray(queries, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    if queries.ndim != 2 or database.ndim != 2:
        raise ConfigError(
            f"queries and database must be 2-D, got shapes {queries.shape} and {database.shape}."
        )
    if database.shape[0] == 0:
        raise ConfigError("database is empty.")
    if queries.shape[1] != database.shape[1]:
        raise ConfigError(
            f"Dimension mismatch: queries have {queries.shape[1]} columns, database has {database.shape[1]}."
        )
    check_finite(queries, "queries")
    check_finite(database, "database")
    return queries, database


def check_finite(x: np.ndarray, what: str, rows_per_chunk: int = 65536, row_offset: int = 0) -> None:
    """Raise ConfigError naming the first row of `x` (2-D) holding NaN or infinity
    (numbered from `row_offset`, for a chunk of a larger matrix).

    Checked in row chunks so the boolean temporary stays small for large matrices.
    """
    for r0 in range(0, x.shape[0], rows_per_chunk):
        bad = ~np.isfinite(x[r0 : r0 + rows_per_chunk]).all(axis=1)
        if bad.any():
            row = row_offset + r0 + int(np.argmax(bad))
            raise ConfigError(
                f"{what}: row {row} contains NaN or infinite values (after conversion to "
                "float32); all vector components must be finite."
            )


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _search_query_block(
    queries: np.ndarray,
    database: np.ndarray,
    db_sq_norms: np.ndarray | None,
    k: int,
    db_block: int,
    best: tuple[np.ndarray, np.ndarray] | None = None,
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (indices, keys) for one block of queries, scanning the database in column blocks.

    best: the (indices, keys) found so far in earlier rows (indices below `offset`, the row
    number of database[0]), to continue from.
    """
    if best is None:
        best_idx = np.empty((queries.shape[0], 0), dtype=np.int64)
        best_keys = np.empty((queries.shape[0], 0), dtype=np.float32)
    else:
        best_idx, best_keys = best
    q_sq_norms = _sq_norms(queries) if db_sq_norms is not None else None
    for n0 in range(0, database.shape[0], db_block):
        block = database[n0 : n0 + db_block]
        keys = queries @ block.T
        if db_sq_norms is not None and q_sq_norms is not None:
            # -|q-x|^2 = 2<q,x> - |q|^2 - |x|^2
            keys *= 2.0
            keys -= q_sq_norms[:, None]
            keys -= db_sq_norms[None, n0 : n0 + db_block]
        beating = _beating_best(keys, best_keys, k)
        if beating is None:
            local = _top_k_by_position(keys, k)
            local_keys = np.take_along_axis(keys, local, axis=1)
        else:
            local, local_keys = beating
        cand_idx = np.concatenate([best_idx, local + (offset + n0)], axis=1)
        cand_keys = np.concatenate([best_keys, local_keys], axis=1)
        best_idx, best_keys = _top_k_sorted(cand_idx, cand_keys, k)
    if db_sq_norms is not None:
        best_keys = _negated_squared_distances(queries, database, best_idx, db_block)
        best_idx, best_keys = _top_k_sorted(best_idx, best_keys, k)
    return best_idx, best_keys


def _beating_best(keys: np.ndarray, best_keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions, keys) of the block's keys above each query's current k-th best, padded
    with -inf, or None (use argpartition) when there is no full finite top k yet or too
    many keys beat it.

    Once k neighbours are known, few keys of a later block beat the k-th best, and a
    comparison plus np.nonzero costs far less than argpartition over the whole block.
    Only strictly greater keys can enter: a later block's equal key has a higher row, so it
    loses the tie.
    """
    # -inf padding must rank below every real key, so the k-th best has to be finite.
    if best_keys.shape[1] < k or not np.isfinite(best_keys[:, k - 1]).all():
        return None
    rows, cols = np.nonzero(keys > best_keys[:, k - 1 : k])
    if rows.size > 4 * k * keys.shape[0]:
        return None
    counts = np.bincount(rows, minlength=keys.shape[0])
    width = max(1, int(counts.max(initial=0)))
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.zeros((keys.shape[0], width), dtype=np.int64)
    picked = np.full((keys.shape[0], width), -np.inf, dtype=np.float32)
    positions[rows, slot] = cols
    picked[rows, slot] = keys[rows, cols]
    return positions, picked


def _negated_squared_distances(
    queries: np.ndarray, database: np.ndarray, indices: np.ndarray, block_elements: int
) -> np.ndarray:
    """-sum((q - x)^2) for each query and each of its selected database rows.

    The expansion used for scanning loses precision to cancellation when norms are
    large (error ~ |x|^2 * 1e-7 in float32), so the winners are re-scored directly,
    in row chunks of at most `block_elements` gathered vectors.
    """
    keys = np.empty(indices.shape, dtype=np.float32)
    rows = max(1, block_elements // (indices.shape[1] * queries.shape[1]))
    for r0 in range(0, len(queries), rows):
        diffs = database[indices[r0 : r0 + rows]] - queries[r0 : r0 + rows, None, :]
        keys[r0 : r0 + rows] = -np.einsum("qkd,qkd->qk", diffs, diffs)
    return keys


def _top_k_by_position(keys: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the k highest keys per row, ties going to the lower position.

    argpartition is O(n) but picks arbitrarily among keys equal to the k-th
    value; rows where such a tie straddles the cut-off fall back to a stable sort.
    """
    if k >= keys.shape[1]:
        return np.argsort(-keys, axis=1, kind="stable")
    n = keys.shape[1]
    picked = np.argpartition(keys, n - k, axis=1)[:, n - k :]
    kth = np.take_along_axis(keys, picked, axis=1).min(axis=1)
    ambiguous = np.flatnonzero(np.count_nonzero(keys >= kth[:, None], axis=1) > k)
    if ambiguous.size:
        picked[ambiguous] = np.argsort(-keys[ambiguous], axis=1, kind="stable")[:, :k]
    return picked


def _top_k_sorted(indices: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (indices, keys) per row, sorted by key descending then index ascending."""
    order = np.lexsort((indices, -keys), axis=1)[:, :k]
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(keys, order, axis=1)
