"""`Searcher`: serves the published run of an output root (or one run directory).

    searcher = Searcher.open("out/")                  # follows out/LATEST
    hits = searcher.search_vector(vector, k=10)       # [SearchHit(rank=1, id=..., score=..., metadata={...}), ...]
    hits = searcher.search_image(open("q.jpg", "rb").read())
    hits = searcher.search_id("img-00042")
    searcher.refresh()                                # picks up a newly published run

What is loaded (per embedder of the run, or only the one asked for): the index the run
manifest names, through `retrieval.runs.open_index` (the run's record of the index must
match it, and every file its checksum), used only through `retrieval.searchable.
SearchableIndex`: its ids, its metadata (Arrow columns, rows aligned with the ids; see
`_Metadata`) and its stored vectors (memory-mapped; they answer id queries).

Scores follow `retrieval.index`: for "cosine" and "dot_product" indexes the score is a
similarity and hits come highest first; for "squared_l2" it is the squared distance and
hits come lowest first.  `SearchResult.higher_is_better` says which.  Ranks start at 1.

Queries are checked by the index (`retrieval.queries`): cosine queries are reduced to their
direction, so any finite, non-zero vector has one, however large or small its values.  A
refresh drops the cached image models that the new run does not use.

Threads: every query reads the current loaded state (an immutable `_RunState`) once, so a
query runs entirely against one run even when `refresh()` swaps in another meanwhile (a
single reference assignment).  The old run is freed when its last query finishes; during
a refresh both runs are in memory.

Imports: `import serving` loads NumPy and the run-manifest helpers only; ScaNN and pyarrow
are imported by `open()`, TensorFlow only by the first image query (to load the model).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import types
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from retrieval import runs
from retrieval.errors import (
    ConfigError,
    HandleError,
    ImgIndexError,
    IndexFormatError,
    QueryError,
)
from retrieval.manifest import utc_now
from retrieval.queries import check_k
from retrieval.searchable import SearchableIndex
from serving.id_lookup import IdLookup

log = logging.getLogger(__name__)

# Images above this many pixels are refused by image queries (decoding a 40 MP image
# takes ~120 MB; the pipeline's 100 MP guard is meant for batch jobs, not for many
# concurrent requests).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# A failed model load (e.g. fingerprint mismatch) is remembered this long, so a burst of
# image queries does not re-hash the model directory each time.
MODEL_FAILURE_TTL_SECONDS = 60.0
# A run that LATEST names but that failed to load (e.g. a mirror sync copied LATEST before
# the run) is retried by refresh() this long after the failure, twice as long after each
# further failure of that run, at most REFRESH_RETRY_MAX_FACTOR times as long.
DEFAULT_REFRESH_RETRY_SECONDS = 60.0
REFRESH_RETRY_MAX_FACTOR = 16
# A metadata column of several chunks is combined into one Arrow array (faster fetches)
# only below this size: string and binary arrays have 32-bit offsets (at most 2 GiB of data).
_COMBINE_MAX_BYTES = 1 << 30


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One neighbour.  rank: 1 = best.  metadata: the item's metadata row (the index's) without
    `id` (source, sha256, width, height, passthrough columns), {} when the index has none."""

    rank: int
    id: str
    score: float
    metadata: dict

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "metadata": self.metadata}


class SearchResult(list):
    """The hits of one query, best first, plus what answered it.

    embedder, run_id: the index that answered (a refresh may change them between queries).
    distance: the index's distance; higher_is_better: True for cosine / dot_product
    (scores are similarities), False for squared_l2 (scores are squared distances).
    """

    def __init__(self, hits, *, embedder: str, run_id: str, distance: str):
        super().__init__(hits)
        self.embedder, self.run_id, self.distance = embedder, run_id, distance
        self.higher_is_better = distance != "squared_l2"

    def __repr__(self) -> str:
        return (
            f"SearchResult(embedder={self.embedder!r}, run_id={self.run_id!r}, "
            f"distance={self.distance!r}, hits={list.__repr__(self)})"
        )


# --------------------------------------------------------------------------- loaded state


