"""The versioned JSON manifest of an index directory, and file checksum helpers.

An index directory is complete and intact exactly when `manifest.json` exists
and every file it lists has the recorded size and SHA-256.  The manifest is
written last (atomically), so a directory without one is an interrupted or
foreign directory, never a half-valid index.

The checksum helpers (`file_entry`, `describe_files`, `verify_files`) know
nothing about indexes and are meant to be reused by other manifests (e.g. a run
manifest), as is `ManifestSchema`:
the checks every manifest kind makes when read (index, sharded index, run, and
the run manifest's embedder entries), each kind wording its own errors.

Compatibility: `format_version` is bumped when a reader of the previous version
would misread a directory.  Adding an optional field does not bump it; readers
ignore fields they do not know.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from retrieval.atomic_files import sha256_file, write_json_atomic
from retrieval.errors import IndexFormatError
from retrieval.version import __version__

FORMAT_VERSION = 1
KIND = "imgindex.index"
MANIFEST_NAME = "manifest.json"


def utc_now(after_seconds: float = 0.0) -> str:
    """The time in UTC (plus `after_seconds`) as ISO 8601 to the second, e.g.
    "2026-11-22T12:00:00+00:00": every manifest's `created_at`, serving's status times."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if after_seconds:
        now += datetime.timedelta(seconds=after_seconds)
    return now.isoformat(timespec="seconds")


@dataclasses.dataclass
class IndexManifest:
    """Everything needed to load, trust and reproduce an index directory.

    Fields:
      distance: "cosine", "dot_product" or "squared_l2" (the user-facing distance).
      n, d: number of vectors and their dimension.
      scann_config: the ScaNN config text proto the searcher was built with.
      index_config: the imgindex IndexConfig fields (method, num_leaves, ...).
      search_defaults: search-time knobs used when a query does not override them
        (k, and for tree-AH leaves_to_search and pre_reorder_num_neighbors).
      recall: {"k", "value", "n_queries", "method", ...} measured at build time.
      build_seconds: wall time of the build, including recall measurement.
      embedder: the embedder spec (opaque here), or None when vectors came from elsewhere.
      files: {relative POSIX path: {"sha256": hex, "bytes": int}} for every file
        of the directory except the manifest itself.
      training, dba: optional records (tree-AH training reuse; database-side augmentation),
        absent when None.
    """

    distance: str
    n: int
    d: int
    scann_config: str
    index_config: dict
    search_defaults: dict
    recall: dict
    build_seconds: float
    embedder: dict | None = None
    files: dict = dataclasses.field(default_factory=dict)
    created_at: str = dataclasses.field(default_factory=utc_now)
    producer_version: str = __version__
    # How the tree-AH training came about (retrieval.index.training.TrainingRecord), or None.
    training: dict | None = None
    # Database-side augmentation (retrieval.dba): n, alpha, how the neighbours were found; or None.
    dba: dict | None = None
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for optional in ("training", "dba"):
            if out[optional] is None:
                del out[optional]  # indexes without it read back byte for byte
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest") -> IndexManifest:
        """Build from parsed JSON, checking kind, format version, required fields and types."""
        return cls(**INDEX_SCHEMA.check(data, source))


@dataclasses.dataclass(frozen=True)
class ManifestMessages:
    """How one kind of manifest words its errors: format strings that may use {source} (where
    the manifest came from), {got} (a JSON value's type), {kind} and {expected} (the kind
    found and the one expected), {version} and {supported} (format versions), {imgindex}
    (this version of imgindex) and {fields} (the fields at fault, comma-separated)."""

    not_object: str
    missing: str
    wrong_type: str
    wrong_kind: str = ""  # needed when the schema names a kind
    unsupported_version: str = ""  # needed when the schema names a format version


@dataclasses.dataclass(frozen=True)
class ManifestSchema:
    """The checks made when any manifest (or a record inside one) is read, in this order: a
    JSON object, its `kind` and a supported `format_version` (when the schema names them),
    the required fields present, and the fields' types (a bool is never an int).

    fields: every field the manifest's dataclass knows; `check` keeps only these (readers
      ignore fields they do not know).
    required: the fields that must be present, in the order the error lists them.
    types: field -> type or tuple of types, checked when the field is present.
    """

    kind: str | None
    format_version: int | None
    fields: tuple[str, ...]
    required: tuple[str, ...]
    types: Mapping[str, type | tuple[type, ...]]
    messages: ManifestMessages

    @classmethod
    def of(
        cls,
        dataclass: type,
        kind: str | None,
        format_version: int | None,
        types: Mapping[str, type | tuple[type, ...]],
        messages: ManifestMessages,
        sort_missing: bool = False,
    ) -> ManifestSchema:
        """The schema of a manifest dataclass: its fields, those without a default required."""
        fields = dataclasses.fields(dataclass)
        required = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return cls(
            kind=kind,
            format_version=format_version,
            fields=tuple(f.name for f in fields),
            required=tuple(sorted(required) if sort_missing else required),
            types=types,
            messages=messages,
        )

    def check(self, data: Any, source: str = "") -> dict[str, Any]:
        """The known fields of `data`, once every check passes; IndexFormatError otherwise."""
        words = self.messages
        if not isinstance(data, dict):
            raise IndexFormatError(words.not_object.format(source=source, got=type(data).__name__))
        if self.kind is not None and data.get("kind") != self.kind:
            raise IndexFormatError(
                words.wrong_kind.format(source=source, kind=data.get("kind"), expected=self.kind)
            )
        version = data.get("format_version")
        if self.format_version is not None and version != self.format_version:
            raise IndexFormatError(
                words.unsupported_version.format(
                    source=source, version=version, supported=self.format_version, imgindex=__version__
                )
            )
        missing = [name for name in self.required if name not in data]
        if missing:
            raise IndexFormatError(words.missing.format(source=source, fields=", ".join(missing)))
        wrong = [
            name
            for name, expected in self.types.items()
            if name in data and (not isinstance(data[name], expected) or isinstance(data[name], bool))
        ]
        if wrong:
            raise IndexFormatError(words.wrong_type.format(source=source, fields=", ".join(wrong)))
        return {key: value for key, value in data.items() if key in self.fields}


