"""Reading and writing embedding tables with pyarrow (outside Beam).

`read_embeddings` streams record batches straight into one preallocated float32 matrix, so
peak memory stays near the matrix itself rather than the table plus a copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from retrieval import npy_stream
from retrieval import schema as S
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError


@dataclasses.dataclass
class Embeddings:
    ids: list[str] | pa.StringArray  # a pyarrow array when read with vectors_path
    vectors: np.ndarray  # (n, d) float32, C-contiguous
    spec: EmbedderSpec
    columns: pa.Table | None = None  # the other columns, rows aligned with ids (when asked)


def write_embeddings(
    path: str,
    spec: EmbedderSpec,
    ids: Sequence[str] | pa.Array,
    vectors: np.ndarray,
    *,
    sha256s: Sequence[str],
    sources: Sequence[str],
    widths: Sequence[int] | np.ndarray,
    heights: Sequence[int] | np.ndarray,
    row_group_size: int = 4096,
) -> None:
    """Writes one embedding table file (temporary name, then rename)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    schema = S.embedding_schema(spec)
    table = pa.table(
        {
            S.ID: pa.array(ids, pa.string()),
            S.SHA256: pa.array(sha256s, pa.string()),
            S.SOURCE: pa.array(sources, pa.string()),
            S.WIDTH: pa.array(widths, pa.int32()),
            S.HEIGHT: pa.array(heights, pa.int32()),
            S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), spec.dim),
        },
        schema=schema,
    )
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def read_embeddings(
    source: str | list[str],
    *,
    with_columns: bool = False,
    vectors_path: str | None = None,
    columns_path: str | None = None,
) -> Embeddings:
    """Reads embedding tables (a file, a directory of .parquet files, or a list of files).

    with_columns: also return every column but the embedding (id, source, sha256, width,
    height, passthrough metadata) as an Arrow table aligned with the vectors.
    vectors_path: write the vectors to this local .npy file row group by row group and
    return them as a read-only memory map of it, instead of one in-memory matrix; the ids
    then come as one pyarrow string array rather than a list of Python strings (far less
    memory for short ids).
    columns_path: with with_columns, write those columns to this local Parquet file as they
    are read and return its path (a pathlib.Path) as `columns` instead of a table.
    """
    dataset, spec = _dataset_and_spec(source)
    n = dataset.count_rows()
    vectors = np.empty((n, spec.dim), np.float32) if vectors_path is None else None
    others = [name for name in dataset.schema.names if name != S.EMBEDDING]
    schema = pa.schema([dataset.schema.field(name) for name in others])
    id_chunks = []
    pieces = []
    row = 0
    with contextlib.ExitStack() as sinks:
        vector_sink = column_sink = None
        if vectors_path is not None:
            vector_sink = sinks.enter_context(npy_stream.NpyWriter(vectors_path, (n, spec.dim), np.float32))
        if with_columns and columns_path is not None:
            column_sink = sinks.enter_context(pq.ParquetWriter(columns_path, schema))
        for batch in _batches(dataset.files, [S.EMBEDDING] + (others if with_columns else [S.ID])):
            m = batch.num_rows
            flat = batch.column(S.EMBEDDING).flatten().to_numpy(zero_copy_only=False).reshape(m, spec.dim)
            if vector_sink is not None:
                vector_sink.append(flat)
            else:
                vectors[row : row + m] = flat  # type: ignore[index]  # allocated when no sink
            id_chunks.append(batch.column(S.ID))
            if with_columns:
                piece = pa.Table.from_batches([batch]).drop_columns([S.EMBEDDING])
                if column_sink is not None:
                    column_sink.write_table(piece.cast(schema))
                else:
                    pieces.append(piece)
            row += m
    if vectors is None:
        assert vectors_path is not None  # no matrix was allocated: the vectors went to this file
        vectors = npy_stream.open_read(vectors_path)
        ids = pa.chunked_array(id_chunks, schema.field(S.ID).type).combine_chunks()
    else:
        ids = [item for chunk in id_chunks for item in chunk.to_pylist()]
    del id_chunks
    columns = None
    if with_columns and columns_path is not None:
        columns = Path(columns_path)
    elif with_columns:
        columns = pa.concat_tables(pieces).cast(schema) if pieces else schema.empty_table()
    # Decoded row groups are freed by now; hand the allocator's cached pages back.
    pa.default_memory_pool().release_unused()
    return Embeddings(ids=ids, vectors=vectors, spec=spec, columns=columns)


