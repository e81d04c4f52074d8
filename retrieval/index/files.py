"""An index directory's layout and the reading and writing of its files.

An index directory holds

    scann/            ScaNN searcher assets (written with relative paths)
    ids.parquet       one string column `id`; row i is the id of vector i
    metadata.parquet  optional per-row metadata, rows aligned with the ids
    projection.npy    optional build-time PCA (`retrieval.projection`)
    manifest.json     written last; sizes and SHA-256 of every other file

The stored vectors (scann/dataset.npy) answer id queries row by row (`StoredVectors`):
read with pread, so that a file damaged while served is an error, never a SIGBUS.
"""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from retrieval import atomic_files, scann_assets
from retrieval import manifest as mf
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

# What `Index.save` writes beside the index's own files: a table, an array (.npy), or the
# path of a Parquet file (or of a .npy file the build wrote) to hard-link or copy.
ExtraFile: TypeAlias = "pa.Table | np.ndarray | os.PathLike[str]"


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
    backup = atomic_files.make_temp_dir(path.parent, prefix=f".{path.name}.old-")
    os.rename(path, backup / "index")
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(backup / "index", path)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def write_extra_files(directory: Path, tables: Mapping[str, ExtraFile], n: int) -> None:
    """`Index.save`'s extra files into `directory` ({file name: ExtraFile}): arrays as .npy, a
    .npy path the build wrote hard-linked or copied, tables as Parquet (a Parquet path
    hard-linked or copied), each table with one row per vector (n)."""
    import pyarrow.parquet as pq

    for name, value in tables.items():
        if name in (SCANN_DIR, IDS_FILE, mf.MANIFEST_NAME) or "/" in name:
            raise ConfigError(
                f"extra file {name!r} must be a plain file name other than the index's own files"
            )
        if isinstance(value, np.ndarray):
            np.save(directory / name, value, allow_pickle=False)
        elif isinstance(value, os.PathLike) and Path(value).suffix == ".npy":
            scann_assets.link_or_copy(Path(value), directory / name)  # made by the build
        elif isinstance(value, os.PathLike):
            rows = pq.read_metadata(value).num_rows
            if rows != n:
                raise ConfigError(
                    f"extra table {name!r} ({value}) must have one row per vector ({n}), got {rows} rows"
                )
            scann_assets.link_or_copy(Path(value), directory / name)
        elif value.num_rows != n:
            raise ConfigError(
                f"extra table {name!r} must have one row per vector ({n}), got {value.num_rows} rows"
            )
        else:
            pq.write_table(value, directory / name)


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


class StoredVectors:
    """The float32 rows (n, d) of scann/dataset.npy, read one row at a time (`vectors[row]`).

    Rows are read with pread(2) from a descriptor opened once, never through a memory map:
    a file truncated in place after it was opened (as `cp` over it does) would make a read
    through a map kill the process with SIGBUS.  The file's size is checked when it is
    opened, and its size and mtime before every row read: a file that changed since it was
    opened (or verified) raises IndexFormatError, while the ScaNN searcher keeps answering
    vector queries from its own copy in memory.  Thread-safe.
    """

    def __init__(self, path: Path, fd: int, offset: int, n: int, d: int) -> None:
        self.path, self.shape, self.dtype = path, (n, d), np.dtype("<f4")
        self._fd, self._offset, self._row_bytes = fd, offset, d * 4
        self._identity = _identity(os.fstat(fd))
        self._closer = weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row: int | np.integer) -> np.ndarray:
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)):
            raise TypeError(f"stored vectors are read one row at a time (an int), not {type(row).__name__}")
        n = self.shape[0]
        index = int(row) + n if row < 0 else int(row)
        if not 0 <= index < n:
            raise IndexError(f"row {row} is out of range for {n} stored vectors")
        self.check()
        data = os.pread(self._fd, self._row_bytes, self._offset + index * self._row_bytes)
        if len(data) != self._row_bytes:
            raise self._changed("is shorter than its rows")
        return np.frombuffer(data, dtype=self.dtype).astype(np.float32)

    def check(self) -> None:
        """IndexFormatError when the file's size or mtime changed since it was opened."""
        if _identity(os.fstat(self._fd)) != self._identity:
            raise self._changed("changed after it was loaded (size or modification time)")

    def close(self) -> None:
        self._closer()

    def _changed(self, what: str) -> IndexFormatError:
        log.error("%s %s; id queries of this index fail until a good run is loaded", self.path, what)
        return IndexFormatError(
            f"{self.path} {what}: the index was modified in place while served (published runs "
            "are read-only; restore the run or publish a new one)"
        )


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def open_vectors(path: Path, n: int, d: int) -> StoredVectors | None:
    """scann/dataset.npy as StoredVectors when it is float32 (n, d), else None (with a
    warning); IndexFormatError when it is unreadable or its size does not fit its header."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise IndexFormatError(f"{path} is not a readable .npy file ({exc})") from exc
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
        size = os.fstat(fd).st_size
    except (OSError, ValueError) as exc:
        os.close(fd)
        raise IndexFormatError(f"{path} is not a readable .npy file ({exc})") from exc
    if dtype != np.dtype("<f4") or tuple(shape) != (n, d) or fortran_order:
        os.close(fd)
        log.warning(
            "%s holds %s %s, not float32 (%d, %d): the stored vectors are unavailable",
            path,
            dtype,
            tuple(shape),
            n,
            d,
        )
        return None
    if size != offset + n * d * 4:
        os.close(fd)
        raise IndexFormatError(
            f"{path} has {size} bytes, but its header says {n} x {d} float32 rows after "
            f"{offset} header bytes ({offset + n * d * 4}): truncated or modified; rebuild the index"
        )
    return StoredVectors(path, fd, offset, n, d)
