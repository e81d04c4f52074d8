"""The published-run contract shared by `imgindex build` (writer) and `serving` (reader).

Layout under an output root (a local path, or an object store such as s3:// or gs:// whose
files are written with `retrieval.storage`):

    <root>/LATEST                          one line: the run directory relative to root,
                                           e.g. "runs/20261122T120000Z-1a2b3c"; written last,
                                           atomically (temporary file + rename; on an
                                           object store one single-object put)
    <root>/runs/<run_id>/
        embeddings/<embedder>/part-*.parquet   embedding tables (retrieval.schema)
        failures/part-*.parquet                failures table
        run_report.json                        the embedding pipeline's report
        index/<embedder>/                      an index directory (retrieval.index):
            scann/ ids.parquet metadata.parquet manifest.json
        run_manifest.json                      written last in the run (this module)

A run's status, as its run_manifest.json records it:

    (no manifest)  the build is still running, or was killed before the end
    rejected       a gate refused it; LATEST was left alone
    failed         something raised, or the build was interrupted; LATEST was left alone
    publishing     the gates passed, the run's files were made read-only, and LATEST is
                   being pointed at it (`run_status.publish`): written before LATEST
    published      LATEST was pointed at it (it may have moved on since): written after
                   LATEST

The publish, and the true status of a run whose publish was interrupted (a recorded
"publishing" that LATEST decides), are `retrieval.run_status`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import secrets
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from retrieval import storage
from retrieval.atomic_files import json_text, sha256_file, write_json_atomic
from retrieval.errors import IndexFormatError
from retrieval.manifest import MANIFEST_NAME, ManifestMessages, ManifestSchema, utc_now
from retrieval.searchable import SearchableIndex
from retrieval.version import __version__

if TYPE_CHECKING:
    from retrieval.index import Index
    from retrieval.sharded import ShardedIndex

LATEST = "LATEST"
RUNS_DIR = "runs"
RUN_MANIFEST = "run_manifest.json"
RUN_KIND = "imgindex.run"
RUN_FORMAT_VERSION = 1
PUBLISHED = "published"
PUBLISHING = "publishing"
FAILED = "failed"
STATUSES = (PUBLISHED, PUBLISHING, "rejected", FAILED)
INDEX_DIR = "index"
EMBEDDINGS_DIR = "embeddings"
FAILURES_DIR = "failures"


def new_run_id(now: datetime.datetime | None = None) -> str:
    """Sortable and unique: UTC timestamp plus a random suffix."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def run_dir(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/{RUNS_DIR}/{run_id}"


def index_dir(run_directory: str, embedder: str) -> str:
    return f"{run_directory.rstrip('/')}/{INDEX_DIR}/{embedder}"


@dataclasses.dataclass(frozen=True)
class EmbedderEntry:
    """The run manifest's record of one embedder's saved index (`embedder_entry` makes it).

    spec: the EmbedderSpec dict (None when the vectors came from elsewhere).
    table, index: the embedding table's and the index's directories, relative to the run.
    index_manifest_sha256: SHA-256 of the index's manifest.json, tying the run to that index.
    n, d, distance, method, search_defaults, recall, build_seconds: as the index records them.
    shards: the number of shards of a sharded index; pca_dim: the dimension of a build-time
      projection.  These two are written only when set or given by the build (`explicit`):
      a plain build records "pca_dim": null, a sharded one "shards" and no "pca_dim".
    dba: the index manifest's record of its database-side augmentation (`retrieval.dba`),
      written only when the build used it.
    """

    spec: dict[str, Any] | None
    table: str | None
    index: str
    index_manifest_sha256: str
    n: int
    d: int
    distance: str
    method: str
    search_defaults: dict[str, Any]
    recall: dict[str, Any]
    build_seconds: float
    shards: int | None = None
    pca_dim: int | None = None
    dba: dict[str, Any] | None = None
    # The optional fields written by `to_dict`: those the build gave (even as None), and
    # any that is not None.
    explicit: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        given = {name for name in _ENTRY_OPTIONAL if getattr(self, name) is not None}
        object.__setattr__(self, "explicit", frozenset(self.explicit | given))

    def to_dict(self) -> dict[str, Any]:
        """The entry as the run manifest's JSON holds it (the same keys as ever)."""
        out = {name: getattr(self, name) for name in _ENTRY_REQUIRED}
        out.update({name: getattr(self, name) for name in _ENTRY_OPTIONAL if name in self.explicit})
        return out

    @classmethod
    def from_dict(cls, data: Any, name: str, source: str = "the run manifest") -> EmbedderEntry:
        """Check and build the entry of embedder `name`; IndexFormatError says what is wrong."""
        fields = ENTRY_SCHEMA.check(data, f"{source}: embedder {name!r}")
        if not fields["index_manifest_sha256"]:
            raise IndexFormatError(
                ENTRY_SCHEMA.messages.missing.format(
                    source=f"{source}: embedder {name!r}", fields="index_manifest_sha256"
                )
            )
        return cls(**fields, explicit=frozenset(key for key in _ENTRY_OPTIONAL if key in fields))


