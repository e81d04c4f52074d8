"""The sharded index build, a Beam pipeline (`imgindex build --index_shards N`).

    Partition (one element per embedding file): stream the file row group by row group and
      append each row to the partition of shard `retrieval.sharded.shard_of(id, N)`:
      <index dir>/.partitions/shard-i/part-<file number>.parquet.  Rows whose id falls in a
      stable hash sample become recall probes, unless held-out tuning queries are given:
      then those are the probes, and they also tune every shard's search knobs.
    Build (one element per shard, spread over workers by a Reshuffle): read only that
      shard's partition, build and tune its ScaNN index at every k of the ladder
      (retrieval.index.build_index), save it as <index dir>/shard-i-of-N, and answer the probe
      queries over the shard's rows exactly (for the largest ladder k) and with the index at
      each ladder k (with the knobs it uses for that k); the answers go to
      .partitions/probe-shard-i.json.
    Driver: merge the shards' probe answers into the global exact and approximate top k
      (recall of the merged search at every ladder k), write the sharded manifest last, drop
      the partitions.

No process holds more than one shard's matrix: partitioning holds one row group, a build
worker one shard.  The partitions are a file-based shuffle, so the runner's own shuffle
(in memory on the local runners) never carries vectors; they cost one extra write and
read of the tables.  The output is a local path (a shared mount for a distributed runner) or
an object store: then the partitions and probe answers are objects, and each worker builds its
shard in its own local scratch and uploads it, checked against the shard's manifest
(pipelines.remote_stage); the driver uploads the sharded manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import StandardOptions

from pipelines import remote_stage, shard_recall
from pipelines import report as report_lib
from pipelines.options import LOCAL_RUNNER
from retrieval import atomic_files, runs, sharded, storage, tables
from retrieval import index as index_lib
from retrieval import manifest as mf
from retrieval import schema as S
from retrieval.errors import ConfigError, ImgIndexError
from retrieval.exact import exact_search_by_chunks, normalize_rows

PARTITIONS = ".partitions"
_PROBE_PERSON = b"imgindex-probe"


class ShardSizeError(ImgIndexError):
    """A shard came out empty or above the memory budget."""


def _probe_key(item_id: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(item_id.encode("utf-8"), digest_size=8, person=_PROBE_PERSON).digest(), "little"
    )


def _partition_dir(index_dir: str, shard: int) -> str:
    return os.path.join(index_dir, PARTITIONS, f"shard-{shard:05d}")


class PartitionFile(beam.DoFn):
    """(file number, path) -> partition files per shard; yields (shard, rows) counts and
    probe candidates (tagged "probe") as (hash key, id, vector)."""

    def __init__(self, index_dir: str, num_shards: int, probe_threshold: int):
        self.index_dir, self.num_shards, self.probe_threshold = index_dir, num_shards, probe_threshold

    def process(self, element):
        number, path = element
        remote = storage.is_remote(self.index_dir)
        # On an object store the partitions are written to local scratch, then uploaded.
        scratch = storage.scratch_dir("imgindex-partition-") if remote else None
        with contextlib.ExitStack() as stack:
            if scratch is not None:
                stack.callback(storage.remove_scratch, scratch)
            source = stack.enter_context(FileSystems.open(path)) if storage.is_remote(path) else path
            yield from self._partition(number, source, scratch)

    def _partition(self, number, source, scratch):
        parquet = pq.ParquetFile(source)
        writers, tmp_paths, counts = {}, {}, np.zeros(self.num_shards, np.int64)
        try:
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                ids = table.column(S.ID).to_pylist()
                shards = sharded.shard_of(ids, self.num_shards)
                for shard in np.unique(shards):
                    if shard not in writers:
                        directory = _partition_dir(scratch or self.index_dir, int(shard))
                        os.makedirs(directory, exist_ok=True)
                        tmp_paths[shard] = os.path.join(
                            directory, f".part-{number:05d}.parquet.tmp-{os.getpid()}"
                        )
                        writers[shard] = pq.ParquetWriter(tmp_paths[shard], parquet.schema_arrow)
                    writers[shard].write_table(table.take(np.flatnonzero(shards == shard)))
                counts += np.bincount(shards, minlength=self.num_shards)
                for row, item_id in enumerate(ids):
                    key = _probe_key(item_id)
                    if key < self.probe_threshold:
                        vector = np.asarray(table.column(S.EMBEDDING)[row].values.to_numpy(), np.float32)
                        yield beam.pvalue.TaggedOutput("probe", (key, item_id, vector))
            for shard, writer in writers.items():
                writer.close()
                name = f"part-{number:05d}.parquet"
                if scratch is not None:  # one object per file: a retry replaces it whole
                    storage.upload(
                        tmp_paths[shard], storage.join(_partition_dir(self.index_dir, shard), name)
                    )
                    continue
                os.replace(tmp_paths[shard], os.path.join(os.path.dirname(tmp_paths[shard]), name))
        except BaseException:
            for shard, writer in writers.items():
                writer.close()
                Path(tmp_paths[shard]).unlink(missing_ok=True)
            raise
        for shard, count in enumerate(counts):
            if count:
                yield shard, int(count)


class BuildShard(beam.DoFn):
    """shard number -> that shard's saved index; writes its probe answers beside the partitions."""

    def __init__(
        self,
        index_dir: str,
        num_shards: int,
        distance: str,
        k: int,
        target_recall: float,
        max_shard_vectors: int | None,
        held_out: bool = False,
        serve_max_k: int | None = None,
    ):
        self.index_dir, self.num_shards, self.distance = index_dir, num_shards, distance
        self.k, self.target_recall, self.max_shard_vectors = k, target_recall, max_shard_vectors
        self.serve_max_k = max(k, index_lib.DEFAULT_SERVE_MAX_K) if serve_max_k is None else serve_max_k
        self.ladder = index_lib.k_ladder(k, self.serve_max_k)
        # The probes are held-out query vectors (id None) that also tune each shard's knobs.
        self.held_out = held_out

    def process(self, shard, probes, counts):
        rows = dict(counts).get(shard, 0)
        if rows == 0:
            raise ShardSizeError(f"shard {shard} of {self.num_shards} got no rows; use fewer --index_shards")
        if self.max_shard_vectors and rows > self.max_shard_vectors:
            raise ShardSizeError(
                f"shard {shard} has {rows} rows, above --max_shard_vectors "
                f"{self.max_shard_vectors}; use more --index_shards"
            )
        remote = storage.is_remote(self.index_dir)
        # On an object store: the shard is built in this worker's local scratch, then uploaded.
        local_dir = storage.scratch_dir("imgindex-shard-") if remote else self.index_dir
        try:
            yield from self._build(shard, probes, local_dir)
        finally:
            if remote:
                storage.remove_scratch(local_dir)

    def _build(self, shard, probes, local_dir):
        remote = local_dir != self.index_dir
        name = sharded.shard_name(shard, self.num_shards)
        directory = os.path.join(local_dir, name)
        work_dir = os.path.join(local_dir, PARTITIONS)
        partition = _partition_dir(self.index_dir, shard)
        if remote:
            partition = os.path.dirname(
                remote_stage.download_table(partition, _partition_dir(local_dir, shard))[0]
            )
        os.makedirs(work_dir, exist_ok=True)
        # The shard's matrix goes to a local file that the build streams (retrieval.scann_assets).
        vectors_path = os.path.join(work_dir, f"vectors-shard-{shard:05d}-{uuid.uuid4().hex}.npy")
        try:
            data = tables.read_embeddings(partition, with_columns=True, vectors_path=vectors_path)
            tuning = np.stack([vector for _, _, vector in probes]) if self.held_out and probes else None
            built = index_lib.build_index(
                data.vectors,
                data.ids,
                distance=self.distance,
                embedder=data.spec.to_dict(),
                k=self.k,
                serve_max_k=self.serve_max_k,
                target_recall=self.target_recall,
                work_dir=work_dir,
                tuning_queries=tuning,
            )
            answers = self._answer(probes, built, data)
            del data.vectors
            # A retried bundle replaces its own earlier, unpublished attempt.
            built.save(directory, overwrite=True, tables={index_lib.METADATA_FILE: data.columns})
        finally:
            Path(vectors_path).unlink(missing_ok=True)
        answers["manifest_sha256"] = atomic_files.sha256_file(os.path.join(directory, "manifest.json"))
        if remote:  # file by file, checked against the shard's manifest, manifest.json last
            remote_stage.upload_index(directory, storage.join(self.index_dir, name))
        answers.update(
            shard=shard,
            n=built.n,
            d=built.d,
            embedder=built.manifest.embedder,
            method=built.method,
            recall=built.manifest.recall,
            search_defaults=built.search_defaults,
            build_seconds=built.manifest.build_seconds,
        )
        probe_file = f"probe-shard-{shard:05d}.json"
        if remote:
            storage.put_bytes(
                storage.join(self.index_dir, PARTITIONS, probe_file), json.dumps(answers).encode()
            )
        else:
            atomic_files.write_json_atomic(os.path.join(self.index_dir, PARTITIONS, probe_file), answers)
        yield shard

    def _answer(self, probes, built, data):
        """Each probe's top k+1 among this shard's rows: exactly for the largest ladder k, and
        with the built index at every ladder k ({str(k): answers}), searched as a query for k."""
        if not probes:
            return {"probe_ids": [], "exact": [], "approx": {str(k): [] for k in self.ladder}}
        queries = np.stack([vector for _, _, vector in probes]).astype(np.float32)
        scann_distance = "dot_product" if self.distance == "cosine" else self.distance
        cosine = self.distance == "cosine"
        if cosine:
            queries = normalize_rows(queries, what="probe")
        rows, scores = exact_search_by_chunks(
            queries, data.vectors, self.ladder[-1] + 1, scann_distance, normalize_database=cosine
        )
        ids = built.ids  # row -> id, the array the index's own searches use
        approx = {}
        for k in self.ladder:
            found, found_scores = built.probe_batch(queries, k, extra=1)
            approx[str(k)] = [[a, [float(x) for x in s[: len(a)]]] for a, s in zip(found, found_scores)]
        return {
            "probe_ids": [item_id for _, item_id, _ in probes],
            "exact": [[ids[r].tolist(), s.tolist()] for r, s in zip(rows, scores)],
            "approx": approx,
        }


