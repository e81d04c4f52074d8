"""The nightly job: embed, index, validate, publish (`imgindex build`).

    runs/<run_id>/embeddings, failures   <- the embedding pipeline (pipelines.embed)
    runs/<run_id>/index/<embedder>/      <- one ScaNN index per embedder, recall measured
    runs/<run_id>/run_manifest.json      <- written last in the run, with its status
    LATEST                               <- names the run, written last and atomically

The root may be on an object store (s3://, gs://): Beam writes the tables there, each index
is built in local scratch and uploaded with its checksums checked (pipelines.remote_stage),
then the run manifest and LATEST are single-object puts, in that order.

A run that fails, is interrupted or is refused by a gate never touches LATEST, so the
previous good run stays published.  A run that passes its gates is recorded as
"publishing", made read-only, named by LATEST, then recorded as "published"
(`retrieval.run_status.publish`; a kill in between is told apart by LATEST).  Every run gets a
new directory: rerunning the same command is safe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import build_options, embed, remote_stage
from pipelines import report as report_lib
from pipelines.options import EmbedOptions, check_flags
from pipelines.plan import plan
from retrieval import dba, killpoints, projection, retention, run_status, runs, sharded, storage, tables
from retrieval import index as index_lib
from retrieval.errors import ConfigError, ImgIndexError
from retrieval.version import __version__

log = logging.getLogger(__name__)


class GateError(ImgIndexError):
    """The run finished but a quality gate refused to publish it."""


def _versions() -> dict:
    import apache_beam
    import numpy

    return {
        "imgindex": __version__,
        "python": platform.python_version(),
        "apache_beam": apache_beam.__version__,
        "pyarrow": pa.__version__,
        "numpy": numpy.__version__,
    }


def _sharded(run_directory: str, name: str, opts: build_options.BuildOptions) -> bool:
    if opts.index_shards > 1:
        return True
    if opts.index_shards == 0 and opts.max_shard_vectors:
        table = f"{run_directory}/{runs.EMBEDDINGS_DIR}/{name}"
        n = report_lib.count_rows(table) if storage.is_remote(table) else tables.count_rows(table)
        return sharded.shards_for(n, opts.max_shard_vectors) > 1
    return False


def build_indexes(
    run_directory: str, report: dict, opts: build_options.BuildOptions, options: PipelineOptions | None = None
) -> dict:
    """One index per embedder from its tables; returns the run manifest's `embedders` entry.

    A sharded index (--index_shards, --max_shard_vectors) is built by a Beam pipeline on the
    runner `options` names (pipelines.build_shards); a single index in this process.  On an
    object-store run (`retrieval.storage`) each is built in local scratch and uploaded
    (pipelines.remote_stage); the scratch is removed in the end.
    """
    remote = storage.is_remote(run_directory)
    scratch = storage.scratch_dir("imgindex-build-") if remote else None
    try:
        return _build_indexes(run_directory, report, opts, options, scratch)
    finally:
        if scratch is not None:
            storage.remove_scratch(scratch)


def _build_indexes(
    run_directory: str,
    report: dict,
    opts: build_options.BuildOptions,
    options: PipelineOptions | None,
    scratch: str | None,
) -> dict:
    out = {}
    tuning = build_options.tuning_queries_of(opts)
    if scratch is not None:  # remote --tuning_queries: read from a local copy
        tuning = {name: remote_stage.localize(path, scratch, name) for name, path in tuning.items()}
    # Where the index is built: the run itself, or a local mirror of its layout.
    local_run = run_directory if scratch is None else scratch
    for name in report["embedders"]:
        if _sharded(run_directory, name, opts):
            from pipelines import build_shards

            queries = None
            if name in tuning:
                table = f"{run_directory}/{runs.EMBEDDINGS_DIR}/{name}"
                spec = remote_stage.table_spec(table) if scratch is not None else tables.embedder_spec(table)
                queries = tables.load_tuning_queries(tuning[name], spec)
            built = build_shards.build_sharded(
                options if options is not None else opts,
                run_directory,
                name,
                num_shards=opts.index_shards or None,
                max_shard_vectors=opts.max_shard_vectors or None,
                distance=opts.distance,
                k=opts.recall_k,
                serve_max_k=opts.serve_max_k,
                target_recall=opts.min_recall,
                tuning_queries=queries,
            )
            out[name] = runs.embedder_entry(
                run_directory,
                name,
                built,
                built.manifest.embedder,
                manifest_sha256=built.manifest_sha256,
                shards=built.num_shards,
            )
            continue
        if scratch is not None:
            remote_stage.download_table(
                f"{run_directory}/{runs.EMBEDDINGS_DIR}/{name}", f"{local_run}/{runs.EMBEDDINGS_DIR}/{name}"
            )
        index_dir = runs.index_dir(local_run, name)
        work_dir = os.path.dirname(index_dir)
        os.makedirs(work_dir, exist_ok=True)
        # The matrix and the metadata columns go to local files, not the heap: the index build
        # streams the matrix, ScaNN's searcher then holds the only in-memory copy, and the
        # metadata file is linked into the index (BENCHMARKS.md, build memory).
        reading = tempfile.mkdtemp(dir=work_dir, prefix=f".read-{name}-")
        try:
            data = tables.read_embeddings(
                f"{local_run}/{runs.EMBEDDINGS_DIR}/{name}",
                with_columns=True,
                vectors_path=os.path.join(reading, "vectors.npy"),
                columns_path=os.path.join(reading, "columns.parquet"),
            )
            extra = {index_lib.METADATA_FILE: data.columns}
            vectors = data.vectors
            queries = tables.load_tuning_queries(tuning[name], data.spec) if name in tuning else None
            if opts.pca_dim:
                extra[projection.PROJECTION_FILE] = projection.fit_pca(np.asarray(vectors), opts.pca_dim)
                vectors = projection.project(np.asarray(vectors), extra[projection.PROJECTION_FILE])
                if queries is not None:
                    queries = projection.project(queries, extra[projection.PROJECTION_FILE])
            built = index_lib.build_index(
                vectors,
                data.ids,
                distance=opts.distance,
                embedder=data.spec.to_dict(),
                k=opts.recall_k,
                serve_max_k=opts.serve_max_k,
                target_recall=opts.min_recall,
                copy=False,
                work_dir=work_dir,
                tuning_queries=queries,
                trained_from=None if opts.pca_dim else _previous_index(report, name),
                dba=build_options.dba_of(opts),
            )
            killpoints.reached("index")
            del data.vectors, vectors
            built.save(index_dir, tables=extra)
        finally:
            shutil.rmtree(reading, ignore_errors=True)
        uploaded = None
        if scratch is not None:
            uploaded = remote_stage.upload_index(index_dir, runs.index_dir(run_directory, name))
        out[name] = runs.embedder_entry(
            local_run,
            name,
            built,
            data.spec.to_dict(),
            manifest_sha256=uploaded,
            pca_dim=opts.pca_dim or None,
        )
    return out


def _previous_index(report: dict, name: str) -> str | None:
    """The index the run whose table embedder `name` reused built from that table (local
    runs only), whose training today's index may reuse (`retrieval.index.training`)."""
    table = ((report.get("reuse") or {}).get("embedders") or {}).get(name, {}).get("table")
    if not table or storage.is_remote(table):  # a remote index is not read back to train from
        return None
    embeddings, previous_name = os.path.split(table.rstrip("/"))
    run_directory, folder = os.path.split(embeddings)
    if folder != runs.EMBEDDINGS_DIR:
        return None  # tables given without their run: no index to learn from
    index = runs.index_dir(run_directory, previous_name)
    return index if os.path.isdir(index) else None


