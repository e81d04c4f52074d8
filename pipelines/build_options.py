"""`imgindex build`'s flags (`BuildOptions`, on top of the embedding pipeline's) and their
checks, made before any work: `check` and `tuning_queries_of`.

Importing this module registers BuildOptions with Beam, whose option classes are found by
subclassing `PipelineOptions` (`pipelines.options.check_flags`).
"""

from __future__ import annotations

import argparse
import os

from pipelines.options import EmbedOptions
from pipelines.plan import DEFAULT_EMBEDDER
from retrieval import embedders, retention, storage
from retrieval.dba import MAX_DBA_N, DatabaseAugmentation
from retrieval.dba import check_distance as check_dba_distance
from retrieval.errors import ConfigError
from retrieval.exact import DISTANCES
from retrieval.index.config import DEFAULT_SERVE_MAX_K, check_serve_max_k

DEFAULT_KEEP_RUNS = 3
DEFAULT_KEEP_FAILED_HOURS = 48.0


class BuildOptions(EmbedOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--min_recall",
            type=float,
            default=0.95,
            help="refuse to publish when an index's recall@k against exact search is below this",
        )
        parser.add_argument(
            "--max_failure_rate",
            type=float,
            default=0.01,
            help="refuse to publish when more than this fraction of input records "
            "failed (read, decode or embed)",
        )
        parser.add_argument(
            "--distance",
            default="cosine",
            choices=DISTANCES,
            help="index distance (cosine needs L2-normalised embeddings, the default)",
        )
        parser.add_argument(
            "--recall_k", type=int, default=10, help="k of the recall gate and the index's default k"
        )
        parser.add_argument(
            "--serve_max_k",
            type=int,
            default=DEFAULT_SERVE_MAX_K,
            help="the most neighbours a query may ask of the index (--recall_k to 1000): its "
            "search knobs are tuned, and the recall gated, at --recall_k, 100 and this k",
        )
        parser.add_argument(
            "--pca_dim",
            type=int,
            default=0,
            help="project embeddings to this many dimensions with a PCA learned at "
            "build time (re-normalised, no whitening; cosine only); 0 = off",
        )
        parser.add_argument(
            "--dba_n",
            type=int,
            default=0,
            help="database-side augmentation: index each vector averaged with its top N "
            "neighbours (weights cosine ** --dba_alpha, itself 1; cosine and dot_product; "
            "id queries keep the original vectors); 0 = off",
        )
        parser.add_argument(
            "--dba_alpha", type=float, default=3.0, help="the exponent of DBA's weights (with --dba_n)"
        )
        parser.add_argument(
            "--index_shards",
            type=int,
            default=0,
            help="build each embedder's index as N shards, rows partitioned by a stable "
            "hash of the id, each shard built by a Beam worker (0 = one index, or as "
            "many shards as --max_shard_vectors needs)",
        )
        parser.add_argument(
            "--max_shard_vectors",
            type=int,
            default=0,
            help="memory budget: the most rows one shard (one worker's matrix) may "
            "hold; picks the number of shards when --index_shards is 0 (0 = no limit)",
        )
        parser.add_argument(
            "--tuning_queries",
            action="append",
            default=None,
            help="held-out query vectors that measure each index's recall and tune its "
            "search knobs instead of sampled database rows (use them when queries are "
            "unlike the indexed images, e.g. past queries): [EMBEDDER=]PATH, PATH a local "
            ".npy file (q, dim) or Parquet embedding table(s) written by `imgindex embed` "
            "with the same embedder (local, or on any Beam filesystem: s3://, gs://); "
            "repeat per embedder; without EMBEDDER= it applies "
            "to the run's only embedder",
        )
        parser.add_argument(
            "--run_id",
            default=None,
            help="name of the run directory (default: UTC timestamp + random suffix)",
        )
        parser.add_argument(
            "--keep_runs",
            type=int,
            default=DEFAULT_KEEP_RUNS,
            help="after a publish, delete published runs older than the newest N (the run LATEST "
            "names and the one before it are always kept; 0 = keep every published run)",
        )
        parser.add_argument(
            "--keep_failed_hours",
            type=float,
            default=DEFAULT_KEEP_FAILED_HOURS,
            help="after a publish, delete failed, rejected and unfinished runs older than this "
            "(make it longer than the longest build: an unfinished run may still be running)",
        )