def build_sharded(
    options,
    run_directory: str,
    embedder: str,
    *,
    num_shards: int | None,
    max_shard_vectors: int | None,
    distance: str,
    k: int,
    target_recall: float,
    num_queries: int = index_lib.MAX_RECALL_QUERIES,
    tuning_queries: np.ndarray | None = None,
    serve_max_k: int | None = None,
) -> ShardedBuild:
    """Builds <run>/index/<embedder>/ as a sharded index on the runner `options` name.

    Returns its manifest and directory, not the loaded index: the launching process never
    holds the shards (`ShardedBuild.open()` loads them).

    tuning_queries: held-out query vectors that tune every shard and measure the merged
    recall instead of database rows sampled by id (see retrieval.index.build_index).
    serve_max_k: the most neighbours a search may ask (default max(k, 100)); every shard is
    tuned, and the merged recall measured, at each k of `retrieval.index.k_ladder`.
    """
    start = time.perf_counter()
    source = f"{run_directory}/{runs.EMBEDDINGS_DIR}/{embedder}"
    remote = storage.is_remote(run_directory)
    files = (
        remote_stage.parquet_files(source) if remote else sorted(ds.dataset(source, format="parquet").files)
    )
    if not files:
        raise ConfigError(f"no embedding tables under {source}")
    n = report_lib.count_rows(source) if remote else tables.count_rows(files)  # from the footers
    held_out = tuning_queries is not None
    if held_out:  # checked before any work: dimension, finite values, non-zero for cosine
        dim = remote_stage.table_spec(source).dim if remote else tables.embedder_spec(files).dim
        tuning_queries = index_lib.prepare_tuning_queries(tuning_queries, dim, distance)
    if num_shards is None:
        num_shards = sharded.shards_for(n, max_shard_vectors)
    index_dir = runs.index_dir(run_directory, embedder)
    if storage.has_objects(index_dir) if remote else os.path.exists(index_dir):
        raise ConfigError(f"{index_dir} exists already; sharded builds write a new index directory")
    if not remote:
        os.makedirs(index_dir)
    probe_threshold = 0 if held_out else min(2**64 - 1, int(2**64 * min(1.0, 2 * num_queries / max(n, 1))))
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = LOCAL_RUNNER
    builder = BuildShard(
        index_dir, num_shards, distance, k, target_recall, max_shard_vectors, held_out, serve_max_k
    )
    with beam.Pipeline(options=options) as p:
        parts = (
            p
            | "Files" >> beam.Create(list(enumerate(files)))
            | "Partition"
            >> beam.ParDo(PartitionFile(index_dir, num_shards, probe_threshold)).with_outputs(
                "probe", main="counts"
            )
        )
        counts = parts.counts | "CountPerShard" >> beam.CombinePerKey(sum)
        if held_out:
            probes = p | "HeldOutQueries" >> beam.Create(
                [[(i, None, q) for i, q in enumerate(tuning_queries)]]
            )
        else:
            probes = parts.probe | "Probes" >> beam.combiners.Top.Of(num_queries, key=lambda t: -t[0])
        _ = (
            p
            | "Shards" >> beam.Create(range(num_shards))
            | "Spread" >> beam.Reshuffle()
            | "Build"
            >> beam.ParDo(builder, probes=beam.pvalue.AsSingleton(probes), counts=beam.pvalue.AsList(counts))
        )
    return _finish(index_dir, num_shards, distance, builder.ladder, target_recall, n, start)


