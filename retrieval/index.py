"""The ScaNN vector index: build (with measured recall), search, save and load.

An index directory holds

    scann/          ScaNN searcher assets (written with relative paths)
    ids.parquet     one string column `id`; row i is the id of vector i
    manifest.json   written last; sizes and SHA-256 of every other file

Loading and searching use ScaNN's pybind API only and never import TensorFlow.

Score convention (same as ScaNN and `retrieval.exact`): for "cosine" and
"dot_product" the score is the similarity, higher is better; for "squared_l2"
it is the squared distance, lower is better.  Results are always best first.
"""

import dataclasses
import functools
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from retrieval import manifest as mf
from retrieval import scann_assets
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.exact import check_distance, check_finite, exact_search_by_chunks, normalize_rows
from retrieval.metrics import recall_per_query
from retrieval.npy_stream import release_pages
from retrieval.projection import PROJECTION_FILE
from retrieval.queries import check_k, prepare_queries, prepare_query
from retrieval.scann_import import import_scann_pybind

log = logging.getLogger(__name__)

METHODS = ("brute_force", "tree_ah")
SEARCH_KNOBS = ("leaves_to_search", "pre_reorder_num_neighbors")
SCANN_DIR = "scann"
IDS_FILE = "ids.parquet"
# Optional per-row metadata (source, sha256, size, passthrough columns), rows aligned with ids.
METADATA_FILE = "metadata.parquet"
# The float rows ScaNN reorders with: memory-mapped as the index's stored vectors.
DATASET_FILE = f"{SCANN_DIR}/{scann_assets.DATASET[1]}"

# Below this many stored numbers (n * d) the index is exact brute force.  A brute-force
# query reads all n * d floats: measured on this 2-core machine, 20k x 128 (2.6M) answers
# a single query in 0.18 ms, but 9,056 x 1280 (11.6M, real CIFAR/UKBench embeddings) in
# 1.7 ms (585 QPS), where tree-AH answers at recall@10 0.95 at ~10k QPS (benchmarks/peers.py).
# At <= 1M numbers a brute-force query takes ~0.1 ms, needs no training and is exact.
BRUTE_FORCE_MAX_ELEMENTS = 1_000_000
# Partitioner and AH codebooks are trained on a sample of TRAINING_POINTS_PER_LEAF points
# per leaf, at least MIN_TRAINING_SAMPLE and at most MAX_TRAINING_SAMPLE (never more than
# n).  Measured on 200k x 256 (benchmarks/config_variants.py on peer_data's set, 447
# leaves): a 50k sample trains in 9.8 s instead of 33 s for all 200k, at the same
# recall-vs-QPS curve (0.95: 9.8k vs 9.5k single-query QPS); a smaller AH sample (32k)
# lost QPS at recall 0.99.  k-means time and ScaNN's training copies grow with the sample.
TRAINING_POINTS_PER_LEAF = 100
MIN_TRAINING_SAMPLE = 50_000
MAX_TRAINING_SAMPLE = 250_000
# Keep at least this many training points per leaf (ScaNN's min_partition_size
# default), otherwise k-means leaves become tiny and noisy.
MIN_TRAINING_POINTS_PER_LEAF = 50
# From this many rows on, the default k-means initialisation is random instead of k-means++.
# ScaNN's k-means++ seeding runs single-threaded over the whole training sample once per
# leaf: at 1M x 256 (1,000 leaves, 100k sample) the partitioner trained in 13.4 s with it
# and 3.8 s without, a sixth of the whole build.  Random initialisation is not
# reproducible run to run (ScaNN seeds it itself; measured: different partitioners from
# the same rows), which matters less for a large nightly index than the time; below this
# size k-means++ costs a few seconds at most and builds stay reproducible.
RANDOM_INIT_MIN_ROWS = 500_000
# Untuned search defaults: fraction of leaves searched and reorder depth per neighbour.
DEFAULT_LEAVES_FRACTION = 0.05
DEFAULT_REORDER_PER_NEIGHBOUR = 10
# Anisotropic (score-aware) quantization threshold ScaNN recommends for
# unit-norm dot-product search; it does not apply to squared_l2.
AVQ_THRESHOLD = 0.2
# Tuning cost model: one exact float re-score of a reorder candidate costs about as
# much as asymmetric-hashing this many points (measured 20-40 at d=64..128: AH
# LUT16 scores ~1.5-2.5 ns/point, reordering ~30-100 ns/candidate).
REORDER_COST_IN_POINTS = 30
# Reorder depths tried while tuning, as multiples of k.
REORDER_MULTIPLES = (2, 5, 10, 20, 50, 100)
# Tuning accepts a candidate when its recall on the tuning queries, less this many standard
# errors, reaches the target, so that the other half of the queries -- which measures the
# recorded recall that `imgindex build` gates on -- also reaches it (~98% of the time under
# a normal approximation: the two halves' difference has sqrt(2) standard errors).  Measured
# at 1M x 256 before this margin: three builds recorded 0.957, 0.950 and 0.946 against a
# 0.95 target.
TUNING_MARGIN_SE = 3.0
MAX_RECALL_QUERIES = 1000
_TRAINING_SEED = 0