@dataclasses.dataclass(frozen=True)
class _EmbedderState:
    name: str
    entry: runs.EmbedderEntry  # the run manifest's record of this embedder
    spec: Mapping[str, Any] | None  # EmbedderSpec dict
    index: SearchableIndex
    index_dir: str
    row_of: IdLookup  # id -> row, for id queries
    metadata: _Metadata | None  # the index's metadata without "id", rows aligned with ids
    vectors: Any  # the index's stored vectors by row (normalised for cosine), or None

    @property
    def input_dim(self) -> int:
        """Dimension of query vectors: the embedder's, before any build-time projection."""
        return self.index.input_dim


@dataclasses.dataclass(frozen=True)
class _RunState:
    run_id: str
    run_dir: str
    created_at: str | None
    status: str
    embedders: Mapping[str, _EmbedderState]
    loaded_at: str
    load_seconds: float


def _load_run(run_dir: str, only: str | None, verify: bool, allow_unpublished: bool) -> _RunState:
    start = time.perf_counter()
    manifest = runs.read_run_manifest(run_dir)
    if manifest.status != "published" and not allow_unpublished:
        raise IndexFormatError(
            f"run {manifest.run_id} ({run_dir}) has status {manifest.status!r}, not 'published'"
            f"{': ' + manifest.error if manifest.error else ''}; serve a published run or pass "
            "allow_unpublished=True to inspect it"
        )
    if not manifest.embedders:
        raise IndexFormatError(f"run {manifest.run_id} ({run_dir}) has no embedders to serve")
    names = sorted(manifest.embedders)
    if only is not None:
        if only not in manifest.embedders:
            raise UnknownEmbedderError(
                f"run {manifest.run_id} has no embedder {only!r}; available: {', '.join(names)}"
            )
        names = [only]
    loaded = {name: _load_embedder(run_dir, name, manifest.embedders[name], verify) for name in names}
    return _RunState(
        run_id=manifest.run_id,
        run_dir=str(run_dir),
        created_at=manifest.created_at,
        status=manifest.status,
        embedders=types.MappingProxyType(loaded),
        loaded_at=utc_now(),
        load_seconds=round(time.perf_counter() - start, 3),
    )


def _load_embedder(run_dir: str, name: str, entry: runs.EmbedderEntry, verify: bool) -> _EmbedderState:
    index = runs.open_index(run_dir, name, entry, verify=verify)
    spec = entry.spec or index.embedder
    index_spec = index.embedder or {}
    if not isinstance(spec, (dict, type(None))) or not isinstance(index_spec, dict):
        raise IndexFormatError(f"embedder {name!r}: the recorded embedder spec is not an object")
    if spec and index_spec and spec.get("fingerprint") != index_spec.get("fingerprint"):
        raise IndexFormatError(
            f"index of embedder {name!r}: its manifest names embedder fingerprint "
            f"{index_spec.get('fingerprint')!r} but the run manifest says "
            f"{spec.get('fingerprint')!r}; the run is inconsistent"
        )
    table = index.metadata()
    return _EmbedderState(
        name=name,
        entry=entry,
        spec=types.MappingProxyType(dict(spec)) if spec else None,
        index=index,
        index_dir=os.path.join(run_dir, entry.index),
        row_of=IdLookup(np.asarray(index.ids, dtype=object)),
        metadata=None if table is None else _Metadata(table),
        vectors=index.stored_vectors(),
    )