def _finish(index_dir, num_shards, distance, ladder, target_recall, n, start):
    remote = storage.is_remote(index_dir)
    partitions = storage.join(index_dir, PARTITIONS) if remote else os.path.join(index_dir, PARTITIONS)
    answers = []
    for shard in range(num_shards):
        probe_file = f"probe-shard-{shard:05d}.json"
        if remote:
            answers.append(json.loads(storage.read_bytes(storage.join(partitions, probe_file))))
            continue
        with open(os.path.join(partitions, probe_file)) as f:
            answers.append(json.load(f))
    recall = shard_recall.merged_recall(answers, ladder, distance != "squared_l2", target_recall)
    manifest = sharded.ShardedManifest(
        distance=distance,
        n=sum(a["n"] for a in answers),
        d=answers[0]["d"],
        num_shards=num_shards,
        shards=[
            {
                "dir": sharded.shard_name(a["shard"], num_shards),
                "n": a["n"],
                "manifest_sha256": a["manifest_sha256"],
                "method": a["method"],
                "search_defaults": a["search_defaults"],
                "build_seconds": a["build_seconds"],
            }
            for a in answers
        ],
        recall=recall.to_dict(),
        search_defaults={"k": ladder[0], "max_k": ladder[-1]},
        build_seconds=round(time.perf_counter() - start, 3),
        embedder=answers[0]["embedder"],
    )
    if manifest.n != n:
        raise ShardSizeError(f"the shards hold {manifest.n} rows but the embedding tables {n}")
    if remote:  # the shards are uploaded (by their workers); the manifest goes last
        storage.delete_prefix(partitions)
        scratch = storage.scratch_dir("imgindex-sharded-")
        try:
            sharded.write_manifest(scratch, manifest)
            sha = storage.upload(
                os.path.join(scratch, mf.MANIFEST_NAME), storage.join(index_dir, mf.MANIFEST_NAME)
            )
        finally:
            storage.remove_scratch(scratch)
        return ShardedBuild(manifest, index_dir, sha)
    shutil.rmtree(partitions)
    sharded.write_manifest(index_dir, manifest)
    return ShardedBuild(manifest, index_dir)


@dataclasses.dataclass(frozen=True)
class ShardedBuild:
    """A written sharded index: its manifest and directory (the shards stay on disk)."""

    manifest: sharded.ShardedManifest
    directory: str
    # SHA-256 of manifest.json as uploaded to an object store (None: read it from `directory`)
    manifest_sha256: str | None = None

    num_shards = property(lambda self: self.manifest.num_shards)
    method = property(lambda self: sharded.describe_method(s["method"] for s in self.manifest.shards))

    def open(self, verify: bool = True) -> sharded.ShardedIndex:
        return sharded.open_index(self.directory, verify=verify)
