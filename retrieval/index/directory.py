"""An index directory written and read whole: `save_index` (`Index.save`) writes everything
into a temporary sibling, manifest.json last, and publishes it by a rename;
`read_index_directory` checks a directory and reads what `load_index` makes an `Index` of.
`retrieval.index.files` describes the layout and reads and writes each file."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval import atomic_files, scann_assets
from retrieval import manifest as mf
from retrieval.errors import IndexFormatError
from retrieval.index.files import (
    IDS_FILE,
    SCANN_DIR,
    ExtraFile,
    check_projection,
    check_save_target,
    publish,
    read_ids,
    write_extra_files,
    write_ids,
)
from retrieval.projection import PROJECTION_FILE

if TYPE_CHECKING:
    from retrieval.index.store import Index
    from retrieval.scann_import import ScannSearcher


def save_index(
    index: Index,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    tables: Mapping[str, ExtraFile] | None = None,
) -> None:
    """Write the index directory at `path`, published by a rename only when complete.

    Everything is written into a temporary sibling directory, manifest.json last,
    then renamed to `path`.  `tables` ({file name: pyarrow.Table, numpy array, or the
    pathlib.Path of a Parquet file, hard-linked or copied}) are
    written beside ids.parquet (Parquet, rows aligned with the ids; or .npy) and covered
    by the manifest's checksums (e.g. metadata.parquet, projection.npy).  An existing `path` is replaced only with
    overwrite=True and only if it is an imgindex index (or empty); the old
    directory is moved aside and restored if the final rename fails.
    """
    path = Path(path)
    tables = {**index._extra_files, **(tables or {})}
    check_save_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic_files.make_temp_dir(path.parent, prefix=f".{path.name}.tmp-")
    try:
        manifest = _write_contents(index, staging, tables)
        publish(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    index.manifest = manifest
    index._directory = path
    if PROJECTION_FILE in tables:
        index._projection = check_projection(np.asarray(tables[PROJECTION_FILE]), index.d, path)


def _write_contents(index: Index, directory: Path, tables: Mapping[str, ExtraFile]) -> mf.IndexManifest:
    write_extra_files(directory, tables, index.n)
    scann_dir = directory / SCANN_DIR
    scann_dir.mkdir()
    # The default (relative_path=False) records absolute asset paths in
    # scann_assets.pbtxt, which point into the staging directory and break
    # after the rename; relative paths are resolved against the scann/ dir.
    if index._assets is not None:
        index._assets.copy_to(scann_dir)
    else:
        index._searcher.serialize(str(scann_dir), relative_path=True)
    write_ids(directory / IDS_FILE, index._ids)
    manifest = dataclasses.replace(index.manifest, files=mf.describe_files(directory))
    mf.write_manifest(directory, manifest)
    return manifest


def read_index_directory(
    path: Path, verify: bool
) -> tuple[ScannSearcher, np.ndarray, mf.IndexManifest, np.ndarray | None]:
    """(searcher, ids, manifest, projection) of the index directory at `path`, checked as
    `retrieval.index.store.load_index` says (IndexFormatError)."""
    manifest = mf.read_manifest(path)
    for required in (IDS_FILE, f"{SCANN_DIR}/{scann_assets.ASSETS_FILE}"):
        if required not in manifest.files:
            raise IndexFormatError(
                f"{path}: the manifest does not list {required}; the index is incomplete. Rebuild the index."
            )
    mf.verify_files(path, manifest, check_hashes=verify)
    # load_searcher unpickles scann_docids.pkl if present; imgindex never writes
    # one, so its presence means the directory was tampered with.
    if (path / SCANN_DIR / "scann_docids.pkl").exists():
        raise IndexFormatError(
            f"{path}/{SCANN_DIR} contains scann_docids.pkl, which imgindex never writes; "
            "refusing to load it. Rebuild the index."
        )
    ids = read_ids(path / IDS_FILE, manifest.n)
    searcher = scann_assets.load_searcher(path / SCANN_DIR)
    if searcher.size() != manifest.n:
        raise IndexFormatError(
            f"{path}: the ScaNN searcher holds {searcher.size()} vectors but the manifest says "
            f"n={manifest.n}. Rebuild the index."
        )
    projection = None
    if PROJECTION_FILE in manifest.files:  # verified with the other listed files above
        projection = check_projection(np.load(path / PROJECTION_FILE), manifest.d, path)
    return searcher, ids, manifest, projection
