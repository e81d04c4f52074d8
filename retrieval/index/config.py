"""How an index is built: `IndexConfig`, its defaults (`choose_config`) and their checks.

The constants below are contracts of the build: the brute-force threshold, the training
sample sizes, the untuned search defaults and the tuning cost model.  BENCHMARKS.md holds
the measurements behind them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from retrieval.errors import ConfigError
from retrieval.exact import check_distance
from retrieval.queries import MAX_K

METHODS = ("brute_force", "tree_ah")
SEARCH_KNOBS = ("leaves_to_search", "pre_reorder_num_neighbors")

# Below this many stored numbers (n * d) the index is exact brute force: a query then reads
# all n * d floats, which is fast enough at this size, needs no training and is exact.
BRUTE_FORCE_MAX_ELEMENTS = 1_000_000
# Partitioner and AH codebooks are trained on a sample of TRAINING_POINTS_PER_LEAF points
# per leaf, at least MIN_TRAINING_SAMPLE and at most MAX_TRAINING_SAMPLE (never more than
# n): a sample trains much faster than all rows at the same recall-vs-QPS curve, while a
# smaller AH sample loses QPS at high recall.  k-means time and ScaNN's training copies
# grow with the sample.
TRAINING_POINTS_PER_LEAF = 100
MIN_TRAINING_SAMPLE = 50_000
MAX_TRAINING_SAMPLE = 250_000
# Keep at least this many training points per leaf (ScaNN's min_partition_size
# default), otherwise k-means leaves become tiny and noisy.
MIN_TRAINING_POINTS_PER_LEAF = 50
# From this many rows on, the default k-means initialisation is random instead of k-means++.
# ScaNN's k-means++ seeding runs single-threaded over the whole training sample once per
# leaf, a large share of a large build.  Random initialisation is not reproducible run to
# run (ScaNN seeds it itself: the same rows give different partitioners), which matters
# less for a large nightly index than the time; below this size k-means++ is cheap and
# builds stay reproducible.
RANDOM_INIT_MIN_ROWS = 500_000
# Untuned search defaults: fraction of leaves searched and reorder depth per neighbour.
DEFAULT_LEAVES_FRACTION = 0.05
DEFAULT_REORDER_PER_NEIGHBOUR = 10
# Anisotropic (score-aware) quantization threshold ScaNN recommends for
# unit-norm dot-product search; it does not apply to squared_l2.
AVQ_THRESHOLD = 0.2
# Tuning cost model: one exact float re-score of a reorder candidate costs about as
# much as asymmetric-hashing this many points (AH scores a point with 16-entry lookup
# tables, reordering reads and scores a float row).
REORDER_COST_IN_POINTS = 30
# Reorder depths tried while tuning, as multiples of k.
REORDER_MULTIPLES = (2, 5, 10, 20, 50, 100)
# Tuning accepts a candidate when its recall on the tuning queries, less this many standard
# errors, reaches the target, so that the other half of the queries -- which measures the
# recorded recall that `imgindex build` gates on -- also reaches it (~98% of the time under
# a normal approximation: the two halves' difference has sqrt(2) standard errors).  Without
# a margin, builds recorded recalls on both sides of the target.
TUNING_MARGIN_SE = 3.0
MAX_RECALL_QUERIES = 1000
TRAINING_SEED = 0
# The largest k an index serves unless told otherwise (--serve_max_k): the page sizes users ask
# for (10 to 100), while k=1000 would tune and measure with 10x deeper reorders at every build.
DEFAULT_SERVE_MAX_K = 100
# The k between recall_k and serve_max_k that the build also tunes and measures at.
LADDER_MIDDLE_K = 100

# cosine is served as dot product over L2-normalised vectors.
SCANN_DISTANCE = {
    "cosine": "dot_product",
    "dot_product": "dot_product",
    "squared_l2": "squared_l2",
}


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
      trains faster on large n.  `choose_config` picks False from RANDOM_INIT_MIN_ROWS
      rows on; pass True to keep large builds reproducible.
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


def choose_config(n: int, d: int, distance: str, *, k: int = 10, **overrides: Any) -> IndexConfig:
    """Default IndexConfig for n vectors of dimension d, with optional field overrides.

    n * d < BRUTE_FORCE_MAX_ELEMENTS gives brute force; otherwise tree-AH with
    num_leaves ~ sqrt(n), training_sample_size = TRAINING_POINTS_PER_LEAF per leaf (within
    MIN_TRAINING_SAMPLE..MAX_TRAINING_SAMPLE, at most n) and tuning on.  Overriding
    leaves_to_search or pre_reorder_num_neighbors fixes them (tuning off) unless tune=True
    is also given.
    """
    check_distance(distance)
    check_positive_int(k, "k")
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
    validate_config(config, n, d, k)
    return config


def _default_tree_config(n: int, distance: str, k: int) -> IndexConfig:
    num_leaves = max(1, min(round(math.sqrt(n)), min(n, MAX_TRAINING_SAMPLE) // MIN_TRAINING_POINTS_PER_LEAF))
    sample = min(n, MAX_TRAINING_SAMPLE, max(MIN_TRAINING_SAMPLE, TRAINING_POINTS_PER_LEAF * num_leaves))
    return IndexConfig(
        method="tree_ah",
        num_leaves=num_leaves,
        training_sample_size=sample,
        leaves_to_search=max(1, math.ceil(num_leaves * DEFAULT_LEAVES_FRACTION)),
        pre_reorder_num_neighbors=min(n, DEFAULT_REORDER_PER_NEIGHBOUR * k),
        anisotropic_quantization_threshold=(
            AVQ_THRESHOLD if SCANN_DISTANCE[distance] == "dot_product" else None
        ),
        deterministic_training=n < RANDOM_INIT_MIN_ROWS,
        tune=True,
    )


def validate_config(config: object, n: int, d: int, k: int) -> None:
    """Raise ConfigError unless `config` is an IndexConfig usable for n vectors of dimension d
    searched for k neighbours."""
    if not isinstance(config, IndexConfig):
        raise ConfigError(f"config must be an IndexConfig (see choose_config), got {type(config).__name__}.")
    if config.method not in METHODS:
        raise ConfigError(f"Unknown method {config.method!r}; allowed: {', '.join(METHODS)}.")
    if config.method == "brute_force":
        return
    check_positive_int(config.num_leaves, "num_leaves", upper=n, upper_name="n")
    check_positive_int(config.training_sample_size, "training_sample_size", upper=n, upper_name="n")
    assert config.training_sample_size is not None and config.num_leaves is not None  # checked above
    if config.training_sample_size < config.num_leaves:
        raise ConfigError(
            f"training_sample_size ({config.training_sample_size}) must be >= num_leaves "
            f"({config.num_leaves})."
        )
    check_positive_int(
        config.leaves_to_search,
        "leaves_to_search",
        upper=config.num_leaves,
        upper_name="num_leaves",
    )
    check_positive_int(config.pre_reorder_num_neighbors, "pre_reorder_num_neighbors", upper=n, upper_name="n")
    assert config.pre_reorder_num_neighbors is not None  # checked above
    if config.pre_reorder_num_neighbors < min(k, n):
        raise ConfigError(
            f"pre_reorder_num_neighbors ({config.pre_reorder_num_neighbors}) must be >= k ({k}), "
            "or searches return fewer than k neighbours."
        )
    check_positive_int(config.dims_per_block, "dims_per_block", upper=d, upper_name="d")
    threshold = config.anisotropic_quantization_threshold
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(
            f"anisotropic_quantization_threshold must be a positive number or None, got {threshold}."
        )


def k_ladder(k: int, serve_max_k: int) -> tuple[int, ...]:
    """The k values an index is tuned and measured at, ascending: k (the recall cut-off and
    default k), LADDER_MIDDLE_K and serve_max_k, those from k to serve_max_k.  A query for k is
    searched with the knobs of the smallest ladder value >= k (`retrieval.index.store`)."""
    check_serve_max_k(k, serve_max_k)
    return tuple(sorted(value for value in {k, LADDER_MIDDLE_K, serve_max_k} if k <= value <= serve_max_k))


def check_serve_max_k(k: int, serve_max_k: object, flags: tuple[str, str] = ("k", "serve_max_k")) -> None:
    """ConfigError unless k <= serve_max_k <= MAX_K (named as `flags` say, e.g. the build's
    ("--recall_k", "--serve_max_k"))."""
    k_name, name = flags
    if k > MAX_K:
        raise ConfigError(f"{k_name} {k} is above {MAX_K}, the most neighbours a query may ask")
    if isinstance(serve_max_k, bool) or not isinstance(serve_max_k, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer from {k_name} ({k}) to {MAX_K}, got {serve_max_k!r}")
    if not k <= serve_max_k <= MAX_K:
        raise ConfigError(
            f"{name} {serve_max_k} is outside {k}..{MAX_K}: an index serves k from 1 to {name}, "
            f"which must be at least {k_name} ({k}) and at most {MAX_K} (the most a query may ask); "
            f"set {name} within {k}..{MAX_K}" + (f" or lower {k_name}" if serve_max_k < k else "")
        )


def check_positive_int(
    value: object, name: str, upper: int | None = None, upper_name: str | None = None
) -> None:
    """Raise ConfigError unless `value` is an integer >= 1 (and <= `upper`, named `upper_name`)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    if upper is not None and value > upper:
        raise ConfigError(f"{name} ({value}) must be <= {upper_name} ({upper}).")