class _Metadata:
    """The index's metadata columns (without id) for fetching a few rows at a time.

    Null-free integer and float columns are NumPy arrays (faster to index); the others are
    Arrow arrays, the chunks of each (one per shard or row group) combined into one when
    they hold less than _COMBINE_MAX_BYTES.  A bigger column stays chunked and a fetch
    takes from each chunk its rows: a string or binary column over 2 GiB (e.g. sha256 at
    ~33M rows) cannot be one `string` array (32-bit offsets), and ChunkedArray.take
    combines the chunks itself (pyarrow 25: "offset overflow").  Measured 100k rows,
    6 columns, 10 rows fetched: 28 us combined (70 us for Table.take(rows).to_pylist()),
    84 us from 3 chunks.
    """

    def __init__(self, table):
        import pyarrow as pa

        self.column_names = table.column_names
        # Per column: a NumPy array, or the index of its chunk layout in self._layouts and
        # its non-empty chunks.
        self._numpy: list[np.ndarray | None] = []
        self._chunks: list[list | None] = []
        self._layout_of: list[int | None] = []
        self._layouts: list[np.ndarray] = []  # first global row of each chunk
        for name in self.column_names:
            column = table.column(name)
            if (
                pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            ) and column.null_count == 0:
                # Fixed-width values: combining cannot overflow (one copy when several chunks).
                self._numpy.append(column.combine_chunks().to_numpy(zero_copy_only=True))
                self._chunks.append(None)
                self._layout_of.append(None)
                continue
            if column.num_chunks <= 1 or column.nbytes < _COMBINE_MAX_BYTES:
                chunks = [column.combine_chunks()]
            else:
                chunks = [chunk for chunk in column.chunks if len(chunk)] or [column.chunk(0)]
            starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]], dtype=np.int64)
            for at, layout in enumerate(self._layouts):  # noqa: B007 (used after the loop)
                if np.array_equal(layout, starts):
                    break
            else:
                at = len(self._layouts)
                self._layouts.append(starts)
            self._numpy.append(None)
            self._chunks.append(chunks)
            self._layout_of.append(at)

    def rows(self, rows) -> list[dict]:
        import pyarrow as pa

        positions = np.asarray(rows, dtype=np.int64)
        # Per chunk layout: [(chunk number, positions in the result, rows in the chunk)].
        groups: list[list[tuple[int, Any, Any]]] = []
        for starts in self._layouts:
            if len(starts) == 1:
                groups.append([(0, None, pa.array(positions))])
                continue
            chunk_of = np.searchsorted(starts, positions, side="right") - 1
            parts: list[tuple[int, Any, Any]] = []
            for c in np.unique(chunk_of).tolist():
                where = np.flatnonzero(chunk_of == c)
                parts.append((c, where, pa.array(positions[where] - starts[c])))
            groups.append(parts)
        values: list[list] = []
        for numpy, chunks, layout in zip(self._numpy, self._chunks, self._layout_of):
            if numpy is not None:
                values.append(numpy[positions].tolist())
                continue
            assert chunks is not None and layout is not None
            parts = groups[layout]
            if len(parts) == 1:
                values.append(chunks[parts[0][0]].take(parts[0][2]).to_pylist())
                continue
            column = [None] * len(positions)
            for c, where, local in parts:
                for at, value in zip(where.tolist(), chunks[c].take(local).to_pylist()):
                    column[at] = value
            values.append(column)
        return [dict(zip(self.column_names, row)) for row in zip(*values)]


# --------------------------------------------------------------------------- the searcher


