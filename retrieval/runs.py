"""The published-run contract shared by `imgindex build` (writer) and `serving` (reader).

Layout under an output root (local path or any Beam filesystem URI for the writer; the
serving side reads local paths):

    <root>/LATEST                          one line: the run directory relative to root,
                                           e.g. "runs/20261122T120000Z-1a2b3c"; written last,
                                           atomically (temporary file + rename)
    <root>/runs/<run_id>/
        embeddings/<embedder>/part-*.parquet   embedding tables (retrieval.schema)
        failures/part-*.parquet                failures table
        run_report.json                        the embedding pipeline's report
        index/<embedder>/                      an index directory (retrieval.index):
            scann/ ids.parquet metadata.parquet manifest.json
        run_manifest.json                      written last in the run (this module)

A run is *published* when LATEST names it; only a run whose manifest has status
"published" may be named there.  A run that failed or was refused by a gate keeps its
directory (for inspection) with status "failed" or "rejected" and LATEST is left alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import secrets
from pathlib import Path, PurePosixPath
from typing import Any

from retrieval.errors import IndexFormatError
from retrieval.index import METADATA_FILE  # noqa: F401  (pipelines name the run's metadata table by it)
from retrieval.manifest import MANIFEST_NAME, sha256_file, utc_now, write_json_atomic, write_text_atomic
from retrieval.version import __version__

LATEST = "LATEST"
RUNS_DIR = "runs"
RUN_MANIFEST = "run_manifest.json"
RUN_KIND = "imgindex.run"
RUN_FORMAT_VERSION = 1
STATUSES = ("published", "rejected", "failed")
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


@dataclasses.dataclass
class RunManifest:
    """What a run holds and how it went.

    embedders: name -> {"spec": EmbedderSpec dict, "table": relative dir, "index": relative
      dir, "index_manifest_sha256": hex, "n", "d", "method", "recall": {...},
      "build_seconds", "search_defaults"}.
    gates: {"min_recall", "max_failure_rate", "failure_rate", "passed", "reasons": [...]}.
    """

    run_id: str
    status: str
    inputs: dict
    counts: dict
    embedders: dict
    gates: dict
    timings: dict
    created_at: str = dataclasses.field(default_factory=utc_now)
    producer_version: str = __version__
    versions: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    kind: str = RUN_KIND
    format_version: int = RUN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunManifest:
        if not isinstance(data, dict):
            raise IndexFormatError(
                f"not an imgindex run manifest (a JSON {type(data).__name__}, not an object)"
            )
        if data.get("kind") != RUN_KIND:
            raise IndexFormatError(f"not an imgindex run manifest (kind {data.get('kind')!r})")
        if data.get("format_version") != RUN_FORMAT_VERSION:
            raise IndexFormatError(
                f"run manifest format version {data.get('format_version')!r} is not supported by "
                f"imgindex {__version__} (reads version {RUN_FORMAT_VERSION}); upgrade imgindex"
            )
        fields = dataclasses.fields(cls)
        missing = [
            f.name
            for f in fields
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in data
        ]
        if missing:
            raise IndexFormatError(
                f"the run manifest lacks {', '.join(missing)}; the run is incomplete "
                "or was not written by imgindex; rebuild it"
            )
        wrong = [name for name in _OBJECT_FIELDS if not isinstance(data[name], dict)]
        if wrong or not isinstance(data["run_id"], str) or not isinstance(data["status"], str):
            raise IndexFormatError(
                f"the run manifest is damaged: {', '.join(wrong) or 'run_id or status'} "
                "has the wrong type; rebuild the run"
            )
        known = {f.name for f in fields}
        return cls(**{k: v for k, v in data.items() if k in known})


_OBJECT_FIELDS = ("inputs", "counts", "embedders", "gates", "timings")


def write_run_manifest(directory: str, manifest: RunManifest) -> None:
    write_json_atomic(Path(directory) / RUN_MANIFEST, manifest.to_dict())


def read_run_manifest(directory: str) -> RunManifest:
    path = Path(directory) / RUN_MANIFEST
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{directory} is not a finished imgindex run (no {RUN_MANIFEST})") from exc
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is unreadable: {exc}") from exc
    return RunManifest.from_dict(data)


def read_latest(root: str) -> str | None:
    """The run directory LATEST names (absolute), or None when nothing is published yet."""
    path = Path(root) / LATEST
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise IndexFormatError(f"{path} holds {name!r}, not a run directory relative to {root}")
    return str(Path(root) / name)


def publish(root: str, run_id: str) -> None:
    """Points LATEST at a run whose manifest says published: temporary file, then rename."""
    directory = run_dir(root, run_id)
    if read_run_manifest(directory).status != "published":
        raise IndexFormatError(f"run {run_id} is not publishable (its manifest status is not 'published')")
    write_text_atomic(Path(root) / LATEST, f"{RUNS_DIR}/{run_id}\n")


def resolve_run(path: str) -> str:
    """An output root (follows LATEST) or a run directory -> the run directory."""
    if (Path(path) / RUN_MANIFEST).is_file():
        return str(path)
    latest = read_latest(path)
    if latest is None:
        raise IndexFormatError(
            f"{path} is neither a run directory (no {RUN_MANIFEST}) nor an output root with a "
            f"published run (no {LATEST}); run `imgindex build` first"
        )
    return latest


def embedder_entry(run_directory: str, name: str, index, spec: dict, **extra) -> dict:
    """The run manifest's record of one embedder's saved index (`index`: a saved
    retrieval.index.Index), tying the run to that index's manifest by its sha256."""
    m = index.manifest
    return {
        "spec": spec,
        "table": f"{EMBEDDINGS_DIR}/{name}",
        "index": f"{INDEX_DIR}/{name}",
        "index_manifest_sha256": sha256_file(os.path.join(index_dir(run_directory, name), MANIFEST_NAME)),
        "n": m.n,
        "d": m.d,
        "distance": m.distance,
        "method": index.method,
        "search_defaults": m.search_defaults,
        "recall": m.recall,
        "build_seconds": m.build_seconds,
        **extra,
    }


