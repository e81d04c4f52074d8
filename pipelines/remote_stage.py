"""`imgindex build` on an object-store run root (s3://, gs://): moving files between the store
and the local scratch directory where an index is built.

Beam writes the embedding tables, the failures and (pipelines.report) the run report straight
to the store.  An index, or one shard of a sharded index, is built in a local scratch
directory on the machine that builds it, then uploaded file by file (`upload_index`): each
upload's SHA-256 is checked against the one the index's manifest records, manifest.json goes
last, and the sizes on the store are checked against the manifest once all are up.  The run
manifest and LATEST are written after that (retrieval.runs, retrieval.run_status).
"""

from __future__ import annotations

import json
import os
import posixpath

from retrieval import schema as S
from retrieval import sharded, storage
from retrieval.atomic_files import sha256_file
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.manifest import MANIFEST_NAME


def parquet_files(prefix: str) -> list[str]:
    """The .parquet objects directly under `prefix` (one table directory), sorted."""
    return [
        o.path
        for o in storage.list_prefix(prefix)
        if o.path.endswith(".parquet") and "/" not in o.path[len(prefix.rstrip("/")) + 1 :]
    ]


def table_spec(prefix: str) -> EmbedderSpec:
    """The embedder that made the table under `prefix`, from its first file's footer (read
    through Beam's FileSystems: pyarrow's own S3 client knows nothing of the store's flags)."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    files = parquet_files(prefix)
    if not files:
        raise ConfigError(f"no embedding tables under {prefix}")
    with FileSystems.open(files[0]) as handle:
        return S.embedder_of(pq.ParquetFile(handle).schema_arrow)


def download_table(remote_dir: str, local_dir: str) -> list[str]:
    """Copy one embedding table directory's Parquet files to `local_dir`; their local paths."""
    files = parquet_files(remote_dir)
    if not files:
        raise ConfigError(f"no embedding tables under {remote_dir}")
    os.makedirs(local_dir, exist_ok=True)
    out = []
    for path in files:
        local = os.path.join(local_dir, posixpath.basename(path))
        storage.download(path, local)
        out.append(local)
    return out


def localize(path: str, scratch: str, name: str) -> str:
    """A remote --tuning_queries value (a .npy object, or a directory of Parquet tables)
    copied under `scratch`; a local path as it is."""
    if not storage.is_remote(path):
        return path
    if path.endswith(".npy"):
        local = os.path.join(scratch, f"tuning-{name}.npy")
        storage.download(path, local)
        return local
    return os.path.dirname(download_table(path.rstrip("/"), os.path.join(scratch, f"tuning-{name}"))[0])


def expected_hashes(local_dir: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file of a saved index directory (either layout) as
    its manifests record them; the top manifest.json is not among them (the run manifest
    records its hash)."""
    with open(os.path.join(local_dir, MANIFEST_NAME), encoding="utf-8") as f:
        top = json.load(f)
    if top.get("kind") != sharded.KIND:
        return {rel: entry["sha256"] for rel, entry in top["files"].items()}
    out = {}
    for shard in top["shards"]:
        out[f"{shard['dir']}/{MANIFEST_NAME}"] = shard["manifest_sha256"]
        with open(os.path.join(local_dir, shard["dir"], MANIFEST_NAME), encoding="utf-8") as f:
            files = json.load(f)["files"]
        out.update({f"{shard['dir']}/{rel}": entry["sha256"] for rel, entry in files.items()})
    return out


def upload_index(local_dir: str, remote_dir: str, skip: tuple[str, ...] = ()) -> str:
    """Upload a saved index directory file by file, manifest.json last; returns that
    manifest's SHA-256.  IndexFormatError when a file is not the one its manifest records
    (by SHA-256 as uploaded, then by size on the store) or is not in the manifest at all.
    skip: subdirectories already uploaded (a sharded build's shards, by their workers)."""
    expected = expected_hashes(local_dir)
    local_files = []
    for dirpath, _dirs, names in os.walk(local_dir):
        local_files += [os.path.join(dirpath, n) for n in names]
    uploaded: dict[str, int] = {}
    for local in sorted(local_files):
        rel = os.path.relpath(local, local_dir).replace(os.sep, "/")
        if rel == MANIFEST_NAME or rel.split("/", 1)[0] in skip:
            continue
        if rel not in expected:
            raise IndexFormatError(f"{local_dir}: {rel} is not listed in the index manifest")
        _upload_checked(local, storage.join(remote_dir, rel), expected[rel])
        uploaded[rel] = os.path.getsize(local)
    manifest_sha = sha256_file(os.path.join(local_dir, MANIFEST_NAME))
    local_manifest = os.path.join(local_dir, MANIFEST_NAME)
    _upload_checked(local_manifest, storage.join(remote_dir, MANIFEST_NAME), manifest_sha)
    uploaded[MANIFEST_NAME] = os.path.getsize(local_manifest)
    on_store = {o.path[len(remote_dir.rstrip("/")) + 1 :]: o.size for o in storage.list_prefix(remote_dir)}
    for rel, size in uploaded.items():
        if on_store.get(rel) != size:
            raise IndexFormatError(
                f"{storage.join(remote_dir, rel)} holds {on_store.get(rel)} bytes on the store, "
                f"{size} were uploaded; the upload did not complete"
            )
    return manifest_sha


def _upload_checked(local: str, remote: str, sha256: str) -> None:
    got = storage.upload(local, remote)
    if got != sha256:
        raise IndexFormatError(
            f"{local}: uploaded to {remote} with SHA-256 {got}, the index manifest records "
            f"{sha256} (the file changed after the index was saved); rebuild"
        )


def check_free(run_directory: str) -> None:
    if storage.has_objects(run_directory):
        raise ConfigError(f"run directory {run_directory} exists already; choose another --run_id")