def check(opts: BuildOptions) -> None:
    """ConfigError unless the flags make a run that can be published."""
    if not opts.output:
        raise ConfigError("--output is required: the output root that holds runs/ and LATEST")
    if "://" in opts.output and not opts.output.split("://", 1)[1].strip("/"):
        raise ConfigError(f"--output {opts.output!r} names no bucket; e.g. s3://bucket/root")
    if not 0 < opts.min_recall <= 1:
        raise ConfigError(f"--min_recall must be in (0, 1], got {opts.min_recall}")
    if not 0 <= opts.max_failure_rate <= 1:
        raise ConfigError(f"--max_failure_rate must be in [0, 1], got {opts.max_failure_rate}")
    if opts.pca_dim < 0 or (opts.pca_dim and opts.distance != "cosine"):
        raise ConfigError(
            f"--pca_dim {opts.pca_dim}: must be >= 0, and a projection (re-normalised) "
            "needs --distance cosine"
        )
    if opts.index_shards < 0 or opts.max_shard_vectors < 0:
        raise ConfigError(
            f"--index_shards ({opts.index_shards}) and --max_shard_vectors "
            f"({opts.max_shard_vectors}) must be >= 0 (0 = automatic / no limit)"
        )
    if opts.pca_dim and (opts.index_shards > 1 or opts.max_shard_vectors):
        raise ConfigError(
            "--pca_dim cannot be combined with a sharded build (--index_shards > 1 or "
            "--max_shard_vectors) yet: the projection is learned on one machine's matrix"
        )
    dba_of(opts)
    if opts.recall_k < 1:
        raise ConfigError(f"--recall_k must be >= 1, got {opts.recall_k}")
    check_serve_max_k(opts.recall_k, opts.serve_max_k, ("--recall_k", "--serve_max_k"))
    if opts.run_id is not None and (not opts.run_id or "/" in opts.run_id or opts.run_id.startswith(".")):
        raise ConfigError(f"--run_id {opts.run_id!r} must be a plain directory name")
    retention.check_retention(opts.keep_runs, opts.keep_failed_hours)
    tuning_queries_of(opts)


def dba_of(opts: BuildOptions) -> DatabaseAugmentation | None:
    """--dba_n and --dba_alpha as the DBA every index of the run is built with, or None."""
    if opts.dba_n == 0:
        return None
    if opts.dba_n < 0:
        raise ConfigError(f"--dba_n must be from 0 (off) to {MAX_DBA_N}, got {opts.dba_n}")
    dba = DatabaseAugmentation(opts.dba_n, opts.dba_alpha)
    check_dba_distance(opts.distance)
    if opts.index_shards > 1 or opts.max_shard_vectors:
        raise ConfigError(
            "--dba_n cannot be combined with a sharded build (--index_shards > 1 or "
            "--max_shard_vectors) yet: a row's neighbours are in every shard, and a worker "
            "holds one shard"
        )
    return dba


def tuning_queries_of(opts: BuildOptions) -> dict[str, str]:
    """--tuning_queries as {embedder name: path}, checked against the run's embedders."""
    if not opts.tuning_queries:
        return {}
    names = [embedders.parse_embedder_arg(e).name for e in (opts.embedder or [DEFAULT_EMBEDDER])]
    out = {}
    for value in opts.tuning_queries:
        name, sep, path = value.partition("=")
        if not sep:
            if len(names) != 1:
                raise ConfigError(
                    f"--tuning_queries {value!r}: the run has embedders {names}; "
                    "say which one with EMBEDDER=PATH"
                )
            name, path = names[0], value
        if name not in names:
            raise ConfigError(
                f"--tuning_queries {value!r}: unknown embedder {name!r}; the run's embedders are {names}"
            )
        if name in out:
            raise ConfigError(f"--tuning_queries given twice for embedder {name!r}")
        if storage.is_remote(path):
            if not storage.exists_any(path):
                raise ConfigError(
                    f"--tuning_queries {value!r}: {path!r} is neither an object nor a prefix with "
                    "objects (a .npy file or Parquet embedding tables)"
                )
        elif not os.path.exists(path):
            raise ConfigError(
                f"--tuning_queries {value!r}: {path!r} is not an existing local file or "
                "directory (a .npy file or Parquet embedding tables)"
            )
        out[name] = path
    return out
