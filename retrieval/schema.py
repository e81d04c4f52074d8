"""The Parquet contracts between stages: the embedding table and the failures table.

Embedding table: one row per embedded image.
  id         string, not null   stable key (from the record, tar member key or relative path)
  sha256     string, not null   hex sha256 of the encoded image bytes as read
  source     string, not null   shard URI plus `#<record index>` or `#<tar member>`, or file URI
  width      int32, not null    original width in pixels (after EXIF orientation)
  height     int32, not null    original height in pixels (after EXIF orientation)
  embedding  fixed_size_list<float32>[dim], not null
  ...        optional passthrough metadata columns (scalars), after the fixed ones
Schema metadata: `imgindex.embedder` (EmbedderSpec as JSON), `imgindex.version`.

Failures table: one row per input record that could not be embedded.
  id, source, stage (read|decode|preprocess|embed|write), error_type, message, embedder
  (embedder is set for embed-stage failures, which concern one embedder only)
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError
from retrieval.version import __version__

EMBEDDER_KEY = b"imgindex.embedder"
VERSION_KEY = b"imgindex.version"
KIND_KEY = b"imgindex.kind"

ID, SHA256, SOURCE, WIDTH, HEIGHT, EMBEDDING = "id", "sha256", "source", "width", "height", "embedding"
FIXED_COLUMNS = (ID, SHA256, SOURCE, WIDTH, HEIGHT, EMBEDDING)
FAILURE_STAGES = ("read", "decode", "preprocess", "embed", "write")
MAX_FAILURE_MESSAGE = 2000  # characters of a failure's message kept in the table


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embedding_schema(spec: EmbedderSpec, metadata_fields: tuple[pa.Field, ...] = ()) -> pa.Schema:
    """The embedding table schema for one embedder, with optional passthrough columns."""
    if spec.dim <= 0:
        raise ConfigError(f"embedder {spec.name!r} has no dimension yet; load it first")
    clash = {f.name for f in metadata_fields} & set(FIXED_COLUMNS)
    if clash:
        raise ConfigError(
            f"metadata columns {sorted(clash)} clash with the fixed columns {list(FIXED_COLUMNS)}; "
            "rename them"
        )
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SHA256, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(EMBEDDING, embedding_type(spec.dim), nullable=False),
        *metadata_fields,
    ]
    return pa.schema(
        fields,
        metadata={
            EMBEDDER_KEY: spec.to_json().encode(),
            VERSION_KEY: __version__.encode(),
            KIND_KEY: b"embeddings",
        },
    )


FAILURES_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        # Set for embed-stage failures only: the other stages fail for every embedder.
        pa.field("embedder", pa.string()),
    ],
    metadata={VERSION_KEY: __version__.encode(), KIND_KEY: b"failures"},
)


def embedder_of(schema: pa.Schema) -> EmbedderSpec:
    """Reads and checks the embedder spec of an embedding table schema."""
    check_embedding_schema(schema)
    return EmbedderSpec.from_dict(json.loads(schema.metadata[EMBEDDER_KEY]))


def check_embedding_schema(schema: pa.Schema) -> None:
    """Raises ConfigError saying what is missing or mistyped in an embedding table schema."""
    metadata = schema.metadata or {}
    if EMBEDDER_KEY not in metadata:
        raise ConfigError(
            "not an imgindex embedding table: schema metadata has no 'imgindex.embedder' key "
            "(tables are written by `imgindex embed`)"
        )
    spec = json.loads(metadata[EMBEDDER_KEY])
    expected = {
        ID: pa.string(),
        SHA256: pa.string(),
        SOURCE: pa.string(),
        WIDTH: pa.int32(),
        HEIGHT: pa.int32(),
        EMBEDDING: embedding_type(int(spec.get("dim", 0))),
    }
    for name, typ in expected.items():
        index = schema.get_field_index(name)
        if index < 0:
            raise ConfigError(f"embedding table has no {name!r} column; columns: {schema.names}")
        if not schema.field(index).type.equals(typ):
            raise ConfigError(
                f"embedding table column {name!r} has type {schema.field(index).type}, expected {typ}"
            )


METADATA_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}


def metadata_field(name: str, type_name: str) -> pa.Field:
    """A nullable passthrough column of one of METADATA_TYPES."""
    if type_name not in METADATA_TYPES:
        raise ConfigError(f"metadata type {type_name!r} is not one of {list(METADATA_TYPES)}")
    return pa.field(name, METADATA_TYPES[type_name])


@dataclasses.dataclass(frozen=True)
class Failure:
    """One row of the failures table: an input record that could not be embedded, and why.

    Make one with `Failure.of`, which applies the table's rules; `to_row()` is the row.
    """

    id: str | None
    source: str
    stage: str  # one of FAILURE_STAGES
    error_type: str  # the exception's class name, or "Invalid" for a reason string
    message: str  # at most MAX_FAILURE_MESSAGE characters
    embedder: str | None = None  # set for embed-stage failures only

    def __post_init__(self) -> None:
        if self.stage not in FAILURE_STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {FAILURE_STAGES}")

    @classmethod
    def of(
        cls,
        source: str,
        stage: str,
        error: BaseException | str,
        *,
        id: str | None = None,
        embedder: str | None = None,
    ) -> Failure:
        """The failure of `source` at `stage`; `error` is the exception caught (or a reason string)."""
        if isinstance(error, BaseException):
            error_type, message = type(error).__name__, str(error) or repr(error)
        else:
            error_type, message = "Invalid", error
        return cls(id, source, stage, error_type, message[:MAX_FAILURE_MESSAGE], embedder)

    def to_row(self) -> dict[str, str | None]:
        """The failures-table row (a dict of FAILURES_SCHEMA's columns)."""
        return {
            ID: self.id,
            SOURCE: self.source,
            "stage": self.stage,
            "error_type": self.error_type,
            "message": self.message,
            "embedder": self.embedder,
        }