class Searcher:
    """Thread-safe queries against a published run; see the module docstring."""

    def __init__(
        self,
        state: _RunState,
        *,
        root: str | None,
        embedder: str | None,
        verify: bool,
        allow_unpublished: bool,
        handles: Mapping[str, str] | None,
        model_cache_dir: str | None,
        max_image_pixels: int,
        refresh_retry_seconds: float = DEFAULT_REFRESH_RETRY_SECONDS,
    ):
        _check_retry_seconds(refresh_retry_seconds)
        self._state = state
        self._root = root
        self._only = embedder
        self._verify = verify
        self._allow_unpublished = allow_unpublished
        self._handles = dict(handles or {})
        self._model_cache_dir = model_cache_dir
        self._max_image_pixels = max_image_pixels
        self._refresh_lock = threading.Lock()
        self._refresh_retry_seconds = float(refresh_retry_seconds)
        # failed_run: the run LATEST names that failed to load (last_error says why);
        # retry_at: when refresh() tries it again (UTC).  Both stay until a refresh succeeds
        # or LATEST names the served run.
        self._refresh_status: dict[str, Any] = {
            "last_checked_at": None,
            "last_error": None,
            "failed_run": None,
            "retry_at": None,
        }
        self._retry_at = 0.0  # time.monotonic() of the next attempt at failed_run
        self._failed_attempts = 0  # consecutive failures of failed_run
        self._models: dict[tuple[str | None, str | None], Any] = {}
        self._model_failures: dict[tuple[str | None, str | None], tuple[float, HandleError]] = {}
        self._model_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        embedder: str | None = None,
        verify: bool = True,
        *,
        allow_unpublished: bool = False,
        handles: Mapping[str, str] | None = None,
        model_cache_dir: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        refresh_retry_seconds: float = DEFAULT_REFRESH_RETRY_SECONDS,
    ) -> Searcher:
        """Load the run at `path`: an output root (follows LATEST; `refresh()` can follow it
        later) or a run directory (fixed).

        embedder: load only this embedder's index (default: all of the run's).
        verify: check every index file's SHA-256 (reads every byte once); False checks sizes.
        allow_unpublished: also open a run whose status is "rejected" or "failed".
        handles: {embedder name: handle} to load an image embedder from elsewhere than the
          handle recorded at build time (e.g. a local copy of a SavedModel); the
          fingerprint must still match.
        model_cache_dir: cache for builtin models (default $IMGINDEX_CACHE_DIR).
        max_image_pixels: image queries above this many pixels are refused.
        refresh_retry_seconds: how long `refresh()` waits before trying again a run that
          failed to load (doubling with each further failure of it, up to 16x).

        Raises IndexFormatError (missing, unpublished, inconsistent or corrupted run, or
        LATEST naming a run that does not exist) or UnknownEmbedderError.
        """
        _check_retry_seconds(refresh_retry_seconds)
        path = os.fspath(path)
        run_dir = runs.resolve_run(path)
        _check_run_exists(path, run_dir)
        root = None if _same_dir(run_dir, path) else path
        state = _load_run(run_dir, embedder, verify, allow_unpublished)
        return cls(
            state,
            root=root,
            embedder=embedder,
            verify=verify,
            allow_unpublished=allow_unpublished,
            handles=handles,
            model_cache_dir=model_cache_dir,
            max_image_pixels=max_image_pixels,
            refresh_retry_seconds=refresh_retry_seconds,
        )

    # ------------------------------------------------------------------ description

    @property
    def run_id(self) -> str:
        return self._state.run_id

    @property
    def embedders(self) -> list[str]:
        return sorted(self._state.embedders)

    def info(self) -> dict[str, Any]:
        """What is loaded: run, embedders (n, d, distance, method, recall, fingerprint...),
        refresh status.  JSON-serialisable."""
        state = self._state
        return {
            "run_id": state.run_id,
            "run_dir": state.run_dir,
            "root": self._root,
            "status": state.status,
            "created_at": state.created_at,
            "loaded_at": state.loaded_at,
            "load_seconds": state.load_seconds,
            "embedders": {name: self._describe(emb) for name, emb in sorted(state.embedders.items())},
            "refresh": {"follows_latest": self._root is not None, **self._refresh_status},
        }

    def _describe(self, emb: _EmbedderState) -> dict[str, Any]:
        index = emb.index
        recall = {
            key: index.recall.get(key) for key in ("k", "value", "n_queries", "target", "reached_target")
        }
        spec = dict(emb.spec) if emb.spec else {}
        handle = self._handles.get(emb.name, spec.get("handle"))
        return {
            "n": emb.index.n,
            "d": emb.input_dim,
            "index_d": emb.index.d,
            "pca": index.projection is not None,
            "distance": emb.index.distance,
            "higher_is_better": emb.index.distance != "squared_l2",
            "method": emb.index.method,
            "recall": recall,
            "search_defaults": index.search_defaults,
            "fingerprint": spec.get("fingerprint"),
            "handle": handle,
            "input_size": spec.get("input_size"),
            "metadata_columns": emb.metadata.column_names if emb.metadata is not None else [],
            "id_queries": emb.vectors is not None,
            "image_queries": bool(handle and spec.get("fingerprint")),
            "model_loaded": self._model_key(emb) in self._models,
            "index_dir": emb.index_dir,
        }

    # ------------------------------------------------------------------ refresh

    def refresh(self, background: bool = False, force: bool = False):
        """Load the run LATEST names if it is not the one being served, then swap it in.

        Follows LATEST whichever way it moves (a rollback to an older run too).  Queries
        keep running on the old run until the swap, and those already running finish on
        it.  A run that failed to load is tried again once refresh_retry_seconds (see
        `open`) have passed since the failure, twice as long after each further failure,
        at once when LATEST names another run in between, or when `force` (which also
        reloads the run being served).  Until a refresh succeeds or LATEST names the
        served run, info()["refresh"] keeps the failure: last_error, failed_run and
        retry_at.  A Searcher opened on a run directory never changes (returns False).

        Returns True when a new run was swapped in, False when there was nothing to load
        (or the failed run's retry time has not come).  With background=True the work runs
        in a daemon thread and a concurrent.futures.Future of that bool is returned.
        Raises (or sets on the Future) the loading error; the old run stays served.
        """
        if background:
            future: Future = Future()

            def work():
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(self.refresh(force=force))
                except BaseException as exc:  # reported through the future
                    future.set_exception(exc)

            threading.Thread(target=work, name="imgindex-refresh", daemon=True).start()
            return future
        with self._refresh_lock:
            if self._root is None:
                return False
            status = self._refresh_status
            status["last_checked_at"] = utc_now()
            target = None
            try:
                target = runs.read_latest(self._root)
                if target is None:
                    raise IndexFormatError(
                        f"{self._root}/{runs.LATEST} has disappeared; still serving run {self._state.run_id}"
                    )
                if _same_dir(target, self._state.run_dir) and not force:
                    self._clear_failure()  # what LATEST names is served
                    return False
                failed = status["failed_run"]
                if failed is not None and target != failed:
                    self._failed_attempts = 0  # LATEST moved: try its run at once
                elif failed is not None and not force and time.monotonic() < self._retry_at:
                    return False
                _check_run_exists(self._root, target)
                state = _load_run(target, self._only, self._verify, self._allow_unpublished)
            except Exception as exc:
                status["last_error"] = f"{type(exc).__name__}: {exc}"
                if target is not None:
                    self._failed_attempts = self._failed_attempts + 1 if target == status["failed_run"] else 1
                    delay = self._refresh_retry_seconds * min(
                        2 ** (self._failed_attempts - 1), REFRESH_RETRY_MAX_FACTOR
                    )
                    self._retry_at = time.monotonic() + delay
                    status["failed_run"] = target
                    status["retry_at"] = utc_now(after_seconds=delay)
                log.error("refresh failed, still serving run %s: %s", self._state.run_id, exc)
                raise
            old = self._state
            self._state = state  # the swap: one reference assignment
            self._clear_failure()
            self._forget_unused_models()
            log.info(
                "now serving run %s (was %s), loaded in %.1f s", state.run_id, old.run_id, state.load_seconds
            )
            return True

    def _clear_failure(self) -> None:
        self._refresh_status.update(last_error=None, failed_run=None, retry_at=None)
        self._failed_attempts = 0

    # ------------------------------------------------------------------ queries

    def search_vector(self, vector, k: int = 10, embedder: str | None = None):
        """Neighbours of a vector of shape (d,) -> SearchResult; or of each row of a (q, d)
        array -> list of SearchResult.  The vector need not be normalised."""
        state = self._state
        emb = _pick(state, embedder)
        if isinstance(vector, (list, tuple)):
            try:
                vector = np.asarray(vector)  # once, e.g. a JSON list
            except (TypeError, ValueError):
                pass  # ragged: the index says what is wrong with it
        if isinstance(vector, np.ndarray) and vector.ndim == 2:
            row_lists, scores = emb.index.search_batch_rows(vector, k=k)
            return [_result(state, emb, rows, row_scores) for rows, row_scores in zip(row_lists, scores)]
        return _result(state, emb, *emb.index.search_rows(vector, k=k))

    def search_id(
        self, item_id: str, k: int = 10, embedder: str | None = None, exclude_self: bool = False
    ) -> SearchResult:
        """Neighbours of an indexed item's stored vector.  The item itself comes first
        (score 1 for cosine) unless exclude_self.  Raises UnknownIdError."""
        state = self._state
        emb = _pick(state, embedder)
        k = check_k(k)
        row = _row_of(state, emb, item_id)
        result = _result(state, emb, *emb.index.neighbours_of_row(row, k + 1 if exclude_self else k))
        if exclude_self:
            kept = [hit for hit in result if hit.id != item_id][:k]
            result = SearchResult(
                [dataclasses.replace(hit, rank=rank) for rank, hit in enumerate(kept, 1)],
                embedder=result.embedder,
                run_id=result.run_id,
                distance=result.distance,
            )
        return result

    def get_vector(self, item_id: str, embedder: str | None = None) -> np.ndarray:
        """The stored vector of an indexed item (L2-normalised for cosine indexes)."""
        state = self._state
        emb = _pick(state, embedder)
        return np.array(emb.vectors[_row_of(state, emb, item_id)], dtype=np.float32)

    def search_image(self, data: bytes, k: int = 10, embedder: str | None = None) -> SearchResult:
        """Neighbours of an encoded image (JPEG, PNG, ...), embedded like the indexed images
        (same decode, resize and normalisation) with the model the run names; the model is
        loaded on first use and cached.  Raises BadImageError, or HandleError when the model
        cannot be loaded or has other weights than the index was built with."""
        state = self._state
        emb = _pick(state, embedder)
        k = check_k(k)  # before the model runs
        from retrieval import embedders, imaging

        spec = self._image_spec(emb)
        try:
            decoded = imaging.decode(bytes(data), min_size=spec.input_size, max_pixels=self._max_image_pixels)
            pixels = imaging.resize(decoded.image, spec.input_size, spec.resize)
        except imaging.ImageDecodeError as exc:
            raise BadImageError(f"the query image cannot be used: {exc}") from exc
        model = self._model(spec)
        vector = embedders.embed_batch(model, spec, pixels[None])[0]
        if vector.shape != (emb.input_dim,):
            raise HandleError(
                f"embedder {emb.name!r} ({spec.handle}) returned a vector of shape "
                f"{vector.shape}, but the index expects dimension {emb.input_dim}"
            )
        return _result(state, emb, *emb.index.search_rows(vector, k=k))

    def _image_spec(self, emb: _EmbedderState):
        from retrieval.embedders import EmbedderSpec

        spec = dict(emb.spec or {})
        if emb.name in self._handles:
            spec["handle"] = self._handles[emb.name]
        if not spec.get("handle") or not spec.get("fingerprint"):
            raise QueryError(
                f"embedder {emb.name!r} has no recorded model (handle and "
                "fingerprint), so image queries are unavailable; query by vector",
                code="image_queries_unavailable",
            )
        return EmbedderSpec.from_dict(spec)

    def _model_key(self, emb: _EmbedderState) -> tuple[str | None, str | None]:
        """(handle, fingerprint) under which the model of `emb` is cached (as in _model);
        None for a value that is not a string (such an embedder has no usable model)."""
        spec = emb.spec or {}
        handle, fingerprint = self._handles.get(emb.name, spec.get("handle")), spec.get("fingerprint")
        return (
            handle if isinstance(handle, str) else None,
            fingerprint if isinstance(fingerprint, str) else None,
        )

    def _forget_unused_models(self) -> None:
        """Drop the cached models (and remembered failures) that no embedder of the served
        run uses, e.g. last night's model after a run built with new weights is swapped in.
        A query still running on the old run keeps its own reference to its model."""
        with self._model_lock:
            used = {self._model_key(emb) for emb in self._state.embedders.values()}
            for cache in (self._models, self._model_failures):
                for key in [key for key in cache if key not in used]:
                    del cache[key]

    def _model(self, spec):
        key = (spec.handle, spec.fingerprint)
        model = self._models.get(key)
        if model is not None:
            return model
        with self._model_lock:
            model = self._models.get(key)
            if model is not None:
                return model
            failed = self._model_failures.get(key)
            if failed and time.monotonic() - failed[0] < MODEL_FAILURE_TTL_SECONDS:
                raise failed[1]
            from retrieval import embedders

            try:
                model, resolved = embedders.load(spec.handle, cache_dir=self._model_cache_dir)
                if resolved.fingerprint != spec.fingerprint:
                    raise HandleError(
                        f"embedder {spec.name!r}: handle {spec.handle!r} resolves to weights with "
                        f"fingerprint {resolved.fingerprint}, but the index was built with other "
                        f"weights (fingerprint {spec.fingerprint}); refusing to embed queries "
                        "with a different model. Point the handle at the model the run was "
                        "built with (Searcher.open(handles={...}))"
                    )
            except HandleError as exc:
                self._model_failures[key] = (time.monotonic(), exc)
                raise
            # Cached only while the served run uses it: a query that started on a run swapped
            # out meanwhile gets its model without keeping it for the server's lifetime.
            if key in {self._model_key(emb) for emb in self._state.embedders.values()}:
                self._models[key] = model
            self._model_failures.pop(key, None)
            log.info("loaded embedder %s (%s)", spec.name, spec.handle)
            return model


