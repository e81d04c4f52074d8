"""The embedding pipeline: image shards in, Parquet embedding tables out.

    shards ─► Read ─► Decode (once, threads) ─┬─► RunInference[emb1] ─► Parquet embeddings/emb1/
                │           │                 └─► RunInference[emb2] ─► Parquet embeddings/emb2/
                └───────────┴──── failures (read, decode, preprocess, embed) ─► Parquet failures/

Every input record lands in the embedding table of each embedder or in the failures table;
`run_report.json` next to the tables reconciles the counts.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipelines import report as run_report
from pipelines.decode import FAILURES, NAMESPACE, DecodeDoFn, ResizePlan, RowInfo, tag_failure
from pipelines.inference import TFHubImageEmbedder
from pipelines.options import LOCAL_RUNNER, EmbedOptions, check_flags
from pipelines.shards import ReaderConfig, Record, Shard, expand_inputs, parse_metadata_columns, read_shard
from retrieval import embedders
from retrieval import schema as S
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError

DEFAULT_EMBEDDER = "lite=builtin:efficientnet-lite0"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything validated on the driver before the pipeline is built."""

    output: str
    shards: list
    specs: list  # complete EmbedderSpecs
    metadata: list  # MetadataColumn
    reader: ReaderConfig
    options: EmbedOptions


def plan(options: EmbedOptions) -> Plan:
    """Validates the configuration and resolves embedders; raises ConfigError/HandleError."""
    opts = options.view_as(EmbedOptions)
    if not opts.output:
        raise ConfigError("--output is required: the directory the tables and run report go to")
    for name, value, low in (
        ("--batch_size", opts.batch_size, 1),
        ("--row_group_size", opts.row_group_size, 1),
        ("--max_pixels", opts.max_pixels, 1),
        ("--decode_threads", opts.decode_threads, 0),
        ("--num_output_shards", opts.num_output_shards, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    specs = [embedders.parse_embedder_arg(e) for e in (opts.embedder or [DEFAULT_EMBEDDER])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"embedder names must be unique, got {names}; use NAME=HANDLE")
    metadata = parse_metadata_columns(opts.metadata)
    _check_output_is_free(opts.output)
    shards = expand_inputs(opts.input, opts.format)
    specs = [complete(spec, opts.model_cache_dir) for spec in specs]
    reader = ReaderConfig(opts.image_key, opts.id_key, tuple(metadata))
    return Plan(opts.output.rstrip("/"), shards, specs, metadata, reader, opts)


def complete(spec: EmbedderSpec, cache_dir: str | None) -> EmbedderSpec:
    """Fills in fingerprint and dim; builtins need no model load on the driver."""
    from retrieval import builtin

    if builtin.is_builtin(spec.handle):
        model = builtin.materialize(spec.handle, cache_dir=cache_dir)
        return dataclasses.replace(spec, fingerprint=model.fingerprint, dim=model.feature_dim)
    _, full = embedders.complete_spec(spec, cache_dir=cache_dir)
    return full


def _check_output_is_free(output: str) -> None:
    existing = [
        p
        for p in (f"{output}/run_report.json", f"{output}/embeddings", f"{output}/failures")
        if FileSystems.exists(p)
    ]
    if existing:
        raise ConfigError(
            f"{output} already holds the results of a run ({existing[0]}); "
            "choose a new --output directory (runs never overwrite each other)"
        )


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
    """RunInference's dead letter (batch, (type, repr, traceback)) -> one Failure per image."""
    batch, (exc_type, exc_repr, _) = dead_letter
    error_type = getattr(exc_type, "__name__", str(exc_type))
    for key, _ in batch:
        failure = S.Failure.of(key.source, "embed", exc_repr, id=key.id, embedder=embedder)
        yield dataclasses.replace(failure, error_type=error_type)


class ReadDoFn(beam.DoFn):
    def __init__(self, config: ReaderConfig) -> None:
        self._config = config
        self._read = beam.metrics.Metrics.counter(NAMESPACE, "read")

    def process(self, shard: Shard) -> Iterator[Record | beam.pvalue.TaggedOutput]:
        for item in read_shard(shard, self._config):
            if isinstance(item, Record):
                self._read.inc()
                yield item
            else:
                yield tag_failure(item)


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
    read = (
        pipeline
        | "Shards" >> beam.Create(p.shards)
        | "SpreadShards" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadDoFn(p.reader)).with_outputs(FAILURES, main="records")
    )
    decoded = read.records | "Decode" >> beam.ParDo(
        DecodeDoFn(
            ResizePlan.of(p.specs),
            max_pixels=opts.max_pixels,
            threads=opts.decode_threads,
            max_pending=2 * opts.batch_size,
        )
    ).with_outputs(FAILURES, main="decoded")
    failures = [read[FAILURES], decoded[FAILURES]]
    for spec in p.specs:
        name = spec.name
        handler = TFHubImageEmbedder(
            spec,
            batch_size=opts.batch_size,
            cache_dir=opts.model_cache_dir,
            share_across_processes=opts.share_model_across_processes,
            intra_op_threads=opts.tf_intra_op_threads,
        )
        keyed = decoded.decoded | f"Pixels[{name}]" >> beam.Map(lambda d, n=name: (d.info, d.pixels[n]))
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
        schema = S.embedding_schema(spec, tuple(S.metadata_field(c.name, c.type) for c in p.metadata))
        # A partial, not a closure over the plan: only what the step needs is pickled.
        _write(
            embedded,
            label=f"[{name}]",
            prefix=f"{p.output}/embeddings/{name}/part",
            schema=schema,
            opts=opts,
            to_table=functools.partial(embedding_batch, spec=spec, schema=schema, metadata=p.metadata),
        )
    _write(
        failures | "AllFailures" >> beam.Flatten(),
        label="[failures]",
        prefix=f"{p.output}/failures/part",
        schema=S.FAILURES_SCHEMA,
        opts=opts,
        to_table=failures_batch,
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Runs the embedding pipeline; returns the run report (also written as run_report.json).

    argv: command-line flags (defaults to sys.argv[1:]); flags not declared here go to Beam,
      and one that no Beam options class knows either is a ConfigError (check_flags).
    test_pipeline: a TestPipeline to build into instead of a new Pipeline.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_with_options(EmbedOptions(flags=check_flags(argv, EmbedOptions)), test_pipeline)


def run_with_options(options: PipelineOptions, test_pipeline: beam.Pipeline | None = None) -> dict:
    """`run` for already parsed options (any PipelineOptions whose flags include EmbedOptions')."""
    started = time.time()
    p = plan(options)
    if test_pipeline is None and options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = LOCAL_RUNNER
    pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
    build(pipeline, p)
    result = pipeline.run()
    result.wait_until_finish()
    report = run_report.make(
        p,
        result,
        started=started,
        runner=options.view_as(StandardOptions).runner,
        direct_options=options.view_as(DirectOptions),
    )
    run_report.write(p.output, report)
    return report