_ENTRY_OPTIONAL = ("shards", "pca_dim", "dba")
_ENTRY_REQUIRED = tuple(
    f.name
    for f in dataclasses.fields(EmbedderEntry)
    if f.name not in _ENTRY_OPTIONAL and f.name != "explicit"
)
ENTRY_SCHEMA = ManifestSchema(
    kind=None,
    format_version=None,
    fields=_ENTRY_REQUIRED + _ENTRY_OPTIONAL,
    required=_ENTRY_REQUIRED,
    types={
        "spec": (dict, type(None)),
        "table": (str, type(None)),
        "index": str,
        "index_manifest_sha256": str,
        "n": int,
        "d": int,
        "distance": str,
        "method": str,
        "search_defaults": dict,
        "recall": dict,
        "build_seconds": (int, float),
        "shards": (int, type(None)),
        "pca_dim": (int, type(None)),
        "dba": (dict, type(None)),
    },
    messages=ManifestMessages(
        not_object="{source} entry is not an object",
        missing="{source} has no {fields}; the run manifest is incomplete",
        wrong_type="{source}: {fields} has the wrong type; the run manifest is damaged, rebuild the run",
    ),
)


@dataclasses.dataclass
class RunManifest:
    """What a run holds and how it went.

    embedders: name -> EmbedderEntry.
    gates: {"min_recall", "max_failure_rate", "failure_rate", "passed", "reasons": [...]}.
    """

    run_id: str
    status: str
    inputs: dict
    counts: dict
    embedders: dict[str, EmbedderEntry]
    gates: dict
    timings: dict
    created_at: str = dataclasses.field(default_factory=utc_now)
    producer_version: str = __version__
    versions: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    # What the retention deleted after the publish (retrieval.retention.RetentionReport).
    retention: dict | None = None
    # While the status is "publishing": who publishes, {"host", "pid", "since"}
    # (`run_status.publisher_record`), so that readers tell a publish in progress from a
    # killed one.
    publisher: dict | None = None
    kind: str = RUN_KIND
    format_version: int = RUN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["embedders"] = {name: entry.to_dict() for name, entry in self.embedders.items()}
        for optional in ("retention", "publisher"):
            if out[optional] is None:
                del out[optional]  # runs written before these existed read back byte for byte
        return copy.deepcopy(out)  # like dataclasses.asdict: nothing shared with the manifest

    @classmethod
    def from_dict(cls, data: Any, source: str = "the run manifest") -> RunManifest:
        """Build from parsed JSON (`source`: where it came from, for error messages), checking
        kind, format version, required fields, their types and every embedder entry."""
        fields = RUN_SCHEMA.check(data, source)
        fields["embedders"] = {
            name: EmbedderEntry.from_dict(entry, name, source) for name, entry in fields["embedders"].items()
        }
        return cls(**fields)


RUN_SCHEMA = ManifestSchema.of(
    RunManifest,
    kind=RUN_KIND,
    format_version=RUN_FORMAT_VERSION,
    types={
        "run_id": str,
        "status": str,
        "inputs": dict,
        "counts": dict,
        "embedders": dict,
        "gates": dict,
        "timings": dict,
        "publisher": (dict, type(None)),
    },
    messages=ManifestMessages(
        not_object="not an imgindex run manifest (a JSON {got}, not an object)",
        wrong_kind="not an imgindex run manifest (kind {kind!r})",
        unsupported_version="run manifest format version {version!r} is not supported by imgindex "
        "{imgindex} (reads version {supported}); upgrade imgindex",
        missing="the run manifest lacks {fields}; the run is incomplete or was not written by imgindex; "
        "rebuild it",
        wrong_type="the run manifest is damaged: {fields} has the wrong type; rebuild the run",
    ),
)


def write_run_manifest(directory: str, manifest: RunManifest) -> None:
    """Writes run_manifest.json atomically; read-only when the status is publishing or
    published (a published run's files are read-only).  On an object store: one
    single-object put (atomic there; objects have no modes)."""
    if storage.is_remote(directory):
        storage.put_bytes(storage.join(directory, RUN_MANIFEST), json_text(manifest.to_dict()).encode())
        return
    write_json_atomic(
        Path(directory) / RUN_MANIFEST,
        manifest.to_dict(),
        read_only=manifest.status in (PUBLISHED, PUBLISHING),
    )