def _check_retry_seconds(seconds) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        raise ConfigError(f"refresh_retry_seconds must be a number >= 0, got {seconds!r}")


def _check_run_exists(root: str, run_dir: str) -> None:
    """Refuse a run directory that LATEST names but that does not exist."""
    if not os.path.isdir(run_dir):
        raise IndexFormatError(
            f"{root}/{runs.LATEST} names run {os.path.basename(run_dir.rstrip('/'))} "
            f"({run_dir}), which does not exist: it was deleted, or is not copied yet (a sync "
            f"that copies {runs.LATEST} before the run); restore or finish copying the run "
            f"directory, or point {runs.LATEST} at an existing run (`retrieval.runs.publish`)"
        )


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _pick(state: _RunState, embedder: str | None) -> _EmbedderState:
    if embedder is None:
        if len(state.embedders) == 1:
            return next(iter(state.embedders.values()))
        raise EmbedderRequiredError(
            f"run {state.run_id} serves several embedders; name one with embedder=...: "
            f"{', '.join(sorted(state.embedders))}"
        )
    emb = state.embedders.get(embedder) if isinstance(embedder, str) else None
    if emb is None:
        raise UnknownEmbedderError(
            f"unknown embedder {embedder!r}; available: {', '.join(sorted(state.embedders))}"
        )
    return emb