def open_index(run_directory: str, name: str, entry: Any, verify: bool = True):
    """The index of embedder `name` that a run published, loaded (either layout, see
    `retrieval.sharded.open_index`; verify: check every file's SHA-256).

    `entry` is the run manifest's record of that embedder.  Refused with IndexFormatError:
    an index path outside the run, an index whose manifest.json is not the one the run
    recorded (`index_manifest_sha256`), or an index whose n, d or embedder fingerprint
    differ from the run manifest's.
    """
    from retrieval.sharded import open_index as open_any

    if not isinstance(entry, dict):
        raise IndexFormatError(f"{run_directory}/{RUN_MANIFEST}: embedder {name!r} entry is not an object")
    index_path = _inside(run_directory, entry.get("index"), f"embedders.{name}.index")
    expected = entry.get("index_manifest_sha256")
    if not isinstance(expected, str) or not expected:
        raise IndexFormatError(
            f"{run_directory}/{RUN_MANIFEST}: embedder {name!r} has no "
            "index_manifest_sha256; the run manifest is incomplete"
        )
    try:
        actual = sha256_file(index_path / MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise IndexFormatError(
            f"index of embedder {name!r} ({index_path}) has no {MANIFEST_NAME}; the run directory is incomplete"
        ) from exc
    if actual != expected:
        raise IndexFormatError(
            f"index of embedder {name!r} ({index_path}): {MANIFEST_NAME} does not match the "
            "run manifest's index_manifest_sha256 (the index was replaced or modified after "
            "the run was published); rebuild the run"
        )
    index = open_any(index_path, verify=verify)
    for key, value in (("n", index.n), ("d", index.d)):
        if key in entry and entry[key] != value:
            raise IndexFormatError(
                f"index of embedder {name!r}: the run manifest says "
                f"{key}={entry[key]} but the index holds {key}={value}"
            )
    return index


def _inside(run_directory: str, rel: Any, what: str) -> Path:
    pure = PurePosixPath(rel) if isinstance(rel, str) and rel else None
    if pure is None or pure.is_absolute() or ".." in pure.parts:
        raise IndexFormatError(
            f"{run_directory}/{RUN_MANIFEST}: {what} is {rel!r}, not a path relative to the run directory"
        )
    return Path(run_directory, *pure.parts)