# cosine is served as dot product over L2-normalised vectors.
_SCANN_DISTANCE = {
    "cosine": "dot_product",
    "dot_product": "dot_product",
    "squared_l2": "squared_l2",
}
_RECALL_METHOD = (
    "leave-self-out: {q} database rows sampled with seed {seed} are queried for k+1 "
    "neighbours in the index and by exact search; each query's own row is dropped from "
    "both lists, which are truncated to k; recall@k = mean |approx & exact| / k. When "
    "search knobs are tuned, alternate sampled rows tune them and the others measure this value"
)
_HELD_OUT_METHOD = (
    "held-out: {q} query vectors given to the build (not rows of the index) are queried for "
    "k neighbours in the index and by exact search over all rows; recall@k = mean "
    "|approx & exact| / k. When search knobs are tuned, alternate queries tune them and the "
    "others measure this value"
)


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the ScaNN searcher is built; `choose_config` picks values from n, d and distance.

    method: "brute_force" (exact) or "tree_ah" (k-means tree partitioning +
      asymmetric hashing + exact reordering).  The other fields apply to tree_ah:
    num_leaves: number of k-means partitions.
    training_sample_size: vectors sampled to train the partitioner and AH codebooks.
    leaves_to_search: partitions scanned per query (search default).
    pre_reorder_num_neighbors: AH candidates re-scored exactly per query (search default).
    dims_per_block: dimensions per AH sub-space (2 with 16 centres each = 2 bits/dim).
    anisotropic_quantization_threshold: score-aware quantization for dot products;
      None disables it.
    deterministic_training: k-means++ initialisation, which makes ScaNN training
      reproducible; random initialisation (False) is not, even with fixed seeds, but
      trains faster on large n (measured 200k x 128: 10 s instead of 19 s; the
      partitioner at 1M x 256: 3.8 s instead of 13.4 s).  `choose_config` picks False
      from RANDOM_INIT_MIN_ROWS rows on; pass True to keep large builds reproducible.
    tune: after building, search for the cheapest (leaves_to_search,
      pre_reorder_num_neighbors) reaching the target recall instead of using the
      two values above (on in `choose_config`'s tree-AH defaults, off by default
      for a hand-written config).
    """

    method: str
    num_leaves: int | None = None
    training_sample_size: int | None = None
    leaves_to_search: int | None = None
    pre_reorder_num_neighbors: int | None = None
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float | None = None
    deterministic_training: bool = True
    tune: bool = False


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(IndexConfig))
_TREE_FIELDS = tuple(name for name in _CONFIG_FIELDS if name != "method")


def choose_config(n, d, distance, k=10, **overrides):
    """Default IndexConfig for n vectors of dimension d, with optional field overrides.

    n * d < BRUTE_FORCE_MAX_ELEMENTS gives brute force; otherwise tree-AH with
    num_leaves ~ sqrt(n), training_sample_size = TRAINING_POINTS_PER_LEAF per leaf (within
    MIN_TRAINING_SAMPLE..MAX_TRAINING_SAMPLE, at most n) and tuning on.  Overriding
    leaves_to_search or pre_reorder_num_neighbors fixes them (tuning off) unless tune=True
    is also given.
    """
    check_distance(distance)
    _check_positive_int(k, "k")
    unknown = sorted(overrides.keys() - set(_CONFIG_FIELDS))
    if unknown:
        raise ConfigError(
            f"Unknown IndexConfig field(s) {', '.join(unknown)}; allowed: {', '.join(_CONFIG_FIELDS)}."
        )
    method = overrides.get("method", "brute_force" if n * d < BRUTE_FORCE_MAX_ELEMENTS else "tree_ah")
    if method == "brute_force":
        tree_overrides = sorted(overrides.keys() & set(_TREE_FIELDS))
        if tree_overrides:
            reason = (
                "" if "method" in overrides else f" (chosen because n*d={n * d} < {BRUTE_FORCE_MAX_ELEMENTS})"
            )
            raise ConfigError(
                f"{', '.join(tree_overrides)} only apply to method='tree_ah', but the config "
                f"uses brute_force{reason}; pass method='tree_ah' too."
            )
        config = IndexConfig(method="brute_force")
    else:
        if "tune" not in overrides and overrides.keys() & set(SEARCH_KNOBS):
            overrides = {**overrides, "tune": False}
        config = dataclasses.replace(_default_tree_config(n, distance, k), **overrides)
    _validate_config(config, n, d, k)
    return config


def _default_tree_config(n, distance, k):
    num_leaves = max(1, min(round(math.sqrt(n)), min(n, MAX_TRAINING_SAMPLE) // MIN_TRAINING_POINTS_PER_LEAF))
    sample = min(n, MAX_TRAINING_SAMPLE, max(MIN_TRAINING_SAMPLE, TRAINING_POINTS_PER_LEAF * num_leaves))
    return IndexConfig(
        method="tree_ah",
        num_leaves=num_leaves,
        training_sample_size=sample,
        leaves_to_search=max(1, math.ceil(num_leaves * DEFAULT_LEAVES_FRACTION)),
        pre_reorder_num_neighbors=min(n, DEFAULT_REORDER_PER_NEIGHBOUR * k),
        anisotropic_quantization_threshold=(
            AVQ_THRESHOLD if _SCANN_DISTANCE[distance] == "dot_product" else None
        ),
        deterministic_training=n < RANDOM_INIT_MIN_ROWS,
        tune=True,
    )


def _validate_config(config, n, d, k):
    if not isinstance(config, IndexConfig):
        raise ConfigError(f"config must be an IndexConfig (see choose_config), got {type(config).__name__}.")
    if config.method not in METHODS:
        raise ConfigError(f"Unknown method {config.method!r}; allowed: {', '.join(METHODS)}.")
    if config.method == "brute_force":
        return
    _check_positive_int(config.num_leaves, "num_leaves", upper=n, upper_name="n")
    _check_positive_int(config.training_sample_size, "training_sample_size", upper=n, upper_name="n")
    assert config.training_sample_size is not None and config.num_leaves is not None  # checked above
    if config.training_sample_size < config.num_leaves:
        raise ConfigError(
            f"training_sample_size ({config.training_sample_size}) must be >= num_leaves "
            f"({config.num_leaves})."
        )
    _check_positive_int(
        config.leaves_to_search,
        "leaves_to_search",
        upper=config.num_leaves,
        upper_name="num_leaves",
    )
    _check_positive_int(
        config.pre_reorder_num_neighbors, "pre_reorder_num_neighbors", upper=n, upper_name="n"
    )
    if config.pre_reorder_num_neighbors < min(k, n):
        raise ConfigError(
            f"pre_reorder_num_neighbors ({config.pre_reorder_num_neighbors}) must be >= k ({k}), "
            "or searches return fewer than k neighbours."
        )
    _check_positive_int(config.dims_per_block, "dims_per_block", upper=d, upper_name="d")
    threshold = config.anisotropic_quantization_threshold
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(
            f"anisotropic_quantization_threshold must be a positive number or None, got {threshold}."
        )


def _check_positive_int(value, name, upper=None, upper_name=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    if upper is not None and value > upper:
        raise ConfigError(f"{name} ({value}) must be <= {upper_name} ({upper}).")


class Index:
    """A searchable ScaNN index with string ids; made by `build_index` or `load_index`.

    Implements `retrieval.searchable.SearchableIndex`.  Queries are in the embedder's space:
    an index saved with a build-time projection (`projection.npy`) projects them itself.
    """

    def __init__(self, searcher, ids, manifest, assets=None, directory=None, projection=None):
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
        self._stored_vectors = None

    n = property(lambda self: self.manifest.n)

    @property
    def ids(self):
        """row i -> id of vector i (numpy object array)."""
        if not isinstance(self._ids, np.ndarray):
            self._ids = self._ids.to_numpy(zero_copy_only=False).astype(object, copy=False)
        return self._ids

    d = property(lambda self: self.manifest.d)
    distance = property(lambda self: self.manifest.distance)
    method = property(lambda self: self.manifest.index_config["method"])
    recall = property(lambda self: self.manifest.recall, doc="recall record measured at build time")
    embedder = property(lambda self: self.manifest.embedder, doc="the embedder spec (dict) or None")
    directory = property(lambda self: self._directory, doc="the index directory (None until saved)")

    @property
    def projection(self):
        """The build-time PCA (float32 (index d + 1, input_dim), `retrieval.projection`), or None."""
        return self._projection

    @property
    def input_dim(self):
        """Dimension of query vectors: the embedder's, before any build-time projection."""
        return self.d if self._projection is None else self._projection.shape[1]

    @property
    def search_defaults(self):
        return dict(self.manifest.search_defaults)

    def __repr__(self):
        return f"Index(n={self.n}, d={self.d}, distance={self.distance!r}, method={self.method!r})"

    def metadata(self):
        """metadata.parquet (without `id`; rows aligned with the ids) as a pyarrow Table, or None."""
        if self._directory is None:
            return None
        return read_metadata(self._directory, self.manifest, self.n)

    def stored_vectors(self):
        """The indexed vectors (float32 (n, d), normalised for cosine) memory-mapped, or None
        when the directory does not hold them in that form.  Mapped once, on first use."""
        if self._directory is None or DATASET_FILE not in self.manifest.files:
            return None
        if self._stored_vectors is None:
            self._stored_vectors = _map_vectors(self._directory / DATASET_FILE, self.n, self.d)
        return self._stored_vectors

    def search(self, query, k=None, **overrides):
        """Nearest neighbours of one query vector of shape (input_dim,).

        Args:
          k: number of neighbours (default: the build-time k); clamped to n.
          **overrides: tree-AH only: leaves_to_search, pre_reorder_num_neighbors.

        Returns:
          (ids, scores): list of str and float32 array, best first.  Tree-AH can
          return fewer than k when the searched leaves hold fewer vectors.
        """
        rows, scores = self.search_rows(query, k, **overrides)
        return self.ids[rows].tolist(), scores

    def search_rows(self, query, k=None, **overrides):
        """`search`, answering with row numbers (an integer array; row i is ids[i]) instead of ids."""
        query = prepare_query(
            query, dim=self.input_dim, distance=self.distance, projection=self._projection, label=self._label
        )
        return self._search_prepared(query, k, overrides)

    def search_batch(self, queries, k=None, **overrides):
        """Nearest neighbours of each row of `queries` (q, input_dim); see `search`.

        Returns:
          (ids, scores): q lists of str, and a float32 array (q, k).  When tree-AH
          finds fewer than k neighbours for a query, its id list is shorter and
          the trailing scores are NaN.
        """
        row_lists, scores = self.search_batch_rows(queries, k, **overrides)
        ids = self.ids
        return [ids[rows].tolist() for rows in row_lists], scores

    def search_batch_rows(self, queries, k=None, **overrides):
        """`search_batch`, answering with q arrays of row numbers instead of id lists."""
        queries = prepare_queries(
            queries,
            dim=self.input_dim,
            distance=self.distance,
            projection=self._projection,
            label=self._label,
        )
        return self._search_batch_prepared(queries, k, overrides)

    def neighbours_of_row(self, row, k=None):
        """Nearest neighbours (rows, scores) of the indexed vector at `row` (from `stored_vectors`);
        the row itself comes first unless ties put another equal vector before it."""
        vectors = self.stored_vectors()
        if vectors is None:
            raise ConfigError(f"{self._label} stores no vectors, so it cannot search by row")
        return self._search_prepared(np.array(vectors[row], dtype=np.float32), k)

    @property
    def _label(self):
        name = (self.manifest.embedder or {}).get("name")
        return "the index" if not isinstance(name, str) else f"the index of embedder {name!r}"

    def _search_prepared(self, query, k=None, overrides=None):
        """One query already made ready by `retrieval.queries` (a ShardedIndex prepares once)."""
        if k is None and not overrides:
            k, knobs = self._default_params
        else:
            k, knobs = self._search_params(k, overrides or {})
        rows, scores = self._searcher.search(query, final_num_neighbors=k, **knobs)
        return np.asarray(rows), np.asarray(scores, dtype=np.float32)

    def _search_batch_prepared(self, queries, k=None, overrides=None):
        k, knobs = self._search_params(k, overrides or {})
        if queries.shape[0] == 0:
            return [], np.empty((0, k), dtype=np.float32)
        rows, scores = self._searcher.search_batched_parallel(queries, final_num_neighbors=k, **knobs)
        scores = np.asarray(scores, dtype=np.float32)
        # ScaNN pads missing neighbours with row 0 and a NaN score.
        found = ~np.isnan(scores)
        return [r[f] for r, f in zip(np.asarray(rows), found)], scores

    @functools.cached_property
    def _default_params(self):
        return self._search_params(None, {})

    def _search_params(self, k, overrides):
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
        knobs = {name: overrides.get(name, defaults[name]) for name in allowed}
        for name, value in knobs.items():
            _check_positive_int(value, name)
        if knobs:
            # Fewer reorder candidates than k would silently truncate the result.
            knobs["pre_reorder_num_neighbors"] = max(knobs["pre_reorder_num_neighbors"], k)
        return k, knobs

    def save(self, path, overwrite=False, tables=None):
        """Write the index directory at `path`, published by a rename only when complete.

        Everything is written into a temporary sibling directory, manifest.json last,
        then renamed to `path`.  `tables` ({file name: pyarrow.Table, numpy array, or the
        pathlib.Path of a Parquet file, hard-linked or copied}) are
        written beside ids.parquet (Parquet, rows aligned with the ids; or .npy) and covered
        by the manifest's checksums (e.g. metadata.parquet, projection.npy).  An existing `path` is replaced only with
        overwrite=True and only if it is an imgindex index (or empty); the old
        directory is moved aside and restored if the final rename fails.
        """
        path = Path(path)
        _check_save_target(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            manifest = self._write_contents(staging, tables or {})
            _publish(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.manifest = manifest
        self._directory = path
        if PROJECTION_FILE in (tables or {}):
            self._projection = _check_projection(np.asarray(tables[PROJECTION_FILE]), self.d, path)

    def _write_contents(self, directory, tables):
        import pyarrow.parquet as pq

        for name, value in tables.items():
            if name in (SCANN_DIR, IDS_FILE, mf.MANIFEST_NAME) or "/" in name:
                raise ConfigError(
                    f"extra file {name!r} must be a plain file name other than the index's own files"
                )
            if isinstance(value, np.ndarray):
                np.save(directory / name, value, allow_pickle=False)
            elif isinstance(value, os.PathLike):
                rows = pq.read_metadata(value).num_rows
                if rows != self.n:
                    raise ConfigError(
                        f"extra table {name!r} ({value}) must have one row per vector "
                        f"({self.n}), got {rows} rows"
                    )
                _link_or_copy(Path(value), directory / name)
            elif value.num_rows != self.n:
                raise ConfigError(
                    f"extra table {name!r} must have one row per vector ({self.n}), got {value.num_rows} rows"
                )
            else:
                pq.write_table(value, directory / name)
        scann_dir = directory / SCANN_DIR
        scann_dir.mkdir()
        # The default (relative_path=False) records absolute asset paths in
        # scann_assets.pbtxt, which point into the staging directory and break
        # after the rename; relative paths are resolved against the scann/ dir.
        if self._assets is not None:
            self._assets.copy_to(scann_dir)
        else:
            self._searcher.serialize(str(scann_dir), relative_path=True)
        _write_ids(directory / IDS_FILE, self._ids)
        manifest = dataclasses.replace(self.manifest, files=mf.describe_files(directory))
        mf.write_manifest(directory, manifest)
        return manifest


def _check_save_target(path, overwrite):
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ConfigError(f"{path} already exists; pass overwrite=True to replace it.")
    if not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory; refusing to replace it.")
    if not (path / mf.MANIFEST_NAME).is_file() and any(path.iterdir()):
        raise ConfigError(
            f"{path} exists and is not an imgindex index (no {mf.MANIFEST_NAME}); refusing to "
            "delete it even with overwrite=True. Choose another path or remove it yourself."
        )


def _publish(staging, path):
    if not path.exists():
        os.rename(staging, path)
        return
    backup = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.rename(path, backup / "index")
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup / "index", path)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def _write_ids(path, ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
    pq.write_table(pa.table({"id": column}), path)


def _read_ids(path, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["id"]).column("id")
    except (pa.ArrowException, OSError, KeyError) as e:
        raise IndexFormatError(f"{path} is not a readable ids table ({e}). Rebuild the index.") from e
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise IndexFormatError(f"{path}: column 'id' has type {column.type}, expected string.")
    if column.null_count:
        raise IndexFormatError(f"{path}: column 'id' has {column.null_count} null value(s).")
    if len(column) != n:
        raise IndexFormatError(
            f"{path} holds {len(column)} ids but the manifest says n={n}; the index is "
            "inconsistent. Rebuild the index."
        )
    return column.to_numpy(zero_copy_only=False).astype(object, copy=False)


def load_index(path, verify=True):
    """Load an index directory written by `Index.save`.

    Args:
      verify: check every file's SHA-256 against the manifest (reads all bytes once).
        With verify=False only presence and sizes are checked, and corrupted contents
        may go unnoticed or crash ScaNN.

    Raises IndexFormatError when the directory is missing, is not an index, has an
    unreadable or unsupported manifest, or has missing, truncated or corrupted files.
    """
    path = Path(path)
    manifest = mf.read_manifest(path)
    for required in (IDS_FILE, f"{SCANN_DIR}/scann_assets.pbtxt"):
        if required not in manifest.files:
            raise IndexFormatError(
                f"{path}: the manifest does not list {required}; the index is incomplete. Rebuild the index."
            )
    mf.verify_files(path, manifest, check_hashes=verify)
    # load_searcher unpickles scann_docids.pkl if present; imgindex never writes
    # one, so its presence means the directory was tampered with.
    if (path / SCANN_DIR / "scann_docids.pkl").exists():
        raise IndexFormatError(
            f"{path}/{SCANN_DIR} contains scann_docids.pkl, which imgindex never writes; "
            "refusing to load it. Rebuild the index."
        )
    ids = _read_ids(path / IDS_FILE, manifest.n)
    searcher = _load_searcher(path / SCANN_DIR)
    if searcher.size() != manifest.n:
        raise IndexFormatError(
            f"{path}: the ScaNN searcher holds {searcher.size()} vectors but the manifest says "
            f"n={manifest.n}. Rebuild the index."
        )
    projection = None
    if PROJECTION_FILE in manifest.files:  # verified with the other listed files above
        projection = _check_projection(np.load(path / PROJECTION_FILE), manifest.d, path)
    return Index(searcher, ids, manifest, directory=path, projection=projection)


def _check_projection(projection, d, directory):
    if projection.ndim != 2 or projection.shape[0] != d + 1:
        raise IndexFormatError(
            f"{directory / PROJECTION_FILE}: shape {projection.shape} does not project to the "
            f"index dimension {d}; rebuild the index"
        )
    return projection


def read_metadata(directory, manifest, n):
    """The index directory's metadata.parquet without `id` (pyarrow Table), or None when the
    index has none.  It must be listed in the manifest (so verified), have n rows and, when it
    holds an `id` column, the ids of ids.parquet in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / METADATA_FILE
    if METADATA_FILE not in manifest.files:
        if path.exists():
            raise IndexFormatError(
                f"{path} is not listed in the index manifest, so its contents are unverified; rebuild the index"
            )
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise IndexFormatError(f"{path} is not a readable Parquet table ({exc})") from exc
    if table.num_rows != n:
        raise IndexFormatError(
            f"{path} has {table.num_rows} rows but the index holds {n} vectors; rebuild the index"
        )
    if "id" in table.column_names:
        ids = pq.read_table(directory / IDS_FILE, columns=["id"]).column("id")
        meta_ids = table.column("id")
        if meta_ids.type != ids.type:
            meta_ids = meta_ids.cast(ids.type)
        if not meta_ids.equals(ids):
            raise IndexFormatError(
                f"{path}: rows are not aligned with {IDS_FILE} (the id columns differ); rebuild the index"
            )
        table = table.drop_columns(["id"])
    return table


def _map_vectors(path, n, d):
    """scann/dataset.npy memory-mapped when it is float32 (n, d), else None (with a warning)."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is not a readable .npy file ({exc})") from exc
    if vectors.dtype != np.float32 or vectors.shape != (n, d):
        log.warning(
            "%s holds %s %s, not float32 (%d, %d): the stored vectors are unavailable",
            path,
            vectors.dtype,
            vectors.shape,
            n,
            d,
        )
        return None
    return vectors


def _load_searcher(scann_dir):
    scann = import_scann_pybind()
    try:
        # Without the shim, ScaNN never writes into the index directory.
        return scann.load_searcher(str(scann_dir), assets_backcompat_shim=False)
    except (RuntimeError, ValueError) as e:
        raise IndexFormatError(f"ScaNN could not load {scann_dir}: {e}. Rebuild the index.") from e


def build_index(
    vectors,
    ids,
    distance="cosine",
    config=None,
    embedder=None,
    num_queries=MAX_RECALL_QUERIES,
    k=10,
    target_recall=0.95,
    seed=0,
    copy=True,
    work_dir=None,
    tuning_queries=None,
):
    """Build a ScaNN index over `vectors` and measure its recall@k against exact search.

    Args:
      vectors: (n, d) array, or a memory map of one (`np.load(path, mmap_mode="r")`).
        tree-AH reads it in row chunks and never holds a second in-memory copy:
        ScaNN's assets are made on disk under `work_dir` (`retrieval.scann_assets`) and
        the searcher then loads them, so peak memory is what the loaded searcher holds
        (measured 1.18 GB for a 977 MB matrix at 1M x 256: float rows, codes, ScaNN's
        structures), plus `vectors` itself when it is an in-memory array.
        Brute force (small n*d) builds in memory: about twice n*d*4 bytes.
      ids: n unique strings; ids[i] names vectors[i].
      distance: "cosine" (vectors are L2-normalised, served as dot product),
        "dot_product" or "squared_l2".
      config: an IndexConfig; default `choose_config(n, d, distance, k)`.
      embedder: embedder spec recorded in the manifest (opaque here).
      num_queries: database rows sampled (with `seed`) to measure recall; at most n.
      k: default number of neighbours for searches, and the recall cut-off.
      target_recall: recall@k that tree-AH tuning aims for.
      copy: brute force only: False lets cosine normalise a float32 C-contiguous
        `vectors` in place instead of copying it (tree-AH never modifies `vectors`).
      tuning_queries: optional (q, d) held-out query vectors (e.g. embeddings of past
        queries) that measure recall and tune the search knobs instead of sampled
        database rows; all q are used and num_queries is ignored.  Use them when
        queries differ from the indexed rows: with near-duplicates in the data, a
        database row finds its copies in its own leaf and leave-self-out overstates
        the recall of outside queries (BENCHMARKS.md, scale set: 0.968 vs 0.555).
      work_dir: where tree-AH writes its assets (a temporary directory inside it,
        removed with the Index; default: the system's temporary directory).  On the
        same filesystem as the later `Index.save` target, saving hard-links the files
        instead of copying them.  Needs ~1.13x the float32 matrix of disk (d=256).

    Recall is measured on tuning_queries when given (see above), otherwise
    leave-self-out: min(num_queries, n) database rows, sampled
    with `seed`, are queried for k+1 neighbours both in the index and by exact
    search (`retrieval.exact`); each query's own row is dropped from both lists,
    which are then cut to k, and recall@k = mean |approx & exact| / k.  So every
    query is in-distribution and has a non-trivial answer.  For tree-AH with
    config.tune, candidate (leaves_to_search, pre_reorder_num_neighbors) pairs are
    tried from cheapest up, and the first reaching `target_recall` (else the best
    found) becomes the index's search defaults; manifest.recall records the value
    measured with those defaults, the trials, and whether the target was reached.

    ScaNN training is reproducible only with config.deterministic_training (the
    default below RANDOM_INIT_MIN_ROWS rows); `seed` controls which rows are used as
    recall queries.
    """
    start = time.perf_counter()
    check_distance(distance)
    _check_positive_int(k, "k")
    if not 0 < target_recall <= 1:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall}.")
    if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) or num_queries < 0:
        raise ConfigError(f"num_queries must be an integer >= 0, got {num_queries!r}.")
    arr = _as_matrix(vectors)
    n, d = arr.shape
    ids = _check_ids(ids, n)
    config = choose_config(n, d, distance, k=k) if config is None else config
    _validate_config(config, n, d, k)
    if tuning_queries is not None:
        tuning_queries = prepare_tuning_queries(tuning_queries, d, distance)

    def make_probe(x):
        if tuning_queries is not None:
            return _RecallProbe.held_out(x, tuning_queries, _SCANN_DISTANCE[distance], k)
        return _RecallProbe.sample(x, _SCANN_DISTANCE[distance], k, num_queries, seed)

    assets = None
    if config.method == "brute_force":
        x = _prepare_vectors(arr, distance, copy)
        searcher = _build_searcher(x, config, distance, k)
        probe = make_probe(x)
    else:
        assets = _AssetsDirectory(work_dir)
        try:
            searcher, probe = _build_tree_ah(arr, config, distance, k, make_probe, assets.path)
        except BaseException:
            assets.remove()
            raise
    search_defaults, recall = _choose_search_defaults(searcher, config, probe, k, target_recall)
    if probe is not None and probe.rows is None:
        recall["method"] = _HELD_OUT_METHOD.format(q=len(probe.queries))
    elif probe is not None:
        recall["method"] = _RECALL_METHOD.format(q=len(probe.rows), seed=seed)
    manifest = mf.IndexManifest(
        distance=distance,
        n=n,
        d=d,
        scann_config=searcher.config(),
        index_config=dataclasses.asdict(config),
        search_defaults=search_defaults,
        recall=recall,
        build_seconds=round(time.perf_counter() - start, 3),
        embedder=embedder,
    )
    return Index(searcher, ids, manifest, assets=assets)


