"""An index directory's layout and the reading and writing of its files.

An index directory holds

    scann/            ScaNN searcher assets (written with relative paths)
    ids.parquet       one string column `id`; row i is the id of vector i
    metadata.parquet  optional per-row metadata, rows aligned with the ids
    projection.npy    optional build-time PCA (`retrieval.projection`)
    manifest.json     written last; sizes and SHA-256 of every other file
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval import manifest as mf
from retrieval import scann_assets
from retrieval.errors import ConfigError, IndexFormatError
from retrieval.projection import PROJECTION_FILE

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

SCANN_DIR = "scann"
IDS_FILE = "ids.parquet"
# Optional per-row metadata (source, sha256, size, passthrough columns), rows aligned with ids.
METADATA_FILE = "metadata.parquet"
# The float rows ScaNN reorders with: memory-mapped as the index's stored vectors.
DATASET_FILE = f"{SCANN_DIR}/{scann_assets.DATASET[1]}"


def check_save_target(path: Path, overwrite: bool) -> None:
    """Raise ConfigError unless an index may be saved at `path` (absent, or with overwrite an
    imgindex index or an empty directory)."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ConfigError(f"{path} already exists; pass overwrite=True to replace it.")
    if not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory; refusing to replace it.")
    if not (path / mf.MANIFEST_NAME).is_file() and any(path.iterdir()):
        raise ConfigError(
            f"{path} exists and is not an imgindex index (no {mf.MANIFEST_NAME}); refusing to "
            "delete it even with overwrite=True. Choose another path or remove it yourself."
        )


def publish(staging: Path, path: Path) -> None:
    """Rename the complete `staging` directory to `path`; an existing `path` is moved aside
    first and restored if the rename fails."""
    if not path.exists():
        os.rename(staging, path)
        return
    backup = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.rename(path, backup / "index")
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup / "index", path)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def write_ids(path: Path, ids: np.ndarray | pa.Array) -> None:
    """ids.parquet: one string column `id`, from Python strings or one Arrow string array."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
    pq.write_table(pa.table({"id": column}), path)


def read_ids(path: Path, n: int) -> np.ndarray:
    """The n ids of ids.parquet as a numpy object array; IndexFormatError when unreadable,
    not strings, null or not n."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=["id"]).column("id")
    except (pa.ArrowException, OSError, KeyError) as e:
        raise IndexFormatError(f"{path} is not a readable ids table ({e}). Rebuild the index.") from e
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise IndexFormatError(f"{path}: column 'id' has type {column.type}, expected string.")
    if column.null_count:
        raise IndexFormatError(f"{path}: column 'id' has {column.null_count} null value(s).")
    if len(column) != n:
        raise IndexFormatError(
            f"{path} holds {len(column)} ids but the manifest says n={n}; the index is "
            "inconsistent. Rebuild the index."
        )
    return column.to_numpy(zero_copy_only=False).astype(object, copy=False)


def check_projection(projection: np.ndarray, d: int, directory: Path) -> np.ndarray:
    """`projection` when it projects to dimension d, else IndexFormatError."""
    if projection.ndim != 2 or projection.shape[0] != d + 1:
        raise IndexFormatError(
            f"{directory / PROJECTION_FILE}: shape {projection.shape} does not project to the "
            f"index dimension {d}; rebuild the index"
        )
    return projection


def read_metadata(directory: str | os.PathLike[str], manifest: mf.IndexManifest, n: int) -> pa.Table | None:
    """The index directory's metadata.parquet without `id` (pyarrow Table), or None when the
    index has none.  It must be listed in the manifest (so verified), have n rows and, when it
    holds an `id` column, the ids of ids.parquet in the same order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    path = directory / METADATA_FILE
    if METADATA_FILE not in manifest.files:
        if path.exists():
            raise IndexFormatError(
                f"{path} is not listed in the index manifest, so its contents are unverified; rebuild the index"
            )
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise IndexFormatError(f"{path} is not a readable Parquet table ({exc})") from exc
    if table.num_rows != n:
        raise IndexFormatError(
            f"{path} has {table.num_rows} rows but the index holds {n} vectors; rebuild the index"
        )
    if "id" in table.column_names:
        ids = pq.read_table(directory / IDS_FILE, columns=["id"]).column("id")
        meta_ids = table.column("id")
        if meta_ids.type != ids.type:
            meta_ids = meta_ids.cast(ids.type)
        if not meta_ids.equals(ids):
            raise IndexFormatError(
                f"{path}: rows are not aligned with {IDS_FILE} (the id columns differ); rebuild the index"
            )
        table = table.drop_columns(["id"])
    return table


def map_vectors(path: Path, n: int, d: int) -> np.ndarray | None:
    """scann/dataset.npy memory-mapped when it is float32 (n, d), else None (with a warning)."""
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is not a readable .npy file ({exc})") from exc
    if vectors.dtype != np.float32 or vectors.shape != (n, d):
        log.warning(
            "%s holds %s %s, not float32 (%d, %d): the stored vectors are unavailable",
            path,
            vectors.dtype,
            vectors.shape,
            n,
            d,
        )
        return None
    return vectors
