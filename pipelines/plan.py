"""The embedding run planned on the driver before any work: flags validated, inputs expanded,
embedders resolved (fingerprint, dimension, decode size) and the previous tables each embedder
reuses chosen (`pipelines.reuse`).  `pipelines.embed` builds and runs the graph of a `Plan`.
"""

from __future__ import annotations

import dataclasses

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import reuse
from pipelines.decode import ResizePlan
from pipelines.options import EmbedOptions
from pipelines.shards import ReaderConfig, expand_inputs, parse_metadata_columns
from retrieval import embedders, imaging, storage
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
    reuse: reuse.ReusePlan
    skipped: dict = dataclasses.field(default_factory=dict)  # input files skipped: reason -> paths


def plan(options: PipelineOptions, *, root: str | None = None, salt: str = "") -> Plan:
    """Validates the configuration, resolves embedders and previous tables; raises
    ConfigError/HandleError.  root: the output root whose LATEST `--reuse_from latest` means
    (imgindex build); salt: makes the verification sample differ from run to run."""
    opts = options.view_as(EmbedOptions)
    # The store's endpoint, credentials and region reach Beam's FileSystems before any input
    # is listed or the output checked (without them its S3 client cannot be made at all).
    storage.configure(options)
    if not opts.output:
        raise ConfigError("--output is required: the directory the tables and run report go to")
    for name, value, low in (
        ("--batch_size", opts.batch_size, 1),
        ("--row_group_size", opts.row_group_size, 1),
        ("--max_pixels", opts.max_pixels, 1),
        ("--max_record_bytes", opts.max_record_bytes, 1),
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
    _check_output_is_free(opts.output.rstrip("/"))
    if root is None and storage.is_remote(opts.output):  # imgindex build checked its root already
        storage.check_writable(opts.output.rstrip("/"))
    inputs = expand_inputs(opts.input, opts.format)
    specs = [complete(spec, opts.model_cache_dir) for spec in specs]
    # What else decides the pixels each embedder sees (part of the spec, so of reuse).
    decode_size = ResizePlan.of(specs).min_size
    specs = [
        dataclasses.replace(s, decode_size=decode_size, pixels=imaging.pixels_rule(s.resizing()))
        for s in specs
    ]
    reuse_plan = reuse.plan_reuse(
        opts.reuse_from, specs, root=root, verify_fraction=opts.verify_reuse_fraction, salt=salt
    )
    reader = ReaderConfig(opts.image_key, opts.id_key, tuple(metadata), opts.max_record_bytes)
    return Plan(
        opts.output.rstrip("/"), inputs.shards, specs, metadata, reader, opts, reuse_plan, inputs.skipped
    )


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
        if (storage.exists_any(p) if storage.is_remote(p) else FileSystems.exists(p))
    ]
    if existing:
        raise ConfigError(
            f"{output} already holds the results of a run ({existing[0]}); "
            "choose a new --output directory (runs never overwrite each other)"
        )
