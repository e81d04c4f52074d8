"""The shared core of imgindex: contracts (schema, manifest), embedders, index, metrics.

`retrieval` imports neither `pipelines` nor `serving`; both import it.  Heavy
libraries (TensorFlow, ScaNN) are imported inside the functions that need them.
"""

from retrieval.version import __version__

__all__ = ["__version__"]