def _as_matrix(vectors):
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


def _check_ids(ids, n):
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


def _check_arrow_ids(ids, n):
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
    # The hash table behind the count stays in Arrow's pool (~100 MB at 1M ids) until released.
    pa.default_memory_pool().release_unused()
    if distinct != n:
        counts = pc.value_counts(ids)
        duplicate = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ConfigError(f"ids must be unique; {duplicate!r} occurs more than once.")
    return ids


def prepare_tuning_queries(queries, d, distance):
    """Held-out queries as float32 (q, d), checked, L2-normalised for cosine (a copy)."""
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[0] == 0 or queries.shape[1] != d:
        raise ConfigError(
            f"tuning_queries must be a non-empty 2-D array (q, {d}) matching the "
            f"vectors' dimension, got shape {queries.shape}."
        )
    if not (np.issubdtype(queries.dtype, np.floating) or np.issubdtype(queries.dtype, np.integer)):
        raise ConfigError(f"tuning_queries must be real numbers, got dtype {queries.dtype}.")
    with np.errstate(over="ignore"):
        queries = np.array(queries, dtype=np.float32, order="C")
    check_finite(queries, "tuning_queries")
    if distance == "cosine":
        queries = normalize_rows(queries, what="tuning_queries", in_place=True)
    return queries