def _row_of(state: _RunState, emb: _EmbedderState, item_id: object) -> int:
    """The row of an indexed id whose stored vector is available, for id queries."""
    if not isinstance(item_id, str):
        raise QueryError(f"id must be a string, got {type(item_id).__name__}", code="bad_id")
    row = emb.row_of.get(item_id)
    if row is None:
        raise UnknownIdError(item_id, emb.name, state.run_id)
    if emb.vectors is None:
        raise QueryError(
            f"the index of embedder {emb.name!r} stores no vectors, so id queries are unavailable; "
            "query by vector",
            code="id_queries_unavailable",
        )
    return row


def _result(state: _RunState, emb: _EmbedderState, rows: np.ndarray, scores) -> SearchResult:
    scores = np.asarray(scores, dtype=np.float32)[: len(rows)]
    found = ~np.isnan(scores)
    rows, scores = rows[found], scores[found].tolist()
    ids = emb.index.ids[rows].tolist()
    if emb.metadata is not None and len(rows):
        metadata = emb.metadata.rows(rows)
    else:
        metadata = [{} for _ in ids]
    hits = [
        SearchHit(rank=rank, id=item_id, score=score, metadata=md)
        for rank, (item_id, score, md) in enumerate(zip(ids, scores, metadata), 1)
    ]
    return SearchResult(hits, embedder=emb.name, run_id=state.run_id, distance=emb.index.distance)