def gates(report: dict, embedders: dict, opts: build_options.BuildOptions) -> dict:
    records = report["counts"]["records"] or 0
    failed = report["counts"]["failed_total"]
    rate = failed / records if records else 1.0
    reasons = []
    if not records:
        reasons.append("no input records")
    elif rate > opts.max_failure_rate:
        reasons.append(
            f"failure rate {rate:.4f} ({failed} of {records} records) is above "
            f"--max_failure_rate {opts.max_failure_rate}; see the failures table"
        )
    for name, e in embedders.items():
        reasons.extend(_recall_reasons(name, e.recall, opts))
    if report["status"] != "ok":
        reasons.append(f"embedding counts do not reconcile (run report status {report['status']!r})")
    return {
        "min_recall": opts.min_recall,
        "max_failure_rate": opts.max_failure_rate,
        "failure_rate": round(rate, 6),
        "passed": not reasons,
        "reasons": reasons,
    }


def _recall_reasons(name: str, recall: dict, opts: build_options.BuildOptions) -> list[str]:
    """The gate's refusals of one index: each k of its ladder (up to --serve_max_k) whose recall
    is below --min_recall, with the fixes."""
    entries = recall.get("per_k") or [recall]  # a record without per_k: its one k
    measured = [e for e in entries if e.get("value") is not None]
    reasons = []
    for entry in measured:
        if entry["value"] >= opts.min_recall:
            continue
        reached = [e["k"] for e in measured if e["k"] < entry["k"] and e["value"] >= opts.min_recall]
        knobs = ", ".join(f"{knob}={entry[knob]}" for knob in index_lib.SEARCH_KNOBS if entry.get(knob))
        fixes = [f"lower --serve_max_k to {max(reached)}"] if reached and "per_k" in recall else []
        fixes += [
            "raise the search knobs" + (f" (measured with {knobs})" if knobs else ""),
            "lower --min_recall",
        ]
        reasons.append(
            f"{name}: recall@{entry['k']} {entry['value']:.4f} is below --min_recall {opts.min_recall}"
            + (f" (every k up to --serve_max_k {opts.serve_max_k} is gated)" if "per_k" in recall else "")
            + f"; {', '.join(fixes[:-1])} or {fixes[-1]}"
        )
    return reasons