def _prepare_vectors(arr, distance, copy=True):
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


def _build_searcher(x, config, distance, k):
    """Brute-force ScaNN searcher.  ScaNN copies `x` into its own C++ dataset."""
    scann = import_scann_pybind()
    return scann.builder(x, k, _SCANN_DISTANCE[distance]).score_brute_force().build()


def _build_tree_ah(arr, config, distance, k, make_probe, directory):
    """Tree-AH searcher made through its on-disk assets, and the recall probe.

    The probe's exact search streams over the dataset file before the searcher loads it,
    so the two never hold the matrix at the same time.
    """
    scann = import_scann_pybind()
    scann_distance = _SCANN_DISTANCE[distance]
    x = scann_assets.write_dataset(arr, directory / scann_assets.DATASET[1], normalize=distance == "cosine")
    d = x.shape[1]

    def configure(builder):
        threshold = config.anisotropic_quantization_threshold
        return builder.tree(
            num_leaves=config.num_leaves,
            num_leaves_to_search=config.leaves_to_search,
            training_sample_size=config.training_sample_size,
            random_init=not config.deterministic_training,
        ).score_ah(
            config.dims_per_block,
            anisotropic_quantization_threshold=float("nan") if threshold is None else threshold,
            training_sample_size=config.training_sample_size,
        )

    # The rows ScaNN's own builder would sample for training; seeded so builds repeat.
    rows = scann_assets.sample_indices(x.shape[0], config.training_sample_size, seed=_TRAINING_SEED)
    sample = scann_assets.sample_rows(x, rows)
    trained = scann_assets.train(sample, scann_distance, k, configure, directory)
    del sample
    scann_assets.hash_rows(trained, directory, sample=rows)
    reorder = configure(scann.builder(np.zeros((1, d), np.float32), k, scann_distance))
    reorder = reorder.reorder(config.pre_reorder_num_neighbors).create_config()
    scann_assets.finish(trained, scann_assets.reorder_stanza(reorder), directory)
    probe = make_probe(x)
    release_pages(x)
    del x
    scann_assets.trim_heap()  # measured: ~100 MB of freed training and probe buffers at 500k x 256
    return _load_searcher(directory), probe


