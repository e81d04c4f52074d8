"""Import ScaNN's pybind searcher API without dragging in TensorFlow.

`scann/__init__.py` runs `try: import tensorflow ... except ModuleNotFoundError`
so that the TF custom ops are available when TF is installed.  Importing
TensorFlow takes ~4 s and a lot of memory, and loading or querying an index
needs none of it: the pybind module (`scann_ops_pybind`) is self-contained.
"""

import importlib
import sys

_PYBIND_MODULE = "scann.scann_ops.py.scann_ops_pybind"


def import_scann_pybind():
    """Return `scann.scann_ops.py.scann_ops_pybind`, importing TensorFlow only if it already is.

    When neither TensorFlow nor ScaNN has been imported yet, `sys.modules["tensorflow"]`
    is set to None for the duration of the import: Python then raises
    ModuleNotFoundError for `import tensorflow`, which `scann/__init__.py` catches
    and skips its TF ops (measured with a warm file cache: 0.1 s instead of 3-3.5 s
    for a plain `import scann`, and 'tensorflow' is not in sys.modules afterwards).
    The marker is removed again so a later `import tensorflow` works normally.

    Consequences: in such a process `import scann` does not load the TF ops module
    (`scann.scann_ops.py.scann_ops`) even after TensorFlow is imported; importing
    that module explicitly still works.  The marker is process-global, so a
    thread importing TensorFlow during this ~0.1 s would fail: call this before
    starting threads that might import TensorFlow.
    """
    if "tensorflow" in sys.modules or "scann" in sys.modules:
        # TF is loaded (its import already paid for) or explicitly blocked by the
        # caller, or ScaNN's __init__ already ran: nothing to avoid, nothing to undo.
        return importlib.import_module(_PYBIND_MODULE)
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # blocks the import
    try:
        return importlib.import_module(_PYBIND_MODULE)
    finally:
        if "tensorflow" in sys.modules and sys.modules["tensorflow"] is None:
            del sys.modules["tensorflow"]
