"""The embedding pipeline: image shards in, Parquet embedding tables out.

    shards ─► Read+hash ─► by id: keep the first ─► by content ─┬─► reused: copy from the previous
                                 (duplicates fail)   (+ previous │   table's file ──────────────┐
                                                      tables)    └─► new: re-read, decode once, │
                                                                     RunInference per embedder ─┴─► embeddings/<emb>/
    failures (read, duplicate id, decode, preprocess, embed) ─► failures/

The run is planned first (`pipelines.plan`: validation, inputs, embedders, previous tables);
`build` adds the graph of a `Plan` to a pipeline, `run` runs it and writes the report.

Every input record lands in the embedding table of each embedder or in the failures table;
`run_report.json` next to the tables reconciles the counts.  Content already embedded by the
previous run with the same weights and preprocessing (`--reuse_from`, `pipelines.reuse`) is
not decoded or embedded again: only its bytes are read and hashed.  Identical content within
the run is embedded once, and every id gets its row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from pipelines import progress, reuse
from pipelines import report as run_report
from pipelines.content import (
    EMBED,
    REUSE,
    TODAY,
    VERIFY,
    DecideReuseDoFn,
    EmbedKey,
    FanOutDoFn,
    KeepFirstIdDoFn,
    ReadHashDoFn,
    RereadDoFn,
    RouteDoFn,
    previous_tag,
)
from pipelines.decode import FAILURES, DecodeDoFn, ResizePlan, RowInfo
from pipelines.fetch import (
    CHECKS_SCHEMA,
    IDS,
    CompareDoFn,
    FetchDoFn,
    PreviousKeysDoFn,
    PreviousRowGroupsDoFn,
    rows_tag,
)
from pipelines.inference import TFHubImageEmbedder
from pipelines.options import LOCAL_RUNNER, MIN_VERIFY_ROWS, EmbedOptions, check_flags, own_flags
from pipelines.plan import Plan, plan
from retrieval import schema as S
from retrieval.embedders import EmbedderSpec


def embedding_batch(
    rows: list[tuple[RowInfo, np.ndarray]], *, spec: EmbedderSpec, schema: pa.Schema, metadata: list
) -> pa.Table:
    """(RowInfo, vector) pairs -> one Arrow table of the embedding schema."""
    infos = [info for info, _ in rows]
    vectors = np.stack([vector for _, vector in rows]).astype(np.float32, copy=False)
    fixed = {
        S.ID: [info.id for info in infos],
        S.SOURCE: [info.source for info in infos],
        S.SHA256: [info.sha256 for info in infos],
        S.WIDTH: [info.width for info in infos],
        S.HEIGHT: [info.height for info in infos],
    }
    columns = {name: pa.array(values, schema.field(name).type) for name, values in fixed.items()}
    columns[S.EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), spec.dim)
    for column in metadata:
        columns[column.name] = pa.array(
            [info.metadata.get(column.name) for info in infos], schema.field(column.name).type
        )
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def failures_batch(failures: list[S.Failure]) -> pa.Table:
    """Failures -> one Arrow table of the failures schema."""
    return pa.Table.from_pylist([f.to_row() for f in failures], schema=S.FAILURES_SCHEMA)


def inference_failures(dead_letter: tuple, embedder: str) -> Iterator[S.Failure]:
    """RunInference's dead letter (batch, (type, repr, traceback)) -> one Failure per row that
    waited for the vector (every id of each content in the batch)."""
    batch, (exc_type, exc_repr, _) = dead_letter
    error_type = getattr(exc_type, "__name__", str(exc_type))
    for key, _ in batch:
        if embedder not in key.request.embedders:
            continue  # a verification sample: its rows are reused; the check reports it
        progress.count("failed", len(key.request.rows))
        progress.count(f"failed.{embedder}", len(key.request.rows))
        for row in key.request.rows:
            failure = S.Failure.of(row.source, "embed", exc_repr, id=row.id, embedder=embedder)
            yield dataclasses.replace(failure, error_type=error_type)


def _write(
    pcoll: beam.PCollection,
    *,
    label: str,
    prefix: str,
    schema: pa.Schema,
    opts: EmbedOptions,
    to_table: Callable[[list], pa.Table],
) -> beam.PCollection:
    return (
        pcoll
        | f"Batch{label}"
        >> beam.BatchElements(min_batch_size=opts.row_group_size, max_batch_size=opts.row_group_size)
        | f"ToArrow{label}" >> beam.Map(to_table)
        | f"Write{label}"
        >> beam.io.WriteToParquetBatched(
            prefix, schema, codec="snappy", file_name_suffix=".parquet", num_shards=opts.num_output_shards
        )
    )


def build(pipeline: beam.Pipeline, p: Plan) -> None:
    """Adds the embedding graph for plan `p` to `pipeline`."""
    opts = p.options
    names = [spec.name for spec in p.specs]
    tables = p.reuse.tables
    read = (
        pipeline
        | "Shards" >> beam.Create(list(enumerate(p.shards)))
        | "SpreadShards" >> beam.Reshuffle()
        | "ReadHash" >> beam.ParDo(ReadHashDoFn(p.reader)).with_outputs(FAILURES, main="seen")
    )
    failures = [read[FAILURES]]
    previous_ids, previous_content = {}, {}
    for name, table in tables.items():
        keys = (
            pipeline
            | f"PreviousFiles[{name}]" >> beam.Create(list(table.files))
            | f"PreviousRowGroups[{name}]" >> beam.ParDo(PreviousRowGroupsDoFn())
            | f"SpreadRowGroups[{name}]" >> beam.Reshuffle()
            | f"ReadPrevious[{name}]" >> beam.ParDo(PreviousKeysDoFn()).with_outputs(IDS, main="content")
        )
        previous_ids[previous_tag(name)] = keys[IDS]
        previous_content[previous_tag(name)] = keys.content
    kept = (
        {TODAY: read.seen | "ById" >> beam.Map(lambda seen: (seen.id, seen)), **previous_ids}
        | "GroupById" >> beam.CoGroupByKey()
        | "KeepFirstId" >> beam.ParDo(KeepFirstIdDoFn(tables)).with_outputs(FAILURES, main="kept")
    )
    failures.append(kept[FAILURES])
    routed = (
        {TODAY: kept.kept | "ByContent" >> beam.Map(lambda seen: (seen.sha256, seen)), **previous_content}
        | "GroupByContent" >> beam.CoGroupByKey()
        | "Route" >> beam.ParDo(RouteDoFn(names, tables, p.reuse.salt)).with_outputs(REUSE, EMBED)
    )
    requests = [routed[EMBED]]
    fetched = None
    if tables:
        lowest = (
            routed[REUSE]
            | "Draws" >> beam.Map(lambda c: (c.embedder, (c.draw, c.sha256)))
            | "LowestDraws" >> beam.combiners.Top.SmallestPerKey(MIN_VERIFY_ROWS)
        )
        decided = routed[REUSE] | "DecideReuse" >> beam.ParDo(
            DecideReuseDoFn(p.reuse.verify_fraction), lowest=beam.pvalue.AsDict(lowest)
        ).with_outputs(EMBED, main="fetch")
        requests.append(decided[EMBED])
        fetched = (
            decided.fetch
            | "GroupByPreviousRowGroup" >> beam.GroupByKey()
            | "CopyPrevious"
            >> beam.ParDo(FetchDoFn({s.name: s.dim for s in p.specs})).with_outputs(
                VERIFY, *[rows_tag(name) for name in tables]
            )
        )
    records = (
        requests
        | "AllEmbedRequests" >> beam.Flatten()
        | "GroupByShard" >> beam.GroupByKey()
        | "Reread" >> beam.ParDo(RereadDoFn(p.reader)).with_outputs(FAILURES, main="records")
    )
    decoded = records.records | "Decode" >> beam.ParDo(
        DecodeDoFn(
            ResizePlan.of(p.specs),
            max_pixels=opts.max_pixels,
            threads=opts.decode_threads,
            max_pending=2 * opts.batch_size,
        )
    ).with_outputs(FAILURES, main="decoded")
    failures += [records[FAILURES], decoded[FAILURES]]
    verify_today = []
    for spec in p.specs:
        name = spec.name
        handler = TFHubImageEmbedder(
            spec,
            batch_size=opts.batch_size,
            cache_dir=opts.model_cache_dir,
            share_across_processes=opts.share_model_across_processes,
            intra_op_threads=opts.tf_intra_op_threads,
        )
        keyed = (
            decoded.decoded
            | f"Wants[{name}]"
            >> beam.Filter(lambda d, n=name: n in d.request.embedders or n in d.request.verify)
            | f"Pixels[{name}]"
            >> beam.Map(lambda d, n=name: (EmbedKey(d.request, d.info.width, d.info.height), d.pixels[n]))
        )
        embedded, dead = (
            keyed
            | f"Embed[{name}]"
            >> RunInference(
                KeyedModelHandler(handler), model_identifier=f"imgindex-{name}-{spec.fingerprint}"
            ).with_exception_handling()
        )
        failures.append(
            dead.failed_inferences | f"EmbedFailures[{name}]" >> beam.FlatMap(inference_failures, name)
        )
        fanned = embedded | f"FanOut[{name}]" >> beam.ParDo(FanOutDoFn(name)).with_outputs(
            VERIFY, main="rows"
        )
        verify_today.append(fanned[VERIFY])
        rows = fanned.rows
        if fetched is not None and name in tables:
            rows = (rows, fetched[rows_tag(name)]) | f"AllRows[{name}]" >> beam.Flatten()
        schema = S.embedding_schema(spec, tuple(S.metadata_field(c.name, c.type) for c in p.metadata))
        # A partial, not a closure over the plan: only what the step needs is pickled.
        _write(
            rows,
            label=f"[{name}]",
            prefix=f"{p.output}/embeddings/{name}/part",
            schema=schema,
            opts=opts,
            to_table=functools.partial(embedding_batch, spec=spec, schema=schema, metadata=p.metadata),
        )
    if fetched is not None:
        checks = (
            {"previous": fetched[VERIFY], "today": verify_today | "AllVerified" >> beam.Flatten()}
            | "MeetSample" >> beam.CoGroupByKey()
            | "Compare" >> beam.ParDo(CompareDoFn())
        )
        _write(
            checks,
            label="[checks]",
            prefix=f"{p.output}/{reuse.CHECKS_DIR}/part",
            schema=CHECKS_SCHEMA,
            opts=opts,
            to_table=_checks_batch,
        )
    _write(
        failures | "AllFailures" >> beam.Flatten(),
        label="[failures]",
        prefix=f"{p.output}/failures/part",
        schema=S.FAILURES_SCHEMA,
        opts=opts,
        to_table=failures_batch,
    )


def _checks_batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CHECKS_SCHEMA)


def _pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Pipeline on the runner `options` names.  The local FnApiRunner is made as Beam's
    DirectRunner makes it, with the pipeline options handed to its worker processes
    (--direct_running_mode=multi_processing), so that they log at WARNING and above
    (--default_sdk_harness_log_level; Beam's default INFO logs every channel they open)."""
    if options.view_as(StandardOptions).runner != LOCAL_RUNNER:
        return beam.Pipeline(options=options)
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    workers = options.view_as(WorkerOptions)
    if workers.default_sdk_harness_log_level is None:
        workers.default_sdk_harness_log_level = "WARNING"
    # Beam's own options only, and only those set: the workers know neither imgindex's flags
    # nor the negated forms of Beam's boolean defaults, and would warn about each.
    own = {flag.lstrip("-") for flag in own_flags()}
    beam_options = {k: v for k, v in options.get_all_options(drop_default=True).items() if k not in own}
    encoded = JobServiceHandle.encode_pipeline_options(beam_options)
    provision = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    )
    return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision), options=options)