class _AssetsDirectory:
    """A build's ScaNN assets: a temporary directory removed when its Index goes away."""

    def __init__(self, work_dir):
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(dir=work_dir, prefix=".imgindex-build-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self):
        self._finalizer()

    def copy_to(self, directory):
        """Hard-link (or, across filesystems, copy) the assets into `directory`."""
        for path in sorted(self.path.iterdir()):
            if not path.name.startswith("."):
                _link_or_copy(path, directory / path.name)


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or no hard links there
        shutil.copyfile(source, target)


@dataclasses.dataclass
class _RecallProbe:
    """Queries with their exact neighbours: sampled database rows (leave-self-out, `rows`
    names them) or held-out query vectors (`rows` is None)."""

    rows: np.ndarray | None
    queries: np.ndarray
    exact: np.ndarray
    k: int

    @classmethod
    def sample(cls, x, scann_distance, k, num_queries, seed):
        n = x.shape[0]
        k = min(k, n - 1)
        if k < 1 or num_queries < 1:
            return None
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(num_queries, n), replace=False))
        queries = np.array(x[rows])
        # x is already normalised for cosine, so dot product is the exact cosine score.
        exact, _ = exact_search_by_chunks(queries, x, k + 1, scann_distance)
        return cls(rows=rows, queries=queries, exact=_drop_self(exact, rows, k), k=k)

    @classmethod
    def held_out(cls, x, queries, scann_distance, k):
        k = min(k, x.shape[0])
        exact, _ = exact_search_by_chunks(queries, x, k, scann_distance)
        return cls(rows=None, queries=queries, exact=exact, k=k)

    def split(self):
        """Two disjoint probes (alternate queries); both halves are the whole probe when it has one."""
        if len(self.queries) < 2:
            return self, self
        return tuple(
            dataclasses.replace(
                self,
                rows=None if self.rows is None else self.rows[i::2],
                queries=self.queries[i::2],
                exact=self.exact[i::2],
            )
            for i in (0, 1)
        )

    def recall(self, searcher, **knobs):
        return float(np.mean(self.recalls(searcher, **knobs)))

    def recalls(self, searcher, **knobs):
        """Recall@k of each query."""
        # Leave-self-out needs k + 1 results before the query's own row is dropped.
        wanted = self.k if self.rows is None else self.k + 1
        if "pre_reorder_num_neighbors" in knobs:
            knobs["pre_reorder_num_neighbors"] = max(knobs["pre_reorder_num_neighbors"], wanted)
        rows, scores = searcher.search_batched_parallel(self.queries, final_num_neighbors=wanted, **knobs)
        rows = rows.astype(np.int64)
        rows[np.isnan(scores)] = -1  # ScaNN's padding for "not found"
        if self.rows is not None:
            rows = _drop_self(rows, self.rows, self.k)
        return recall_per_query(rows, self.exact, self.k)