# The types checked are those of the fields readers index into; a wrong type would otherwise
# surface as an unexplained TypeError deep inside loading.
INDEX_SCHEMA = ManifestSchema.of(
    IndexManifest,
    kind=KIND,
    format_version=FORMAT_VERSION,
    types={
        "distance": str,
        "n": int,
        "d": int,
        "scann_config": str,
        "index_config": dict,
        "search_defaults": dict,
        "recall": dict,
        "files": dict,
        "training": (dict, type(None)),
        "dba": (dict, type(None)),
    },
    messages=ManifestMessages(
        not_object="{source}: expected a JSON object, got {got}.",
        wrong_kind="{source}: kind is {kind!r}, expected {expected!r}; this is not an imgindex index manifest.",
        unsupported_version="{source}: unsupported format_version {version!r}; this imgindex "
        "({imgindex}) reads format_version {supported}. Use the imgindex version that wrote the "
        "index, or rebuild the index.",
        missing="{source}: missing field(s) {fields}; the manifest is incomplete or hand-edited. "
        "Rebuild the index.",
        wrong_type="{source}: field(s) {fields} have the wrong type; the manifest is damaged or "
        "hand-edited. Rebuild the index.",
    ),
    sort_missing=True,
)


def write_manifest(directory: str | os.PathLike[str], manifest: IndexManifest) -> None:
    """Write `manifest` to `directory`/manifest.json atomically."""
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.to_dict())


def read_manifest(directory: str | os.PathLike[str]) -> IndexManifest:
    """Read and validate `directory`/manifest.json; IndexFormatError explains any problem."""
    directory = Path(directory)
    if not directory.exists():
        raise IndexFormatError(f"Index directory {directory} does not exist.")
    if not directory.is_dir():
        raise IndexFormatError(f"{directory} is a file, not an index directory.")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise IndexFormatError(
            f"{directory} is not an imgindex index directory: it has no {MANIFEST_NAME} "
            "(an interrupted build, or a different directory). Rebuild the index."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(
            f"{path} is unreadable ({e}); the index is corrupted. Rebuild the index."
        ) from e
    return IndexManifest.from_dict(data, source=str(path))


def file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest record of one file: {"sha256": hex, "bytes": size}."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def describe_files(
    directory: str | os.PathLike[str], exclude: Collection[str] = (MANIFEST_NAME,)
) -> dict[str, dict[str, Any]]:
    """{relative POSIX path: file_entry} for every regular file under `directory`."""
    directory = Path(directory)
    entries = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in exclude:
            entries[rel] = file_entry(path)
    return entries


def verify_files(directory: str | os.PathLike[str], manifest: Any, check_hashes: bool = True) -> None:
    """Check every file listed in `manifest.files` (any object with a `files` mapping).

    Sizes are always checked (cheap, catches truncation); SHA-256 only when
    `check_hashes`.  Raises IndexFormatError naming the first bad file.
    """
    directory = Path(directory)
    for rel, expected in sorted(manifest.files.items()):
        path = directory / _safe_relative(rel, directory)
        if not path.is_file():
            raise IndexFormatError(
                f"{directory}: file {rel} listed in the manifest is missing. "
                "The directory is incomplete; rebuild the index."
            )
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
            raise IndexFormatError(
                f"{directory}: the manifest entry for {rel} lacks 'bytes'/'sha256'; the "
                "manifest is damaged. Rebuild the index."
            )
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise IndexFormatError(
                f"{directory}: file {rel} has {size} bytes, the manifest says "
                f"{expected['bytes']} (truncated or modified). Rebuild the index."
            )
        if check_hashes and sha256_file(path) != expected["sha256"]:
            raise IndexFormatError(
                f"{directory}: file {rel} is corrupted (SHA-256 does not match the "
                "manifest). Rebuild the index."
            )


def _safe_relative(rel: str, directory: Path) -> Path:
    """Reject manifest paths that would point outside the directory."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise IndexFormatError(
            f"{directory}: manifest lists an invalid file path {rel!r} "
            "(must be relative, inside the directory)."
        )
    return Path(*pure.parts)
