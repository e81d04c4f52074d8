"""Read legacy (pre-zip) PyTorch ``.pth`` state dicts with numpy alone.

A legacy file is a sequence of pickles followed by raw storage bytes:

1. the magic number ``0x1950a86a20f9469cfc6c``,
2. the protocol version ``1001``,
3. a sys-info dict (``little_endian``, ``type_sizes``, ...),
4. the object itself -- for a state dict an ``OrderedDict`` whose tensors are
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
   backward_hooks)`` and whose storages are persistent ids
   ``('storage', torch.FloatStorage, key, location, numel, view_metadata)``,
5. the list of storage keys,
6. for each key in that order: a little-endian int64 element count, then the raw
   little-endian elements.

Unpickling runs whatever callables a file names, so the unpickler below resolves
only the handful of globals a state dict needs, to local stand-ins, and refuses
everything else: no code from the weights file ever runs.
"""

from __future__ import annotations

import collections
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from retrieval.errors import HandleError

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001

# torch storage class name -> little-endian numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class WeightsFileError(HandleError):
    """A weights file is unsafe, corrupted, or not the expected kind of state dict."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only carries the dtype."""

    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes come after the pickles; materialised later."""

    storage_key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage_key: object,
    storage_offset: int,
    size: Sequence[int],
    stride: Sequence[int],
    requires_grad: bool = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    # Stand-in for torch._utils._rebuild_tensor_v2; persistent_load returned the key.
    if not isinstance(storage_key, str):
        raise WeightsFileError("tensor without a storage in weights file")
    return _TensorRef(
        storage_key, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
    )


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict; records storage references."""

    def __init__(self, file: BinaryIO, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise WeightsFileError(
            f"refusing to load weights: the file references the global {module}.{name}, "
            "which a plain tensor state dict never needs"
        )

    def persistent_load(self, pid: object) -> str:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
        ):
            raise WeightsFileError(f"unexpected persistent id in weights file: {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if view_metadata is not None:
            raise WeightsFileError("storage views are not supported in legacy weights files")
        ref = _StorageRef(storage_type.dtype, int(numel))
        if self._storages.setdefault(str(key), ref) != ref:
            raise WeightsFileError(f"storage {key!r} is declared twice with different types")
        return str(key)


def _load_pickle(f: BinaryIO, storages: dict[str, _StorageRef]) -> object:
    return _RestrictedUnpickler(f, storages).load()


def _check_header(f: BinaryIO) -> None:
    no_storages: dict[str, _StorageRef] = {}
    if _load_pickle(f, no_storages) != _MAGIC:
        raise WeightsFileError(
            "not a legacy PyTorch file (bad magic number); zip-format .pth files are not supported"
        )
    if _load_pickle(f, no_storages) != _PROTOCOL:
        raise WeightsFileError("unsupported legacy PyTorch protocol version")
    sys_info = _load_pickle(f, no_storages)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise WeightsFileError("only little-endian legacy PyTorch files are supported")


def _read_storages(f: BinaryIO, storages: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    keys = _load_pickle(f, {})
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise WeightsFileError("storage key list does not match the tensors in the file")
    arrays = {}
    for key in keys:
        ref = storages[str(key)]
        (count,) = struct.unpack("<q", f.read(8))
        if count != ref.numel:
            raise WeightsFileError(f"storage {key!r} holds {count} elements, expected {ref.numel}")
        data = f.read(count * ref.dtype.itemsize)
        if len(data) != count * ref.dtype.itemsize:
            raise WeightsFileError("weights file is truncated")
        arrays[str(key)] = np.frombuffer(data, dtype=ref.dtype)
    return arrays


def _materialize(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    if any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride) or len(ref.size) != len(ref.stride):
        raise WeightsFileError(f"invalid tensor geometry {ref}")
    if 0 in ref.size:
        return np.empty(ref.size, dtype=storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or last >= storage.size:
        raise WeightsFileError(f"tensor reaches outside its storage: {ref}")
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :],
        shape=ref.size,
        strides=[s * storage.itemsize for s in ref.stride],
        writeable=False,
    )
    return np.array(view, copy=True)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return the tensors of a legacy ``.pth`` state dict as numpy arrays, by name."""
    storages: dict[str, _StorageRef] = {}
    try:
        with open(path, "rb") as f:
            _check_header(f)
            state = _load_pickle(f, storages)
            arrays = _read_storages(f, storages)
    except (
        pickle.UnpicklingError,
        EOFError,
        struct.error,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
    ) as e:
        raise WeightsFileError(f"cannot read legacy PyTorch weights {path}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsFileError(f"{path} does not hold a state dict")
    result = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise WeightsFileError(f"state dict entry {name!r} is not a tensor")
        if ref.storage_key not in arrays:
            raise WeightsFileError(f"state dict entry {name!r} names an unknown storage")
        result[str(name)] = _materialize(ref, arrays[ref.storage_key])
    return result