def _drop_self(neighbours, query_rows, k):
    """Remove each query's own row from its neighbour list, then keep the first k.

    A stable argsort on "is self" moves the self entry (if any) to the end and
    keeps the others in rank order.
    """
    order = np.argsort(neighbours == query_rows[:, None], axis=1, kind="stable")
    return np.take_along_axis(neighbours, order, axis=1)[:, :k]


def _choose_search_defaults(searcher, config, probe, k, target_recall):
    """Search defaults and the recall record for a freshly built searcher."""
    recall = {
        "k": None if probe is None else probe.k,
        "value": None,
        "n_queries": 0 if probe is None else len(probe.queries),
        "target": target_recall,
    }
    if config.method == "brute_force":
        knobs = {}
        if probe is not None:
            recall["value"] = probe.recall(searcher)
    else:
        knobs = {
            "leaves_to_search": config.leaves_to_search,
            "pre_reorder_num_neighbors": config.pre_reorder_num_neighbors,
        }
        if probe is not None and config.tune:
            # Tune on one half of the queries and report on the other, so the recorded
            # recall is not flattered by having been the tuning objective.
            tune_probe, report_probe = probe.split()
            knobs, _, recall["tuning"] = _tune(searcher, config, tune_probe, k, target_recall)
            recall["value"] = report_probe.recall(searcher, **knobs)
            recall["n_queries"] = len(report_probe.queries)
            recall["n_tuning_queries"] = len(tune_probe.queries)
        elif probe is not None:
            recall["value"] = probe.recall(searcher, **knobs)
    recall["reached_target"] = recall["value"] is not None and recall["value"] >= target_recall
    return {"k": k, **knobs}, recall


