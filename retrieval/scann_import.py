"""Import ScaNN's pybind searcher API without dragging in TensorFlow.

`scann/__init__.py` runs `try: import tensorflow ... except ModuleNotFoundError`
so that the TF custom ops are available when TF is installed.  Importing
TensorFlow is slow and takes a lot of memory, and loading or querying an index
needs none of it: the pybind module (`scann_ops_pybind`) is self-contained.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from types import ModuleType
from typing import Protocol

import numpy as np

_PYBIND_MODULE = "scann.scann_ops.py.scann_ops_pybind"


class ScannSearcher(Protocol):
    """What imgindex uses of a ScaNN pybind searcher (`scann_ops_pybind.ScannSearcher`, which
    ships without type information)."""

    def search(
        self,
        q: np.ndarray,
        final_num_neighbors: int = ...,
        pre_reorder_num_neighbors: int = ...,
        leaves_to_search: int = ...,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def search_batched_parallel(
        self,
        queries: np.ndarray,
        final_num_neighbors: int | None = ...,
        pre_reorder_num_neighbors: int | None = ...,
        leaves_to_search: int | None = ...,
        batch_size: int = ...,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def serialize(self, artifacts_dir: str, relative_path: bool = ...) -> None: ...

    def size(self) -> int: ...

    def config(self) -> str: ...


def import_scann_pybind() -> ModuleType:
    """Return `scann.scann_ops.py.scann_ops_pybind`, importing TensorFlow only if it already is.

    When neither TensorFlow nor ScaNN has been imported yet, `sys.modules["tensorflow"]`
    is set to None for the duration of the import: Python then raises
    ModuleNotFoundError for `import tensorflow`, which `scann/__init__.py` catches
    and skips its TF ops (much faster than a plain `import scann`, and 'tensorflow' is
    not in sys.modules afterwards).
    The marker is removed again so a later `import tensorflow` works normally.

    Consequences: in such a process `import scann` does not load the TF ops module
    (`scann.scann_ops.py.scann_ops`) even after TensorFlow is imported; importing
    that module explicitly still works.  The marker is process-global, so a
    thread importing TensorFlow during this import would fail: call this before
    starting threads that might import TensorFlow.
    """
    if "tensorflow" in sys.modules or "scann" in sys.modules:
        # TF is loaded (its import already paid for) or explicitly blocked by the
        # caller, or ScaNN's __init__ already ran: nothing to avoid, nothing to undo.
        module = importlib.import_module(_PYBIND_MODULE)
    else:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # blocks the import
        try:
            module = importlib.import_module(_PYBIND_MODULE)
        finally:
            if "tensorflow" in sys.modules and sys.modules["tensorflow"] is None:
                del sys.modules["tensorflow"]
    _follow_tf_log_level()
    return module


# ScaNN's C++ code logs through its own copy of absl (INFO lines on every tree-AH build,
# warnings from its k-means), which reads no environment variable.  Its minimum level is set
# through absl's exported SetMinLogLevel to follow TF_CPP_MIN_LOG_LEVEL, so that one variable
# governs both libraries' C++ logs (0 all, 1 from warnings, 2 errors, 3 none but fatal; the
# `imgindex` command sets 3 unless it is set).  Unset: ScaNN logs as it always did.
_ABSL_SET_MIN_LOG_LEVEL = "_ZN4absl12lts_2025012714SetMinLogLevelENS0_18LogSeverityAtLeastE"
_log_level_set = False


def _follow_tf_log_level() -> None:
    global _log_level_set
    if _log_level_set:
        return
    _log_level_set = True
    try:
        level = min(3, max(0, int(os.environ["TF_CPP_MIN_LOG_LEVEL"])))
        library = ctypes.CDLL(sys.modules["scann_pybind"].__file__)
        set_min_log_level = getattr(library, _ABSL_SET_MIN_LOG_LEVEL)
    except (KeyError, ValueError, TypeError, OSError, AttributeError):
        return  # not asked for, or another ScaNN build: its logs stay as they are
    set_min_log_level.argtypes = [ctypes.c_int]
    set_min_log_level.restype = None
    set_min_log_level(level)
