"""Streaming .npy files: matrices written and read in row chunks without holding them in memory.

Large embedding matrices go through .npy files so that the index stage never needs an extra
in-memory copy: writes are plain file writes (no page of the file is mapped), and reads of
a memory map release their pages after every chunk, so they never accumulate in the RSS.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # numpy.typing costs an import at run time
    import numpy.typing as npt

# Rows per chunk when streaming a matrix: 65,536 x 256 float32 = 64 MiB.
CHUNK_ROWS = 65_536


def chunk_bounds(n: int, chunk_rows: int = CHUNK_ROWS) -> list[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in near-equal chunks of at most chunk_rows."""
    count = max(1, -(-n // chunk_rows))
    edges = np.linspace(0, n, count + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a NumPy memory map from this process (no-op for other arrays).

    Pages read through a memory map count in the process's RSS until unmapped; the file's
    page cache stays, so reading them again costs no disk I/O while memory allows.
    """
    mapped = getattr(array, "_mmap", None)
    if isinstance(mapped, mmap.mmap):
        mapped.madvise(mmap.MADV_DONTNEED)


def open_read(path: str | os.PathLike[str]) -> np.ndarray:
    """A .npy file as a read-only memory map (read into memory when it holds no data: an
    empty mapping is not allowed)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:
        return np.load(path, allow_pickle=False)


class NpyWriter:
    """Writes a .npy file of known shape row chunk by row chunk (a context manager).

    On a clean exit the number of rows written must match the shape, else ValueError.
    """

    def __init__(self, path: str | os.PathLike[str], shape: Sequence[int], dtype: npt.DTypeLike) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_2_0(self._file, header)

    def append(self, rows: npt.ArrayLike) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + rows.shape[0] > self.shape[0]:
            raise ValueError(
                f"{self.path.name}: {rows.shape[0]} rows of shape {rows.shape[1:]} do not fit "
                f"after {self.rows} rows of {self.shape}"
            )
        rows.tofile(self._file)  # the array's own buffer, no bytes copy
        self.rows += rows.shape[0]

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        self._file.close()
        if exc_type is None and self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: wrote {self.rows} rows, the header says {self.shape[0]}")
        return False