def _tune(searcher, config, probe, k, target_recall):
    """The cheapest (leaves_to_search, pre_reorder_num_neighbors) reaching target_recall.

    A candidate reaches the target when its recall on the tuning queries, less
    TUNING_MARGIN_SE standard errors of that mean, is at least target_recall: the
    recorded recall comes from the other half of the queries, and a candidate that only
    just reaches the target on one half misses it on the other about half the time.
    Candidates are tried in increasing estimated cost.  One is skipped when an
    already-failed candidate searched at least as many leaves and reordered at
    least as many candidates, as recall is (close to) monotone in both knobs.
    When none reaches the target, the highest recall found wins (cheapest on ties).

    Returns (knobs, recall, trials) where trials lists every evaluated candidate.
    """
    trials: list[dict] = []
    for cost, leaves, reorder in _tuning_candidates(config, searcher.size(), k):
        if any(leaves <= t["leaves_to_search"] and reorder <= t["pre_reorder_num_neighbors"] for t in trials):
            continue
        per_query = probe.recalls(searcher, leaves_to_search=leaves, pre_reorder_num_neighbors=reorder)
        value = float(np.mean(per_query))
        error = float(np.std(per_query, ddof=1) / math.sqrt(len(per_query))) if len(per_query) > 1 else 0.0
        trials.append(
            {
                "leaves_to_search": leaves,
                "pre_reorder_num_neighbors": reorder,
                "cost": cost,
                "recall": value,
                "standard_error": error,
            }
        )
        if value - TUNING_MARGIN_SE * error >= target_recall:
            break
    best = trials[-1]
    if best["recall"] < target_recall:
        best = max(trials, key=lambda t: (t["recall"], -t["cost"]))
    knobs = {name: best[name] for name in SEARCH_KNOBS}
    return knobs, best["recall"], trials


def _tuning_candidates(config, n, k):
    """(estimated cost, leaves_to_search, pre_reorder_num_neighbors), cheapest first.

    Cost is in "AH-scored points": leaves searched times the mean leaf size, plus
    REORDER_COST_IN_POINTS per exactly re-scored candidate.  Leaves follow a
    ~sqrt(2) geometric ladder up to all leaves; reorder depths are multiples of k
    (at least k + 1, the depth recall is measured at, and at most n).
    """
    leaf_size = n / config.num_leaves
    reorders = sorted({min(n, max(k + 1, m * k)) for m in REORDER_MULTIPLES})
    return sorted(
        (round(leaves * leaf_size + REORDER_COST_IN_POINTS * reorder), leaves, reorder)
        for leaves in _geometric_ladder(config.num_leaves)
        for reorder in reorders
    )


def _geometric_ladder(upper):
    """1, 2, 3, 4, 6, 8, 11, 16, ... (ratio ~sqrt(2)), ending with `upper`."""
    values, value = [], 1
    while value < upper:
        values.append(value)
        value = max(value + 1, round(value * math.sqrt(2)))
    return values + [upper]
