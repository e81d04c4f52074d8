"""Database-side augmentation (DBA): each indexed vector replaced, at build time, by the
weighted average of itself and its top-n neighbours (weights: cosine similarity ** alpha,
itself 1), re-normalised (`retrieval.rerank.weighted_directions`; for dot_product each row
keeps its length).  It costs nothing at query time.

`build_index(..., dba=DatabaseAugmentation(n, alpha))` indexes the augmented vectors (ScaNN
searches and reorders with them, and they are the index's `indexed_vectors()`), while the
stored vectors (`stored_vectors()`: id queries, `Searcher.get_vector`) stay the originals,
kept in ORIGINALS_FILE.  The manifest's `dba` records n, alpha, how the neighbours were found
and the seconds it took.  The neighbours are the index's own ranking of the original rows
(after any build-time PCA), the row itself left out.

Finding the neighbours is the cost (BENCHMARKS.md, re-ranking): exact chunked search
(`retrieval.exact`) took 10 s for 20,000 x 1,280 and 62-72 s for 100,000 x 256 on the 2-core
machine here (~25 s per 10^12 multiply-adds, n^2 * d), growing with n^2; neighbours from a
tree-AH index of the originals (built first, at the build's recall target) took 13-15 s for
both, with 96-99% of the rows equal to the exact DBA, and 393 s for 1,000,000 x 256 (where
exact search would take hours).  So up to EXACT_MAX_WORK (about a minute of exact search:
~48,000 rows at d = 1,280, ~108,000 at d = 256) the neighbours are exact; above, from the
index.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import numpy as np

from retrieval.errors import ConfigError, IndexFormatError
from retrieval.npy_stream import NpyWriter, chunk_bounds, open_read, release_pages
from retrieval.rerank import EXPANDABLE, weighted_directions

log = logging.getLogger(__name__)

# The index directory's copy of the original (un-augmented) vectors, by row, float32 (n, d),
# normalised for cosine: the stored vectors of a DBA index.
ORIGINALS_FILE = "original_vectors.npy"
MAX_DBA_N = 100
# n^2 * d above which the neighbours come from an index of the originals instead of exact
# search (about a minute of exact search at the rate measured above).
EXACT_MAX_WORK = 3e12
# Rows augmented per step: their neighbour lists and gathered vectors stay small.
QUERY_CHUNK_ROWS = 4096
NEIGHBOURS = ("exact", "index")


@dataclasses.dataclass(frozen=True)
class DatabaseAugmentation:
    """DBA with each row's top `n` neighbours (1..MAX_DBA_N), weighted by cosine ** `alpha`
    (finite, >= 0).  ConfigError for other values."""

    n: int
    alpha: float

    def __post_init__(self) -> None:
        n, alpha = self.n, self.alpha
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_DBA_N:
            raise ConfigError(f"DBA n (--dba_n) must be an integer from 1 to {MAX_DBA_N}, got {n!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
            raise ConfigError(f"DBA alpha (--dba_alpha) must be a finite number >= 0, got {alpha!r}")
        object.__setattr__(self, "n", int(n))
        object.__setattr__(self, "alpha", float(alpha))

    @classmethod
    def from_record(cls, record: Any, source: str = "the index manifest") -> DatabaseAugmentation | None:
        """The DBA an index manifest's `dba` record describes (None: none); IndexFormatError
        when the record is damaged."""
        if record is None:
            return None
        try:
            return cls(record["n"], record["alpha"])
        except (TypeError, KeyError, ConfigError) as exc:
            raise IndexFormatError(
                f"{source}: the dba record {record!r} is damaged ({exc}); rebuild the index"
            ) from exc


def describe(record: dict[str, Any] | None) -> str:
    """An index's DBA record as the build summary and `imgindex inspect` show it:
    " dba(n=3, alpha=3)", or "" without DBA."""
    return "" if not record else f" dba(n={record.get('n')}, alpha={record.get('alpha')})"


def check_distance(distance: str) -> None:
    if distance not in EXPANDABLE:
        raise ConfigError(
            f"DBA averages vectors weighted by their similarity; it needs distance "
            f"{' or '.join(EXPANDABLE)}, got {distance}"
        )


def augment(
    originals: np.ndarray,
    dba: DatabaseAugmentation,
    distance: str,
    out_path: str | os.PathLike[str],
    *,
    neighbours: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    target_recall: float = 0.95,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The augmented rows of `originals` (n, d) written to `out_path` (.npy), as a read-only
    memory map, and the manifest's `dba` record (n, alpha, neighbours, neighbours_found, seconds).

    originals: the rows the index will search, finite (normalised for cosine), e.g. a memory
      map; read in chunks.
    neighbours: "exact" or "index" (default: exact up to EXACT_MAX_WORK); "index" builds a
      tree-AH index of the originals in `work_dir` aiming at `target_recall`.
    """
    check_distance(distance)
    if neighbours is not None and neighbours not in NEIGHBOURS:
        raise ConfigError(f"DBA neighbours must be one of {', '.join(NEIGHBOURS)}, got {neighbours!r}")
    start = time.perf_counter()
    n, d = originals.shape
    want = min(dba.n, n - 1)  # a row has at most n - 1 others
    method = neighbours or ("exact" if float(n) * n * d <= EXACT_MAX_WORK else "index")
    search = (
        _exact_neighbours
        if method == "exact"
        else _index_neighbours(originals, distance, want, work_dir, target_recall)
    )
    with NpyWriter(out_path, (n, d), np.float32) as out:
        for lo, hi in chunk_bounds(n, QUERY_CHUNK_ROWS):
            rows = np.asarray(originals[lo:hi], dtype=np.float32)
            if want == 0:
                out.append(rows)
                continue
            others = _others(search(rows, originals, want + 1, distance), lo, want)
            hits = np.asarray(originals[np.maximum(others, 0).ravel()], dtype=np.float32)
            out.append(
                weighted_directions(
                    rows,
                    hits.reshape(len(rows), want, d),
                    dba.alpha,
                    keep_length=distance == "dot_product",
                    present=others >= 0,
                )
            )
            release_pages(originals)
    seconds = round(time.perf_counter() - start, 3)
    log.info("DBA (n=%d, alpha=%g) of %d rows: %s neighbours in %.1f s", dba.n, dba.alpha, n, method, seconds)
    record = {
        "n": dba.n,
        "alpha": dba.alpha,
        "neighbours": method,
        "neighbours_found": want,
        "seconds": seconds,
    }
    return open_read(out_path), record


