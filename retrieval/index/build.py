"""`build_index`: a ScaNN index over a matrix, with its recall measured against exact search.

Brute force is built in memory; tree-AH through ScaNN's on-disk assets
(`retrieval.scann_assets.build_tree_ah`).  The inputs are checked here, once, with errors
that name the offending row or id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval import dba as dba_lib
from retrieval import manifest as mf
from retrieval import scann_assets
from retrieval.errors import ConfigError
from retrieval.exact import check_distance, check_finite, normalize_rows
from retrieval.index.config import (
    DEFAULT_SERVE_MAX_K,
    MAX_RECALL_QUERIES,
    SCANN_DISTANCE,
    TRAINING_SEED,
    IndexConfig,
    check_positive_int,
    choose_config,
    k_ladder,
    validate_config,
)
from retrieval.index.recall import RecallProbe, choose_search_defaults
from retrieval.index.store import Index
from retrieval.index.training import PreviousTraining, TrainingRecord, previous_training
from retrieval.scann_import import ScannSearcher, import_scann_pybind

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)


def build_index(
    vectors: npt.ArrayLike,
    ids: Iterable[str] | pa.Array | pa.ChunkedArray,
    *,
    distance: str = "cosine",
    config: IndexConfig | None = None,
    embedder: dict[str, Any] | None = None,
    num_queries: int = MAX_RECALL_QUERIES,
    k: int = 10,
    target_recall: float = 0.95,
    seed: int = 0,
    copy: bool = True,
    work_dir: str | os.PathLike[str] | None = None,
    tuning_queries: npt.ArrayLike | None = None,
    trained_from: str | os.PathLike[str] | None = None,
    serve_max_k: int | None = None,
    dba: dba_lib.DatabaseAugmentation | None = None,
) -> Index:
    """Build a ScaNN index over `vectors` and measure its recall@k against exact search.

    Args:
      vectors: (n, d) array, or a memory map of one (`np.load(path, mmap_mode="r")`).
        tree-AH reads it in row chunks and never holds a second in-memory copy:
        ScaNN's assets are made on disk under `work_dir` (`retrieval.scann_assets`) and
        the searcher then loads them, so peak memory is what the loaded searcher holds
        (float rows, codes, ScaNN's structures), plus `vectors` itself when it is an
        in-memory array.
        Brute force (small n*d) builds in memory: about twice n*d*4 bytes.
      ids: n unique strings; ids[i] names vectors[i].
      distance: "cosine" (vectors are L2-normalised, served as dot product),
        "dot_product" or "squared_l2".
      config: an IndexConfig; default `choose_config(n, d, distance, k=k)`.
      embedder: embedder spec recorded in the manifest (opaque here).
      num_queries: database rows sampled (with `seed`) to measure recall; at most n.
      k: default number of neighbours for searches, and the recall cut-off.
      target_recall: the recall that tree-AH tuning aims for at every k of the ladder.
      serve_max_k: the largest k the index serves (k..1000; default max(k, 100)); searches
        for more are refused (QueryError, code bad_k).  The knobs are tuned and the recall
        measured at each k of the ladder k, 100, serve_max_k (`config.k_ladder`), and a
        search for k uses the knobs of the smallest ladder k >= it.
      copy: brute force only: False lets cosine normalise a float32 C-contiguous
        `vectors` in place instead of copying it (tree-AH never modifies `vectors`).
      tuning_queries: optional (q, d) held-out query vectors (e.g. embeddings of past
        queries) that measure recall and tune the search knobs instead of sampled
        database rows; all q are used and num_queries is ignored.  Use them when
        queries differ from the indexed rows: with near-duplicates in the data, a
        database row finds its copies in its own leaf and leave-self-out overstates
        the recall of outside queries (BENCHMARKS.md, scale set).
      trained_from: a previous index directory (last night's) whose tree-AH training this
        build may reuse instead of training (`retrieval.index.training`: the same distance
        and dimension, a similar row count, not too many builds since it was trained):
        today's rows are only encoded with its partitioner and codebooks, and its search
        defaults are measured instead of tuning (at each ladder k it tuned; a k it did not is
        tuned).  Ignored with an explicit `config`.  When they miss `target_recall` at any k,
        the index is built again with training and tuning.  The
        manifest's `training` says which happened and why.
      dba: database-side augmentation (`retrieval.dba`; cosine and dot_product): the index
        searches each row averaged with its top dba.n neighbours, while its stored vectors
        (id queries) stay the originals.  Recall and tuning then measure the index against
        exact search over the augmented rows: the space the index searches.  A previous
        training is reused only when it was made with the same DBA.
      work_dir: where tree-AH writes its assets (a temporary directory inside it,
        removed with the Index; default: the system's temporary directory).  On the
        same filesystem as the later `Index.save` target, saving hard-links the files
        instead of copying them.  Needs somewhat more disk than the float32 matrix
        (its rows, plus their codes).

    Recall is measured at each k of the ladder (below), on tuning_queries when given (see
    above), otherwise leave-self-out: min(num_queries, n) database rows, sampled
    with `seed`, are queried for k+1 neighbours both in the index and by exact
    search (`retrieval.exact`); each query's own row is dropped from both lists,
    which are then cut to k, and recall@k = mean |approx & exact| / k.  So every
    query is in-distribution and has a non-trivial answer.  For tree-AH with
    config.tune, candidate (leaves_to_search, pre_reorder_num_neighbors) pairs are
    tried from cheapest up, and the first reaching `target_recall` (else the best
    found) becomes the index's search knobs at that k; manifest.recall records the value
    measured with those knobs at k, the trials, the recall and knobs at every ladder k
    (`per_k`), and whether the target was reached at all of them
    (`retrieval.index.recall.RecallRecord`).  Tiny indexes measure each ladder k at most
    at n - 1 (leave-self-out) or n.

    ScaNN training is reproducible only with config.deterministic_training (the
    default below RANDOM_INIT_MIN_ROWS rows); `seed` controls which rows are used as
    recall queries.
    """
    start = time.perf_counter()
    check_distance(distance)
    check_positive_int(k, "k")
    ladder = k_ladder(k, max(k, DEFAULT_SERVE_MAX_K) if serve_max_k is None else serve_max_k)
    if not 0 < target_recall <= 1:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall}.")
    if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) or num_queries < 0:
        raise ConfigError(f"num_queries must be an integer >= 0, got {num_queries!r}.")
    arr = _as_matrix(vectors)
    n, d = arr.shape
    checked_ids = _check_ids(ids, n)
    explicit = config is not None
    config = choose_config(n, d, distance, k=k) if config is None else config
    validate_config(config, n, d, k)
    held_out = None if tuning_queries is None else prepare_tuning_queries(tuning_queries, d, distance)
    if dba is not None:
        dba_lib.check_distance(distance)
    scann_distance = SCANN_DISTANCE[distance]
    previous, note = None, None
    if trained_from is not None and config.method == "tree_ah":
        if explicit:
            note = "not reused: an explicit config was given"
        else:
            previous, note = previous_training(trained_from, distance=distance, d=d, n=n, dba=dba)
    augmented = None  # with DBA: a scratch directory holding the originals and the augmented rows
    dba_record = None
    if dba is not None:
        arr, augmented, dba_record = _augment(arr, dba, distance, work_dir, target_recall)

    def make_probe(x: np.ndarray) -> RecallProbe | None:
        # Exact neighbours for the largest ladder k; the smaller ks take their first k.
        if held_out is not None:
            return RecallProbe.held_out(x, held_out, scann_distance, ladder[-1])
        return RecallProbe.sample(x, scann_distance, ladder[-1], num_queries, seed)

    # With a previous training: try it first, and train after all if it misses the target.
    for attempt in [previous, None] if previous is not None else [None]:
        used = config if attempt is None else _warm_config(config, attempt, n, d, k)
        assets = None
        searcher: ScannSearcher
        if used.method == "brute_force":
            x = _prepare_vectors(arr, distance, copy)
            searcher = _build_brute_force(x, scann_distance, k)
            probe = make_probe(x)
        else:
            assets = scann_assets.AssetsDirectory(work_dir)
            try:
                searcher, probe = scann_assets.build_tree_ah(
                    arr,
                    assets.path,
                    config=used,
                    scann_distance=scann_distance,
                    normalize=distance == "cosine",
                    k=k,
                    seed=TRAINING_SEED,
                    make_probe=make_probe,
                    trained=None if attempt is None else (attempt.directory, attempt.scann_config),
                )
            except BaseException:
                assets.remove()
                raise
        first_guess = None if attempt is None else attempt.knobs_by_k(k)
        search_defaults, recall = choose_search_defaults(
            searcher, used, probe, ladder, target_recall, first_guess=first_guess
        )
        if attempt is None or recall.reached_target:
            break
        log.warning(
            "the training reused from %s misses recall %s: training again", trained_from, target_recall
        )
        note = f"not reused: with the training of {trained_from} the recall missed the target"
        if assets is not None:
            assets.remove()
    training = None
    if used.method == "tree_ah":
        record = (
            TrainingRecord(None, 0, n, note)
            if attempt is None
            else TrainingRecord(str(trained_from), attempt.generation, attempt.trained_n)
        )
        training = record.to_dict()
    manifest = mf.IndexManifest(
        distance=distance,
        n=n,
        d=d,
        scann_config=searcher.config(),
        index_config=dataclasses.asdict(used),
        search_defaults=search_defaults,
        recall=recall.to_dict(),
        build_seconds=round(time.perf_counter() - start, 3),
        embedder=embedder,
        training=training,
        dba=dba_record,
    )
    if augmented is None:
        return Index(searcher, checked_ids, manifest, assets=assets)
    originals = {dba_lib.ORIGINALS_FILE: augmented.path / dba_lib.ORIGINALS_FILE}
    return Index(searcher, checked_ids, manifest, assets=assets, extra_files=originals, scratch=augmented)


def _augment(
    arr: np.ndarray,
    dba: dba_lib.DatabaseAugmentation,
    distance: str,
    work_dir: str | os.PathLike[str] | None,
    target_recall: float,
) -> tuple[np.ndarray, scann_assets.AssetsDirectory, dict[str, Any]]:
    """(augmented rows as a memory map, the scratch directory holding them and the originals
    as the index will store them, the manifest's dba record)."""
    scratch = scann_assets.AssetsDirectory(work_dir)
    try:
        originals = scann_assets.write_dataset(
            arr, scratch.path / dba_lib.ORIGINALS_FILE, normalize=distance == "cosine"
        )
        augmented, record = dba_lib.augment(
            originals,
            dba,
            distance,
            scratch.path / "augmented.npy",
            work_dir=work_dir,
            target_recall=target_recall,
        )
    except BaseException:
        scratch.remove()
        raise
    return augmented, scratch, record


def _warm_config(config: IndexConfig, previous: PreviousTraining, n: int, d: int, k: int) -> IndexConfig:
    """Today's default config with the previous index's trained structure (leaves, blocks,
    quantisation), its search knobs clamped to today's n."""
    trained = previous.config
    num_leaves = trained.num_leaves or config.num_leaves
    assert num_leaves is not None
    warm = dataclasses.replace(
        config,
        num_leaves=num_leaves,
        training_sample_size=min(n, max(num_leaves, trained.training_sample_size or num_leaves)),
        dims_per_block=trained.dims_per_block,
        anisotropic_quantization_threshold=trained.anisotropic_quantization_threshold,
        leaves_to_search=min(num_leaves, config.leaves_to_search or 1),
    )
    validate_config(warm, n, d, k)
    return warm


def _as_matrix(vectors: npt.ArrayLike) -> np.ndarray:
    # A memory map stays one, so that reading it chunk by chunk can release its pages.
    arr = vectors if isinstance(vectors, np.memmap) else np.asarray(vectors)
    if arr.ndim != 2:
        raise ConfigError(f"vectors must be a 2-D array (n, d), got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(
            f"vectors is empty (shape {arr.shape}); need at least one vector of dimension >= 1."
        )
    real = np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    if arr.dtype == bool or not real:
        raise ConfigError(f"vectors must be real numbers (float32 preferred), got dtype {arr.dtype}.")
    return arr


def _check_ids(ids: Iterable[str] | pa.Array | pa.ChunkedArray, n: int) -> np.ndarray | pa.Array:
    """The ids as a numpy object array, or as one pyarrow string array when given Arrow."""
    import pyarrow as pa

    if isinstance(ids, (pa.Array, pa.ChunkedArray)):
        return _check_arrow_ids(ids, n)
    ids = list(ids)
    if len(ids) != n:
        raise ConfigError(f"Got {len(ids)} ids for {n} vectors; need exactly one id per vector.")
    not_str = next((i for i, value in enumerate(ids) if not isinstance(value, str)), None)
    if not_str is not None:
        value = ids[not_str]
        raise ConfigError(f"ids must be strings; ids[{not_str}] is {value!r} ({type(value).__name__}).")
    if len(set(ids)) != n:
        seen: set[str] = set()
        duplicate = next(value for value in ids if value in seen or seen.add(value))  # type: ignore[func-returns-value]
        raise ConfigError(f"ids must be unique; {duplicate!r} occurs more than once.")
    return np.array(ids, dtype=object)


def _check_arrow_ids(ids: pa.Array | pa.ChunkedArray, n: int) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ids) != n:
        raise ConfigError(f"Got {len(ids)} ids for {n} vectors; need exactly one id per vector.")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise ConfigError(f"ids must be strings; got an Arrow array of type {ids.type}.")
    if ids.null_count:
        first = pc.index(pc.is_null(ids), True).as_py()
        raise ConfigError(f"ids must be strings; ids[{first}] is null.")
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    distinct = pc.count_distinct(ids).as_py()
    # The hash table behind the count stays in Arrow's pool until released.
    pa.default_memory_pool().release_unused()
    if distinct != n:
        counts = pc.value_counts(ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ConfigError(f"ids must be unique; {duplicate!r} occurs more than once.")
    return ids


def prepare_tuning_queries(queries: npt.ArrayLike, d: int, distance: str) -> np.ndarray:
    """Held-out queries as float32 (q, d), checked, L2-normalised for cosine (a copy)."""
    given = np.asarray(queries)
    if given.ndim != 2 or given.shape[0] == 0 or given.shape[1] != d:
        raise ConfigError(
            f"tuning_queries must be a non-empty 2-D array (q, {d}) matching the "
            f"vectors' dimension, got shape {given.shape}."
        )
    if not (np.issubdtype(given.dtype, np.floating) or np.issubdtype(given.dtype, np.integer)):
        raise ConfigError(f"tuning_queries must be real numbers, got dtype {given.dtype}.")
    with np.errstate(over="ignore"):
        prepared = np.array(given, dtype=np.float32, order="C")
    check_finite(prepared, "tuning_queries")
    if distance == "cosine":
        prepared = normalize_rows(prepared, what="tuning_queries", in_place=True)
    return prepared


def _prepare_vectors(arr: np.ndarray, distance: str, copy: bool = True) -> np.ndarray:
    """float32 C-contiguous matrix for ScaNN, copied only when needed."""
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
        x = np.ascontiguousarray(arr, dtype=np.float32)
    check_finite(x, "vectors")
    if distance == "cosine":
        # The caller's memory is normalised only when it said copy=False; a copy made by
        # the cast above is ours anyway.
        in_place = (not copy or not np.may_share_memory(x, arr)) and x.flags.writeable
        x = normalize_rows(x, what="vectors", in_place=in_place)
    return x


def _build_brute_force(x: np.ndarray, scann_distance: str, k: int) -> ScannSearcher:
    """Brute-force ScaNN searcher.  ScaNN copies `x` into its own C++ dataset."""
    scann = import_scann_pybind()
    searcher: ScannSearcher = scann.builder(x, k, scann_distance).score_brute_force().build()
    return searcher
