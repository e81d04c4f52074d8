"""`Searcher`: serves the published run of an output root (or one run directory).

    searcher = Searcher.open("out/")                  # follows out/LATEST
    hits = searcher.search_vector(vector, k=10)       # [SearchHit(rank=1, id=..., score=..., metadata={...}), ...]
    hits = searcher.search_image(open("q.jpg", "rb").read())
    hits = searcher.search_id("img-00042")
    searcher.refresh()                                # picks up a newly published run

What is loaded (per embedder of the run, or only the one asked for; `serving.run_state`): the
index the run manifest names, through `retrieval.runs.open_index` (the run's record of the
index must match it, and every file its checksum), used only through `retrieval.searchable.
SearchableIndex`: its ids, its metadata (Arrow columns, rows aligned with the ids; see
`serving.metadata`) and its stored vectors (memory-mapped; they answer id queries).

Scores follow `retrieval.index`: for "cosine" and "dot_product" indexes the score is a
similarity and hits come highest first; for "squared_l2" it is the squared distance and
hits come lowest first.  `SearchResult.higher_is_better` says which.  Ranks start at 1.

Queries are checked by the index (`retrieval.queries`): cosine queries are reduced to their
direction, so any finite, non-zero vector has one, however large or small its values.  A
refresh drops the cached image models that the new run does not use (`serving.models`).

Threads: every query reads the current loaded state (an immutable `RunState`) once, so a
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal, cast, overload

import numpy as np

from retrieval import runs
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.manifest import utc_now
from retrieval.queries import check_k
from retrieval.rerank import QueryExpansion
from serving.expansion import check_expansion, expanded_id_result, query_expansion, vector_results
from serving.models import ModelCache
from serving.queries import embed_image, pick_embedder, recall_per_k, row_of, to_result
from serving.results import SearchResult
from serving.run_source import LocalRoot, RunSource, resolve
from serving.run_state import EmbedderState, RunState, load_run, same_dir

log = logging.getLogger(__name__)

# Image queries that would decode to more pixels than this are refused before decoding.
# Decoding costs 4-5 MB a megapixel for RGB, greyscale, palette, BMP and TIFF images, 15 for
# WebP, 19 for PNG with alpha and 25 for 16-bit PNG (BENCHMARKS.md, "Image queries: memory"):
# 16 MP (a 5K screenshot fits) is at most ~400 MB per decode.  JPEGs are decoded at reduced
# scale (1/2 to 1/8, `retrieval.imaging`), so a 48 MP phone photo decodes to 0.75 MP and
# passes; their declared size is bounded by the pipeline's bomb guard (100 MP).
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
# A run that LATEST names but that failed to load (e.g. a mirror sync copied LATEST before
# the run) is retried by refresh() this long after the failure, twice as long after each
# further failure of that run, at most REFRESH_RETRY_MAX_FACTOR times as long.
DEFAULT_REFRESH_RETRY_SECONDS = 60.0
REFRESH_RETRY_MAX_FACTOR = 16


class Searcher:
    """Thread-safe queries against a published run; see the module docstring."""

    def __init__(
        self,
        state: RunState,
        *,
        root: str | None,
        embedder: str | None,
        verify: bool,
        allow_unpublished: bool,
        handles: Mapping[str, str] | None,
        model_cache_dir: str | None,
        max_image_pixels: int,
        refresh_retry_seconds: float = DEFAULT_REFRESH_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        source: RunSource | None = None,
    ):
        _check_retry_seconds(refresh_retry_seconds)
        self._state = state
        self._root = root
        self._source = source if source is not None or root is None else LocalRoot(root)
        self._only = embedder
        self._verify = verify
        self._allow_unpublished = allow_unpublished
        self._clock = clock
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
        self._retry_at = 0.0  # clock() of the next attempt at failed_run
        self._failed_attempts = 0  # consecutive failures of failed_run
        self._models = ModelCache(
            handles, model_cache_dir, served=lambda: self._state.embedders.values(), clock=clock
        )

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
        clock: Callable[[], float] = time.monotonic,
        storage_flags: Sequence[str] | None = None,
        cache_dir: str | None = None,
        store_timeout_seconds: float | None = None,
    ) -> Searcher:
        """Load the run at `path`: an output root (follows LATEST; `refresh()` can follow it
        later) or a run directory (fixed).  An output root on object storage ("s3://...",
        "gs://...") is followed the same way, each run copied to `cache_dir` and verified
        first (`serving.run_source.RemoteRoot`; storage_flags: Beam's filesystem options,
        e.g. ["--s3_endpoint_url=...", "--s3_access_key_id=..."]; store_timeout_seconds:
        how long reading its LATEST may take, default 30).

        embedder: load only this embedder's index (default: all of the run's).
        verify: check every index file's SHA-256 (reads every byte once); False checks sizes.
        allow_unpublished: also open a run whose status is "rejected" or "failed".
        handles: {embedder name: handle} to load an image embedder from elsewhere than the
          handle recorded at build time (e.g. a local copy of a SavedModel); the
          fingerprint must still match.
        model_cache_dir: cache for builtin models (default $IMGINDEX_CACHE_DIR).
        max_image_pixels: image queries that would decode to more pixels are refused
          (before decoding; JPEGs decode at reduced scale, so count their reduced size).
        refresh_retry_seconds: how long `refresh()` waits before trying again a run that
          failed to load (doubling with each further failure of it, up to 16x).
        clock: the monotonic clock (seconds) that times those retries and the model-failure
          TTL (`serving.models`); a test can pass a fake one.

        Raises IndexFormatError (missing, unpublished, inconsistent or corrupted run, or
        LATEST naming a run that does not exist), UnknownEmbedderError, or StorageError
        (an object store unreachable, refusing the credentials, or without the bucket).
        """
        _check_retry_seconds(refresh_retry_seconds)
        path = os.fspath(path)
        run_dir, source = resolve(path, cache_dir, storage_flags, allow_unpublished, store_timeout_seconds)
        state = load_run(run_dir, embedder, verify, allow_unpublished)
        if source is not None:
            source.served(run_dir, None)
        return cls(
            state,
            embedder=embedder,
            verify=verify,
            allow_unpublished=allow_unpublished,
            handles=handles,
            model_cache_dir=model_cache_dir,
            max_image_pixels=max_image_pixels,
            refresh_retry_seconds=refresh_retry_seconds,
            clock=clock,
            source=source,
            root=None if source is None else source.root,
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

    def _describe(self, emb: EmbedderState) -> dict[str, Any]:
        index = emb.index
        recall = {
            key: index.recall.get(key) for key in ("k", "value", "n_queries", "target", "reached_target")
        }
        recall["per_k"] = recall_per_k(index.recall)
        spec = dict(emb.spec) if emb.spec else {}
        handle = self._models.handle(emb)
        return {
            "n": emb.index.n,
            "d": emb.input_dim,
            "index_d": emb.index.d,
            "pca": index.projection is not None,
            "dba": index.dba,
            "query_expansion": query_expansion(index),
            "distance": emb.index.distance,
            "higher_is_better": emb.index.distance != "squared_l2",
            "method": emb.index.method,
            "recall": recall,
            "search_defaults": index.search_defaults,
            "max_k": index.max_k,
            "fingerprint": spec.get("fingerprint"),
            "handle": handle,
            "input_size": spec.get("input_size"),
            "metadata_columns": emb.metadata.column_names if emb.metadata is not None else [],
            "id_queries": emb.vectors is not None,
            "image_queries": bool(handle and spec.get("fingerprint")),
            "model_loaded": self._models.is_loaded(emb),
            "index_dir": emb.index_dir,
        }

    def first_ids(self) -> dict[str, str | None]:
        """{embedder: the id of its row 0, or None when it is empty} (for examples)."""
        return {
            name: (str(emb.index.ids[0]) if emb.index.n else None)
            for name, emb in sorted(self._state.embedders.items())
        }

    # ------------------------------------------------------------------ refresh

    @overload
    def refresh(self, background: Literal[False] = False, force: bool = False) -> bool: ...
    @overload
    def refresh(self, background: Literal[True], force: bool = False) -> Future[bool]: ...
    @overload
    def refresh(self, background: bool = False, force: bool = False) -> bool | Future[bool]: ...

    def refresh(self, background: bool = False, force: bool = False) -> bool | Future[bool]:
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
            future: Future[bool] = Future()

            def work() -> None:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(self._refresh(force))
                except BaseException as exc:  # reported through the future
                    future.set_exception(exc)

            threading.Thread(target=work, name="imgindex-refresh", daemon=True).start()
            return future
        return self._refresh(force)

    def _refresh(self, force: bool) -> bool:
        with self._refresh_lock:
            if self._source is None:
                return False
            status = self._refresh_status
            status["last_checked_at"] = utc_now()
            target = None
            try:
                target = self._source.latest()
                if target is None:
                    raise IndexFormatError(
                        f"{self._root}/{runs.LATEST} has disappeared; still serving run {self._state.run_id}"
                    )
                if same_dir(target, self._state.run_dir) and not force:
                    self._clear_failure()  # what LATEST names is served
                    return False
                failed = status["failed_run"]
                if failed is not None and target != failed:
                    self._failed_attempts = 0  # LATEST moved: try its run at once
                elif failed is not None and not force and self._clock() < self._retry_at:
                    return False
                self._source.prepare(target)
                state = load_run(target, self._only, self._verify, self._allow_unpublished)
            except Exception as exc:
                status["last_error"] = f"{type(exc).__name__}: {exc}"
                if target is not None:
                    self._failed_attempts = self._failed_attempts + 1 if target == status["failed_run"] else 1
                    delay = self._refresh_retry_seconds * min(
                        2 ** (self._failed_attempts - 1), REFRESH_RETRY_MAX_FACTOR
                    )
                    self._retry_at = self._clock() + delay
                    status["failed_run"] = target
                    status["retry_at"] = utc_now(after_seconds=delay)
                log.error(
                    "refresh failed%s, still serving run %s: %s: %s",
                    "" if target is None else f" to load {os.path.basename(target.rstrip(os.sep))}",
                    self._state.run_id,
                    type(exc).__name__,
                    exc,
                )
                raise
            old = self._state
            self._state = state  # the swap: one reference assignment
            self._clear_failure()
            self._models.forget_unused()
            self._served(state.run_dir, old.run_dir)
            log.info(
                "now serving run %s, was %s (loaded in %.1f s)", state.run_id, old.run_id, state.load_seconds
            )
            return True

    def _served(self, run_dir: str, previous: str) -> None:
        try:
            if self._source is not None:
                self._source.served(run_dir, previous)
        except Exception as exc:  # pruning a cache must not undo a swap
            log.warning("could not prune the cache of %s: %s: %s", self._root, type(exc).__name__, exc)

    def _clear_failure(self) -> None:
        self._refresh_status.update(last_error=None, failed_run=None, retry_at=None)
        self._failed_attempts = 0

    # ------------------------------------------------------------------ queries

    def search_vector(
        self, vector: Any, k: int = 10, embedder: str | None = None, expand: QueryExpansion | None = None
    ) -> SearchResult | list[SearchResult]:
        """Neighbours of a vector of shape (d,) -> SearchResult; or of each row of a (q, d)
        array -> list of SearchResult.  The vector need not be normalised.

        expand: alpha query expansion (`retrieval.rerank.QueryExpansion(n, alpha)`, cosine and
        dot_product indexes): the query's top n hits expand it, then the expanded query is
        searched for the k results.  An indexed item equal to the query is among them."""
        state = self._state
        emb = pick_embedder(state, embedder)
        return vector_results(state, emb, vector, k, expand)

    def search_id(
        self,
        item_id: str,
        k: int = 10,
        embedder: str | None = None,
        exclude_self: bool = False,
        expand: QueryExpansion | None = None,
    ) -> SearchResult:
        """Neighbours of an indexed item's stored vector (with DBA its original, not the
        augmented vector the index searches: the item then scores below 1, usually still
        first).  The item itself comes first (score 1 for cosine) unless exclude_self, which
        with `expand` (see `search_vector`) also leaves it out of the expansion.  Raises
        UnknownIdError."""
        state = self._state
        emb = pick_embedder(state, embedder)
        k = check_k(k, emb.index.max_k, f"the index of embedder {emb.name!r}")
        row = row_of(state, emb, item_id)
        if expand is not None:
            return expanded_id_result(state, emb, row, k, expand, exclude_self)
        result = to_result(state, emb, *emb.index.neighbours_of_row(row, k + 1 if exclude_self else k))
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
        emb = pick_embedder(state, embedder)
        return np.array(emb.vectors[row_of(state, emb, item_id)], dtype=np.float32)

    def search_image(
        self, data: bytes, k: int = 10, embedder: str | None = None, expand: QueryExpansion | None = None
    ) -> SearchResult:
        """Neighbours of an encoded image (JPEG, PNG, ...), embedded like the indexed images
        (same decode, resize and normalisation) with the model the run names; the model is
        loaded on first use and cached.  expand: as `search_vector`.  Raises BadImageError,
        or HandleError when the model cannot be loaded or has other weights than the index
        was built with."""
        state = self._state
        emb = pick_embedder(state, embedder)
        k = check_k(k, emb.index.max_k, f"the index of embedder {emb.name!r}")  # before the model runs
        check_expansion(emb, expand)
        vector = embed_image(self._models, emb, data, self._max_image_pixels)
        return cast(SearchResult, vector_results(state, emb, vector, k, expand))  # one vector: one result


def _check_retry_seconds(seconds: object) -> None:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
        raise ConfigError(f"refresh_retry_seconds must be a number >= 0, got {seconds!r}")