def _others(found: list[np.ndarray], first_row: int, want: int) -> np.ndarray:
    """(m, want) int64: each row's neighbours without itself (it weighs 1 already), best
    first, -1 where the search found fewer."""
    out = np.full((len(found), want), -1, dtype=np.int64)
    for i, candidates in enumerate(found):
        others = np.asarray(candidates)
        others = others[others != first_row + i][:want]
        out[i, : len(others)] = others
    return out


def _exact_neighbours(rows: np.ndarray, database: np.ndarray, k: int, distance: str) -> list[np.ndarray]:
    from retrieval.exact import exact_search_by_chunks

    found, _ = exact_search_by_chunks(rows, database, k, distance)
    return list(found)


def _index_neighbours(
    originals: np.ndarray,
    distance: str,
    want: int,
    work_dir: str | os.PathLike[str] | None,
    target_recall: float,
) -> Any:
    """A search function answering from a tree-AH index of the originals (built here)."""
    import pyarrow as pa

    from retrieval.index import build_index, choose_config

    n, d = originals.shape
    config = choose_config(n, d, distance, k=want + 1, method="tree_ah")
    ids = pa.array(np.arange(n).astype(str))
    index = build_index(
        originals,
        ids,
        distance=distance,
        config=config,
        k=want + 1,
        target_recall=target_recall,
        work_dir=work_dir,
    )
    log.info(
        "DBA neighbours from a tree-AH index of the originals (recall@%d %s)",
        want + 1,
        index.recall.get("value"),
    )

    def search(rows: np.ndarray, database: np.ndarray, k: int, distance: str) -> list[np.ndarray]:
        found, _ = index.search_batch_rows(rows, k)
        return found

    return search
