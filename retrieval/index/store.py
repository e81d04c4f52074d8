"""`Index`, a searchable ScaNN index with string ids, and `load_index`, which reads one from
its directory (`retrieval.index.directory` saves and reads it; `retrieval.index.files`
describes the layout).

Loading and searching use ScaNN's pybind API only and never import TensorFlow.

A search for k uses the tree-AH knobs the build tuned at the smallest k of the index's ladder
(its manifest's recall.per_k) at least k, and k above the ladder's top (search_defaults.max_k)
is refused.  An index built before the ladder existed has neither: it searches with its
search_defaults at any k, as it always did.

Score convention (same as ScaNN and `retrieval.exact`): for "cosine" and
"dot_product" the score is the similarity, higher is better; for "squared_l2"
it is the squared distance, lower is better.  Results are always best first.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval import manifest as mf
from retrieval import scann_assets
from retrieval.dba import ORIGINALS_FILE
from retrieval.errors import ConfigError
from retrieval.index.config import SEARCH_KNOBS, check_positive_int
from retrieval.index.directory import read_index_directory, save_index
from retrieval.index.files import (
    DATASET_FILE,
    ExtraFile,
    StoredVectors,
    open_vectors,
    read_metadata,
)
from retrieval.index.records import SearchLadder
from retrieval.queries import check_k, prepare_queries, prepare_query
from retrieval.scann_import import ScannSearcher

if TYPE_CHECKING:
    import pyarrow as pa


class Index:
    """A searchable ScaNN index with string ids; made by `build_index` or `load_index`.

    Implements `retrieval.searchable.SearchableIndex`.  Queries are in the embedder's space:
    an index saved with a build-time projection (`projection.npy`) projects them itself.
    """

    def __init__(
        self,
        searcher: ScannSearcher,
        ids: np.ndarray | pa.Array,
        manifest: mf.IndexManifest,
        *,
        assets: scann_assets.AssetsDirectory | None = None,
        directory: str | os.PathLike[str] | None = None,
        projection: np.ndarray | None = None,
        extra_files: Mapping[str, ExtraFile] | None = None,
        scratch: scann_assets.AssetsDirectory | None = None,
    ) -> None:
        self._searcher = searcher
        # A numpy object array, or a pyarrow string array as built from Arrow ids: that one
        # becomes Python strings only when a search or `ids` needs them, so a build that
        # just saves never holds a Python object per id.
        self._ids = ids
        self.manifest = manifest
        # Built tree-AH indexes keep the ScaNN assets they were loaded from, so save()
        # links them instead of serialising again (which copies the whole dataset once more).
        self._assets = assets
        self._directory = None if directory is None else Path(directory)
        self._projection = projection
        self._stored_vectors: StoredVectors | None = None
        self._indexed_vectors: StoredVectors | None = None
        # Files the build made for `save` (DBA's originals), in `scratch`, removed with the Index.
        self._extra_files = dict(extra_files or {})
        self._scratch = scratch

    @property
    def n(self) -> int:
        return self.manifest.n

    @property
    def ids(self) -> np.ndarray:
        """row i -> id of vector i (numpy object array)."""
        if not isinstance(self._ids, np.ndarray):
            self._ids = self._ids.to_numpy(zero_copy_only=False).astype(object, copy=False)
        return self._ids

    @property
    def d(self) -> int:
        return self.manifest.d

    @property
    def distance(self) -> str:
        return self.manifest.distance

    @property
    def method(self) -> str:
        return self.manifest.index_config["method"]

    @property
    def recall(self) -> dict[str, Any]:
        """recall record measured at build time"""
        return self.manifest.recall

    @property
    def embedder(self) -> dict[str, Any] | None:
        """the embedder spec (dict) or None"""
        return self.manifest.embedder

    @property
    def directory(self) -> Path | None:
        """the index directory (None until saved)"""
        return self._directory

    @property
    def projection(self) -> np.ndarray | None:
        """The build-time PCA (float32 (index d + 1, input_dim), `retrieval.projection`), or None."""
        return self._projection

    @property
    def input_dim(self) -> int:
        """Dimension of query vectors: the embedder's, before any build-time projection."""
        return self.d if self._projection is None else self._projection.shape[1]

    @property
    def search_defaults(self) -> dict[str, Any]:
        return dict(self.manifest.search_defaults)

    @property
    def max_k(self) -> int | None:
        """The most neighbours a search may ask (the build's serve_max_k), or None for an index
        built before the build measured recall per k (no limit of its own)."""
        return self._ladder.max_k

    def knobs_at(self, k: int) -> dict[str, int]:
        """The tree-AH knobs a search for k neighbours uses (`SearchLadder.knobs_at`); {} for
        brute force."""
        return self._ladder.knobs_at(k) if self.method == "tree_ah" else {}

    @functools.cached_property
    def _ladder(self) -> SearchLadder:
        source = str(self._directory / mf.MANIFEST_NAME) if self._directory else "the index manifest"
        return SearchLadder.of(self.manifest.recall, self.manifest.search_defaults, source)

    def __repr__(self) -> str:
        return f"Index(n={self.n}, d={self.d}, distance={self.distance!r}, method={self.method!r})"

    def metadata(self) -> pa.Table | None:
        """metadata.parquet (without `id`; rows aligned with the ids) as a pyarrow Table, or None."""
        if self._directory is None:
            return None
        return read_metadata(self._directory, self.manifest, self.n)

    @property
    def dba(self) -> dict[str, Any] | None:
        """The database-side augmentation the index was built with (`retrieval.dba`), or None."""
        return self.manifest.dba

    def stored_vectors(self) -> StoredVectors | None:
        """The items' vectors (float32 (n, d), normalised for cosine) by row (`[row]`), or
        None when the directory does not hold them in that form: the indexed vectors, or with
        DBA the originals (`retrieval.dba.ORIGINALS_FILE`).  Opened once, on first use;
        a row read raises IndexFormatError once the file changed (`StoredVectors`)."""
        if ORIGINALS_FILE not in self.manifest.files:
            return self.indexed_vectors()
        if self._stored_vectors is None and self._directory is not None:
            self._stored_vectors = open_vectors(self._directory / ORIGINALS_FILE, self.n, self.d)
        return self._stored_vectors

    def indexed_vectors(self) -> StoredVectors | None:
        """The vectors the index searches, by row (as `stored_vectors`; they differ with DBA)."""
        if self._directory is None or DATASET_FILE not in self.manifest.files:
            return None
        if self._indexed_vectors is None:
            self._indexed_vectors = open_vectors(self._directory / DATASET_FILE, self.n, self.d)
        return self._indexed_vectors

    def prepare_query(self, query: npt.ArrayLike) -> np.ndarray:
        """One query (input_dim,) checked and mapped into the space the index searches (d,)."""
        return prepare_query(
            query, dim=self.input_dim, distance=self.distance, projection=self._projection, label=self._label
        )

    def prepare_queries(self, queries: npt.ArrayLike) -> np.ndarray:
        """Queries (q, input_dim) checked and mapped into the space the index searches (q, d)."""
        return prepare_queries(
            queries,
            dim=self.input_dim,
            distance=self.distance,
            projection=self._projection,
            label=self._label,
        )

    def search_prepared_rows(
        self, queries: np.ndarray, k: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """`search_batch_rows` of queries already prepared (`prepare_queries`, stored vectors);
        k may be max_k + 1, as for `neighbours_of_row` (an expanded id query leaving itself out)."""
        self._check_max_k(k, extra=1)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(queries) != 1:
            return self._search_batch_prepared(queries, k)
        # One query: ScaNN's single search, cheaper than the batch's thread pool.
        rows, found = self._search_prepared(queries[0], k)
        scores = np.full(
            (1, min(check_k(self.manifest.search_defaults["k"] if k is None else k), self.n)), np.nan
        )
        scores[0, : len(found)] = found
        return [rows], scores.astype(np.float32)

    def search(
        self, query: npt.ArrayLike, k: int | None = None, **overrides: int
    ) -> tuple[list[str], np.ndarray]:
        """Nearest neighbours of one query vector of shape (input_dim,).

        Args:
          k: number of neighbours (default: the build-time k), at most `max_k`; clamped to n.
          **overrides: tree-AH only: leaves_to_search, pre_reorder_num_neighbors (default:
            `knobs_at(k)`).

        Returns:
          (ids, scores): list of str and float32 array, best first.  Tree-AH can
          return fewer than k when the searched leaves hold fewer vectors.
        """
        rows, scores = self.search_rows(query, k, **overrides)
        return self.ids[rows].tolist(), scores

    def search_rows(
        self, query: npt.ArrayLike, k: int | None = None, **overrides: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search`, answering with row numbers (an integer array; row i is ids[i]) instead of ids."""
        self._check_max_k(k)
        return self._search_prepared(self.prepare_query(query), k, overrides)

    def search_batch(
        self, queries: npt.ArrayLike, k: int | None = None, **overrides: int
    ) -> tuple[list[list[str]], np.ndarray]:
        """Nearest neighbours of each row of `queries` (q, input_dim); see `search`.

        Returns:
          (ids, scores): q lists of str, and a float32 array (q, k).  When tree-AH
          finds fewer than k neighbours for a query, its id list is shorter and
          the trailing scores are NaN.
        """
        row_lists, scores = self.search_batch_rows(queries, k, **overrides)
        ids = self.ids
        return [ids[rows].tolist() for rows in row_lists], scores

    def search_batch_rows(
        self, queries: npt.ArrayLike, k: int | None = None, **overrides: int
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """`search_batch`, answering with q arrays of row numbers instead of id lists."""
        self._check_max_k(k)
        return self._search_batch_prepared(self.prepare_queries(queries), k, overrides)

    def neighbours_of_row(self, row: int, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours (rows, scores) of the indexed vector at `row` (from `stored_vectors`);
        the row itself comes first unless ties put another equal vector before it.  k may be
        max_k + 1: an id query that leaves the item out asks one more."""
        self._check_max_k(k, extra=1)
        vectors = self.stored_vectors()
        if vectors is None:
            raise ConfigError(f"{self._label} stores no vectors, so it cannot search by row")
        return self._search_prepared(np.array(vectors[row], dtype=np.float32), k)

    def probe_batch(
        self, queries: npt.ArrayLike, k: int, extra: int = 0
    ) -> tuple[list[list[str]], np.ndarray]:
        """k + extra neighbours of each query, searched with the knobs a search for k uses,
        whatever max_k says: a recall probe's answers (leave-self-out asks k + 1 and drops the
        query's own row; `pipelines.build_shards`).  See `search_batch`."""
        prepared = prepare_queries(
            queries,
            dim=self.input_dim,
            distance=self.distance,
            projection=self._projection,
            label=self._label,
        )
        row_lists, scores = self._search_batch_prepared(prepared, k + extra, self.knobs_at(k))
        return [self.ids[rows].tolist() for rows in row_lists], scores

    def _check_max_k(self, k: int | None, extra: int = 0) -> None:
        """QueryError (bad_k) when a caller asks more than max_k (+ extra) neighbours."""
        if k is not None and self.max_k is not None:
            check_k(k, self.max_k + extra, self._label)

    @property
    def _label(self) -> str:
        name = (self.manifest.embedder or {}).get("name")
        return "the index" if not isinstance(name, str) else f"the index of embedder {name!r}"

    def _search_prepared(
        self, query: np.ndarray, k: int | None = None, overrides: Mapping[str, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query already made ready by `retrieval.queries` (a ShardedIndex prepares once)."""
        if k is None and not overrides:
            k, knobs = self._default_params
        else:
            k, knobs = self._search_params(k, overrides or {})
        rows, scores = self._searcher.search(query, final_num_neighbors=k, **knobs)
        return np.asarray(rows), _clamped(np.asarray(scores, dtype=np.float32), self.distance)

    def _search_batch_prepared(
        self, queries: np.ndarray, k: int | None = None, overrides: Mapping[str, int] | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        k, knobs = self._search_params(k, overrides or {})
        if queries.shape[0] == 0:
            return [], np.empty((0, k), dtype=np.float32)
        rows, scores = self._searcher.search_batched_parallel(queries, final_num_neighbors=k, **knobs)
        scores = _clamped(np.asarray(scores, dtype=np.float32), self.distance)
        # ScaNN pads missing neighbours with row 0 and a NaN score.
        found = ~np.isnan(scores)
        return [r[f] for r, f in zip(np.asarray(rows), found)], scores

    @functools.cached_property
    def _default_params(self) -> tuple[int, dict[str, int]]:
        return self._search_params(None, {})

    def _search_params(self, k: int | None, overrides: Mapping[str, int]) -> tuple[int, dict[str, int]]:
        defaults = self.manifest.search_defaults
        k = check_k(defaults["k"] if k is None else k)
        k = min(k, self.n)
        allowed = SEARCH_KNOBS if self.method == "tree_ah" else ()
        unknown = sorted(overrides.keys() - set(allowed))
        if unknown:
            raise ConfigError(
                f"Unknown search option(s) {', '.join(unknown)} for a {self.method} index; "
                f"allowed: {', '.join(allowed) or 'none'}."
            )
        ladder_knobs = self.knobs_at(k)
        knobs = {name: overrides.get(name, ladder_knobs[name]) for name in allowed}
        for name, value in knobs.items():
            check_positive_int(value, name)
        if knobs:
            # Fewer reorder candidates than k would silently truncate the result.
            knobs["pre_reorder_num_neighbors"] = max(knobs["pre_reorder_num_neighbors"], k)
        return k, knobs

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        tables: Mapping[str, ExtraFile] | None = None,
    ) -> None:
        """Write the index directory at `path`, published by a rename only when complete
        (`retrieval.index.directory.save_index`, which says how)."""
        save_index(self, path, overwrite=overwrite, tables=tables)


def load_index(path: str | os.PathLike[str], verify: bool = True) -> Index:
    """Load an index directory written by `Index.save`.

    Args:
      verify: check every file's SHA-256 against the manifest (reads all bytes once).
        With verify=False only presence and sizes are checked, and corrupted contents
        may go unnoticed or crash ScaNN.

    Raises IndexFormatError when the directory is missing, is not an index, has an
    unreadable or unsupported manifest, or has missing, truncated or corrupted files.
    """
    path = Path(path)
    searcher, ids, manifest, projection = read_index_directory(path, verify)
    return Index(searcher, ids, manifest, directory=path, projection=projection)


def _clamped(scores: np.ndarray, distance: str) -> np.ndarray:
    """Cosine scores clipped to [-1, 1] (float32 rounding gives 1.0000001 for a vector with
    itself); NaN (no hit) stays NaN.  Other distances are returned as they are."""
    return np.clip(scores, -1.0, 1.0, out=scores) if distance == "cosine" else scores