def embedder_spec(source: str | list[str]) -> EmbedderSpec:
    """The embedder that made the tables at `source` (all files must agree)."""
    return _dataset_and_spec(source)[1]


def load_tuning_queries(path: str, spec: EmbedderSpec) -> np.ndarray:
    """Query vectors from a .npy file or from embedding tables made with the same embedder.

    Raises ConfigError (worded for `--tuning_queries`) when the path is missing or unreadable,
    or the tables were made by an embedder with another fingerprint or preprocessing than
    `spec`'s.
    """
    if not os.path.exists(path):
        raise ConfigError(
            f"--tuning_queries {path!r} does not exist (a .npy file or Parquet embedding tables)"
        )
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tuning_queries {path!r} is not a readable .npy array ({exc})") from exc
    queries = read_embeddings(path)
    if queries.spec.fingerprint != spec.fingerprint:
        raise ConfigError(
            f"--tuning_queries {path!r} was embedded by {queries.spec.name!r} "
            f"({queries.spec.fingerprint}), the index by {spec.name!r} ({spec.fingerprint}); "
            "embed the queries with the same embedder"
        )
    # The decode size may differ (queries embedded in a run of other embedders): it moves
    # pixels a little, and tuning queries only choose knobs; they never enter the index.
    if (
        dataclasses.replace(queries.spec, decode_size=0).preprocessing_summary()
        != dataclasses.replace(spec, decode_size=0).preprocessing_summary()
    ):
        raise ConfigError(
            f"--tuning_queries {path!r} was embedded with other preprocessing than the index "
            f"({queries.spec.preprocessing_summary()} vs {spec.preprocessing_summary()}); embed "
            "the queries with the same embedder settings"
        )
    return queries.vectors


def _dataset_and_spec(source: str | list[str]) -> tuple[ds.Dataset, EmbedderSpec]:
    dataset = ds.dataset(source, format="parquet", exclude_invalid_files=False)
    if not dataset.files:
        raise ConfigError(f"no Parquet files found at {source!r}")
    spec = S.embedder_of(pq.read_schema(dataset.files[0]))
    for other in dataset.files[1:]:
        other_spec = S.embedder_of(pq.read_schema(other))
        if other_spec.fingerprint != spec.fingerprint or other_spec.dim != spec.dim:
            raise ConfigError(
                f"{other} was made by embedder {other_spec.name!r} ({other_spec.fingerprint}, "
                f"dim {other_spec.dim}) but {dataset.files[0]} by {spec.name!r} "
                f"({spec.fingerprint}, dim {spec.dim}); build one index per embedder"
            )
        if other_spec.reuse_identity() != spec.reuse_identity():
            raise ConfigError(
                f"{other} and {dataset.files[0]} hold vectors of the same weights made with "
                f"different preprocessing ({other_spec.preprocessing_summary()} vs "
                f"{spec.preprocessing_summary()}); vectors of different preprocessing must not "
                "share an index: re-embed the images with one setting (imgindex build)"
            )
    return dataset, spec


def _batches(files: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches file by file, one row group at a time: a dataset scan's read-ahead
    would hold many decoded row groups at once, several times the matrix itself."""
    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            yield from parquet.read_row_group(group, columns=columns).to_batches()


def count_rows(source: str | list[str]) -> int:
    """Rows of embedding tables, from the Parquet footers only."""
    return ds.dataset(source, format="parquet").count_rows()