def read_run_manifest(directory: str) -> RunManifest:
    if storage.is_remote(directory):
        remote = storage.join(directory, RUN_MANIFEST)
        try:
            data = json.loads(storage.read_bytes(remote))
        except FileNotFoundError as exc:
            raise IndexFormatError(f"{directory} is not a finished imgindex run (no {RUN_MANIFEST})") from exc
        except ValueError as exc:
            raise IndexFormatError(f"{remote} is unreadable: {exc}") from exc
        return RunManifest.from_dict(data, remote)
    path = Path(directory) / RUN_MANIFEST
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{directory} is not a finished imgindex run (no {RUN_MANIFEST})") from exc
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is unreadable: {exc}") from exc
    return RunManifest.from_dict(data, str(path))


def read_latest(root: str) -> str | None:
    """The run directory LATEST names (absolute, or a URI under a remote root), or None when
    nothing is published yet."""
    remote = storage.is_remote(root)
    path = storage.join(root, LATEST) if remote else Path(root) / LATEST
    try:
        name = (storage.read_bytes(str(path)).decode() if remote else Path(path).read_text()).strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{path} is not text (it should hold runs/<run_id>): {exc}") from exc
    if not name or os.path.isabs(name) or ".." in PurePosixPath(name).parts or "://" in name:
        raise IndexFormatError(f"{path} holds {name!r}, not a run directory relative to {root}")
    return storage.join(root, name) if remote else str(Path(root) / name)


def resolve_run(path: str) -> str:
    """An output root (follows LATEST) or a run directory -> the run directory."""
    if storage.is_remote(path):
        if storage.exists(storage.join(path, RUN_MANIFEST)):
            return path.rstrip("/")
    elif (Path(path) / RUN_MANIFEST).is_file():
        return str(path)
    latest = read_latest(path)
    if latest is None:
        raise IndexFormatError(
            f"{path} is neither a run directory (no {RUN_MANIFEST}) nor an output root with a "
            f"published run (no {LATEST}); run `imgindex build` first"
        )
    return latest


def embedder_entry(
    run_directory: str,
    name: str,
    index: Index | ShardedIndex,
    spec: dict[str, Any] | None,
    manifest_sha256: str | None = None,
    **extra: int | None,
) -> EmbedderEntry:
    """The run manifest's record of one embedder's saved index (`index`: a saved
    retrieval.index.Index or ShardedIndex), tying the run to that index's manifest by its
    sha256 (`manifest_sha256`: as uploaded to a remote run; default: read from the index
    directory under the local `run_directory`).  extra: `shards` and `pca_dim`, recorded as
    given (None included); `dba` comes from the index manifest."""
    m = index.manifest
    if manifest_sha256 is None:
        manifest_sha256 = sha256_file(os.path.join(index_dir(run_directory, name), MANIFEST_NAME))
    return EmbedderEntry(
        spec=spec,
        table=f"{EMBEDDINGS_DIR}/{name}",
        index=f"{INDEX_DIR}/{name}",
        index_manifest_sha256=manifest_sha256,
        n=m.n,
        d=m.d,
        distance=m.distance,
        method=index.method,
        search_defaults=m.search_defaults,
        recall=m.recall,
        build_seconds=m.build_seconds,
        dba=getattr(m, "dba", None),  # sharded indexes have none
        **extra,
        explicit=frozenset(extra),
    )


def open_index(run_directory: str, name: str, entry: EmbedderEntry, verify: bool = True) -> SearchableIndex:
    """The index of embedder `name` that a run published, loaded (either layout, see
    `retrieval.sharded.open_index`; verify: check every file's SHA-256).

    `entry` is the run manifest's record of that embedder.  Refused with IndexFormatError:
    an index path outside the run, an index whose manifest.json is not the one the run
    recorded (`index_manifest_sha256`), or an index whose n or d differ from the run
    manifest's.
    """
    from retrieval.sharded import open_index as open_any

    index_path = _inside(run_directory, entry.index, f"embedders.{name}.index")
    try:
        actual = sha256_file(index_path / MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise IndexFormatError(
            f"index of embedder {name!r} ({index_path}) has no {MANIFEST_NAME}; the run directory is incomplete"
        ) from exc
    if actual != entry.index_manifest_sha256:
        raise IndexFormatError(
            f"index of embedder {name!r} ({index_path}): {MANIFEST_NAME} does not match the "
            "run manifest's index_manifest_sha256 (the index was replaced or modified after "
            "the run was published); rebuild the run"
        )
    index = open_any(index_path, verify=verify)
    for key, recorded, value in (("n", entry.n, index.n), ("d", entry.d, index.d)):
        if recorded != value:
            raise IndexFormatError(
                f"index of embedder {name!r}: the run manifest says "
                f"{key}={recorded} but the index holds {key}={value}"
            )
    return index


def _inside(run_directory: str, rel: str, what: str) -> Path:
    pure = PurePosixPath(rel) if isinstance(rel, str) and rel else None
    if pure is None or pure.is_absolute() or ".." in pure.parts:
        raise IndexFormatError(
            f"{run_directory}/{RUN_MANIFEST}: {what} is {rel!r}, not a path relative to the run directory"
        )
    return Path(run_directory, *pure.parts)