def _progress(options: PipelineOptions, p: Plan) -> contextlib.AbstractContextManager:
    """The progress line on stderr (pipelines.progress) while the pipeline runs, or nothing."""
    if not progress.wanted(p.options.progress):
        return contextlib.nullcontext()
    runner = options.view_as(StandardOptions).runner
    mode = getattr(options.view_as(DirectOptions), "direct_running_mode", None) or "in_memory"
    where = None
    if runner not in (None, LOCAL_RUNNER):
        where = f"the {runner} runner"
    elif mode == "multi_processing":
        workers = options.view_as(DirectOptions).direct_num_workers
        where = f"{workers or 'one per CPU'} worker processes"
    return progress.Display(shards=len(p.shards), embedders=[s.name for s in p.specs], where=where)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Runs the embedding pipeline; returns the run report (also written as run_report.json).

    argv: command-line flags (defaults to sys.argv[1:]); flags not declared here go to Beam,
      and one that no Beam options class knows either is a ConfigError (check_flags).
    test_pipeline: a TestPipeline to build into instead of a new Pipeline.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_with_options(EmbedOptions(flags=check_flags(argv, EmbedOptions)), test_pipeline)


def run_with_options(
    options: PipelineOptions,
    test_pipeline: beam.Pipeline | None = None,
    *,
    planned: Plan | None = None,
) -> dict:
    """`run` for already parsed options (any PipelineOptions whose flags include EmbedOptions').

    planned: the Plan made by `plan(options)` beforehand (imgindex build plans before it
    creates the run directory); planned here otherwise.  Raises pipelines.fetch.ReuseError
    when a reused vector fails the verification (the tables are written, the report says so).
    """
    started = time.time()
    p = planned if planned is not None else plan(options)
    if test_pipeline is None and options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = LOCAL_RUNNER
    pipeline = test_pipeline if test_pipeline is not None else _pipeline(options)
    build(pipeline, p)
    with _progress(options, p):
        result = pipeline.run()
        result.wait_until_finish()
    verification, error = None, None
    if p.reuse.tables:
        try:
            verification = reuse.check_verification(p.output, p.reuse)
        except reuse.ReuseError as exc:
            error = exc
    report = run_report.make(
        p,
        result,
        started=started,
        runner=options.view_as(StandardOptions).runner,
        direct_options=options.view_as(DirectOptions),
        verification=verification,
        error=error,
    )
    run_report.write(p.output, report)
    if error is not None:
        raise error
    return report
