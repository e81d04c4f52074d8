"""Files written so that a reader or a crash never sees half of one: atomic JSON and text
writes (synced temporary sibling, rename, synced directory), temporary files and directories
to rename into place, read-only published files, and SHA-256 of a file.

File modes: files and directories made here to be renamed into place (`make_temp_file`,
`make_temp_dir`, `write_text_atomic`) get the modes any new file or directory gets, 0666 and
0777 less the umask, like every file written in place; `make_read_only` takes the write bits
off a directory's files (a published run).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from retrieval import killpoints

_CHUNK_BYTES = 1 << 20
WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, read_only: bool = False) -> None:
    """Write `data` as JSON to `path` via a temporary sibling file and os.replace.

    Readers see either the old file or the complete new one, never a prefix.
    """
    write_text_atomic(path, json_text(data), read_only=read_only)


def json_text(data: Any) -> str:
    """The JSON every manifest is written as (sorted keys, no NaN, NumPy scalars as numbers)."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_numpy_scalar) + "\n"


def write_text_atomic(path: str | os.PathLike[str], text: str, *, read_only: bool = False) -> None:
    """Write `text` to `path` via a synced temporary sibling file and os.replace, then sync
    the directory, so that after a crash or power loss `path` is the old or the new file.

    The file gets the mode any new file gets (0666 less the umask, like the files written in
    place), or that without its write bits when `read_only` (a published run's files).
    """
    path = Path(path)
    fd, tmp = make_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if read_only:
                os.fchmod(f.fileno(), stat.S_IMODE(os.fstat(f.fileno()).st_mode) & ~WRITE_BITS)
            os.fsync(f.fileno())
        killpoints.reached(f"replace {path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def make_temp_file(directory: str | os.PathLike[str], prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new file `directory`/<prefix><random><suffix> opened for writing: (fd, path).

    Unlike `tempfile.mkstemp` (always 0600), the file gets the mode any new file gets:
    0666 less the umask (and the directory's default ACL), so that a file renamed into
    place from it is readable by whoever may read the other files.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


def make_temp_dir(directory: str | os.PathLike[str], prefix: str, suffix: str = "") -> Path:
    """A new directory `directory`/<prefix><random><suffix>, with the mode any new directory
    gets (0777 less the umask; `tempfile.mkdtemp` makes it 0700), for contents that are
    renamed into place when complete."""
    for _ in range(100):
        path = Path(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


def make_read_only(directory: str | os.PathLike[str]) -> int:
    """Takes the write bits off every regular file under `directory` (not following links;
    directories stay as they are, so their owner can still delete them); returns how many
    files changed."""
    changed = 0
    stack = [Path(directory)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    if mode & WRITE_BITS:
                        os.chmod(entry.path, mode & ~WRITE_BITS)
                        changed += 1
    return changed


def _numpy_scalar(value: Any) -> Any:
    """JSON fallback for NumPy scalars (e.g. an np.int64 leaf count in a config)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so memory use is constant."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