@dataclasses.dataclass(frozen=True)
class BuildResult:
    root: str
    run_dir: str
    manifest: runs.RunManifest


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> BuildResult:
    """Runs the whole job and publishes it.  Raises GateError when a gate refuses the run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = build_options.BuildOptions(flags=check_flags(argv, build_options.BuildOptions))
    opts = options.view_as(build_options.BuildOptions)
    # The store's endpoint, credentials and region reach Beam's FileSystems before anything
    # is listed or checked (retrieval.storage).
    storage.configure(options)
    build_options.check(opts)
    root = opts.output.rstrip("/")
    remote = storage.is_remote(root)
    run_id = opts.run_id or runs.new_run_id()
    run_directory = runs.run_dir(root, run_id)
    if remote:  # bucket, endpoint and credentials: one clear line before any work
        storage.check_writable(root)
        remote_stage.check_free(run_directory)
    elif os.path.exists(run_directory):
        raise ConfigError(f"run directory {run_directory} exists already; choose another --run_id")
    embed_options = options.view_as(EmbedOptions)
    embed_options.output = run_directory
    if embed_options.reuse_from is None:
        embed_options.reuse_from = "latest"
    started = time.time()
    # Flags, handles and previous tables are checked before the run directory exists.
    planned = plan(options, root=root, salt=run_id)
    if not remote:  # an object store has no directories
        os.makedirs(run_directory)
    timings: dict[str, float] = {}
    manifest = runs.RunManifest(
        run_id=run_id,
        status="failed",
        inputs={"globs": list(opts.input or [])},
        counts={},
        embedders={},
        gates={},
        timings=timings,
        versions=_versions(),
    )
    try:
        report = embed.run_with_options(options, test_pipeline, planned=planned)
        timings["embed_seconds"] = report["seconds"]
        manifest.inputs, manifest.counts = report["inputs"], _counts(report)
        step = time.time()
        manifest.embedders = build_indexes(run_directory, report, opts, options)
        timings["index_seconds"] = round(time.time() - step, 2)
        manifest.gates = gates(report, manifest.embedders, opts)
        manifest.status = runs.PUBLISHING if manifest.gates["passed"] else "rejected"
    except BaseException as exc:  # interrupted or failed: record it, leave LATEST alone
        manifest.error = f"{type(exc).__name__}: {exc}"
        timings["total_seconds"] = round(time.time() - started, 2)
        runs.write_run_manifest(run_directory, manifest)
        raise
    timings["total_seconds"] = round(time.time() - started, 2)
    if manifest.status == runs.PUBLISHING:
        manifest.publisher = run_status.publisher_record()
    runs.write_run_manifest(run_directory, manifest)
    if manifest.status != runs.PUBLISHING:
        raise GateError(
            f"run {run_id} was not published: "
            + "; ".join(manifest.gates["reasons"])
            + f" (run kept at {run_directory}; LATEST unchanged)"
        )
    try:
        manifest = run_status.publish(root, run_id)  # read-only, LATEST, then status "published"
    except BaseException as exc:
        _record_failed_publish(root, run_directory, manifest, exc)
        raise
    manifest.retention = _retention(root, opts)
    runs.write_run_manifest(run_directory, manifest)  # again, with what the retention deleted
    return BuildResult(root, run_directory, manifest)


def _record_failed_publish(
    root: str, run_directory: str, manifest: runs.RunManifest, exc: BaseException
) -> None:
    """A publish that raised before LATEST named the run leaves a failed run (one that raised
    after is published: LATEST names it, and the next publish records it so)."""
    try:
        named = runs.read_latest(root) == run_directory
    except (ImgIndexError, OSError):
        named = False
    if named:
        return
    try:
        manifest.status, manifest.publisher = runs.FAILED, None
        manifest.error = f"{type(exc).__name__} while publishing: {exc}"
        runs.write_run_manifest(run_directory, manifest)
    except (ImgIndexError, OSError) as second:
        log.warning("could not record the failed publish of %s: %s", run_directory, second)


def _retention(root: str, opts: build_options.BuildOptions) -> dict:
    """Old runs deleted after a publish (`retrieval.retention`); a failure here is logged and
    recorded, not raised: the run is published, and the next build finishes the clean-up."""
    try:
        report = retention.apply_retention(
            root, keep_runs=opts.keep_runs, keep_failed_hours=opts.keep_failed_hours
        )
    except (ImgIndexError, OSError) as exc:
        log.warning("retention skipped: %s", exc)
        return {"errors": [f"{type(exc).__name__}: {exc}"], "deleted": []}
    log.info("%s", report.summary())
    return report.to_dict()


def _counts(report: dict) -> dict:
    """The run manifest's counts: the report's, plus per embedder what was reused and embedded."""
    keys = ("rows", "reused", "embedded", "model_inputs", "deleted", "failed_embed")
    per_embedder = {name: {k: e.get(k) for k in keys} for name, e in report["embedders"].items()}
    return {**report["counts"], "embedders": per_embedder, "reuse_source": report["reuse"]["source"]}


def summary(result: BuildResult) -> str:
    manifest = result.manifest
    lines = [
        f"imgindex build: run {manifest.run_id} {manifest.status} "
        f"in {manifest.timings.get('total_seconds', 0):.1f}s -> {result.root}/{runs.LATEST}"
    ]
    c = manifest.counts
    lines.append(
        f"  records {c.get('records')}: failed {c.get('failed_total')} "
        f"(rate {manifest.gates.get('failure_rate')})"
    )
    if c.get("duplicate_ids") or c.get("duplicate_content"):
        lines.append(
            f"  duplicates: {c.get('duplicate_ids')} ids (failed), {c.get('duplicate_content')} records "
            "repeating content seen earlier (embedded once)"
        )
    for name, e in manifest.embedders.items():
        counts = (c.get("embedders") or {}).get(name, {})
        deleted = (
            "" if counts.get("deleted") is None else f", {counts['deleted']} deleted since the previous run"
        )
        # Every k the build measured (the one k of a record without per_k).
        recall = " ".join(f"recall@{r['k']}={r['value']}" for r in e.recall.get("per_k") or [e.recall])
        lines.append(
            f"  {name}: n={e.n} (reused {counts.get('reused')}, embedded {counts.get('embedded')}{deleted}) "
            f"d={e.d} {e.method}{dba.describe(e.dba)} {recall} search {e.search_defaults} -> {e.index}"
        )
    return "\n".join(lines)
