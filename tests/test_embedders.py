import numpy as np
import pytest

from retrieval import embedders
from retrieval.embedders import EmbedderSpec, parse_embedder_arg
from retrieval.errors import ConfigError, HandleError
from retrieval.exact import unit_rows


def test_parse_name_handle_and_options():
    spec = parse_embedder_arg("lite=builtin:efficientnet-lite0,resize=crop,normalisation=none")
    assert (spec.name, spec.handle, spec.resize, spec.normalisation) == (
        "lite",
        "builtin:efficientnet-lite0",
        "crop",
        "none",
    )
    assert spec.input_size == 224
    assert parse_embedder_arg("x=builtin:efficientnet-lite2").input_size == 260
    url = parse_embedder_arg("https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5")
    assert url.name == "5" and url.handle.startswith("https://")
    assert parse_embedder_arg("m=/models/x,size=300").input_size == 300


@pytest.mark.parametrize(
    "arg, words",
    [
        ("m=/x,resize=squash", ["resize", "pad", "crop"]),
        ("m=/x,pad=blue", ["pad", "grey", "black", "mean"]),
        ("m=/x,filter=nearest", ["filter", "bilinear", "lanczos"]),
        ("m=/x,colour=1", ["option", "size=..."]),
        ("bad name=/x", ["name"]),
        ("m=", ["handle is empty"]),
    ],
)
def test_parse_rejects_bad_config_with_the_allowed_values(arg, words):
    with pytest.raises(ConfigError) as err:
        parse_embedder_arg(arg)
    for word in words:
        assert word in str(err.value)


def test_unknown_builtin_lists_allowed_names():
    with pytest.raises(HandleError) as err:
        embedders.resolve("builtin:resnet-9000")
    assert "builtin:efficientnet-lite0" in str(err.value)


def test_missing_local_handle_names_handle_and_offline_alternatives(tmp_path):
    handle = str(tmp_path / "no-such-model")
    with pytest.raises(HandleError) as err:
        embedders.resolve(handle)
    message = str(err.value)
    assert handle in message and "not an existing local directory" in message
    assert "builtin:efficientnet-lite0" in message and "Offline alternatives" in message


def test_directory_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(HandleError, match="no saved_model.pb"):
        embedders.resolve(str(tmp_path))


def test_each_handle_goes_to_the_first_resolver_that_takes_it(monkeypatch, tiny_savedmodel):
    assert [r.kind for r in embedders.RESOLVERS] == ["builtin", "local SavedModel directory", "TF Hub"]
    sent_to_hub = []
    monkeypatch.setattr(
        embedders, "_hub_resolve", lambda handle: sent_to_hub.append(handle) or tiny_savedmodel
    )
    remote = embedders.resolve("https://example.invalid/models/tiny/1")
    assert sent_to_hub == ["https://example.invalid/models/tiny/1"]
    assert (remote.path, remote.fingerprint) == (tiny_savedmodel, embedders.tree_fingerprint(tiny_savedmodel))
    local = embedders.resolve(tiny_savedmodel)
    assert local.fingerprint == remote.fingerprint and len(sent_to_hub) == 1  # never sent to the hub


def test_local_savedmodel_loads_with_fingerprint_and_dim(tiny_savedmodel):
    spec = parse_embedder_arg(f"tiny={tiny_savedmodel},size=32")
    model, full = embedders.complete_spec(spec)
    assert full.dim == 8
    assert full.fingerprint.startswith("sha256-tree:")
    assert full.fingerprint == embedders.tree_fingerprint(tiny_savedmodel)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    vectors = embedders.embed_batch(model, full, images)
    assert vectors.shape == (3, 8) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert EmbedderSpec.from_dict(full.to_dict()) == full


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"a")
    before = embedders.tree_fingerprint(str(tmp_path))
    (tmp_path / "saved_model.pb").write_bytes(b"b")
    assert embedders.tree_fingerprint(str(tmp_path)) != before


def test_savedmodel_returning_wrong_rank_is_rejected(tmp_path):
    import tensorflow as tf

    class Bad(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return images

    path = str(tmp_path / "bad")
    tf.saved_model.save(Bad(), path)
    with pytest.raises(HandleError, match=r"returning \[batch, dim\]"):
        embedders.complete_spec(parse_embedder_arg(f"bad={path},size=16"))


def test_l2_normalisation_is_the_projects_unit_rows():
    outputs = np.array([[3, 4, 0], [0, 0, 0], [1e-30, 0, 0], [1e30, 1e30, 0]], np.float32)
    images = np.zeros((4, 16, 16, 3), np.uint8)
    l2 = EmbedderSpec(name="m", handle="h", dim=3)
    vectors = embedders.embed_batch(lambda batch: outputs, l2, images)
    np.testing.assert_array_equal(vectors, unit_rows(outputs))
    np.testing.assert_allclose(
        vectors, [[0.6, 0.8, 0], [0, 0, 0], [1, 0, 0], [0.5**0.5, 0.5**0.5, 0]], rtol=1e-6
    )
    raw = EmbedderSpec(name="m", handle="h", dim=3, normalisation="none")
    np.testing.assert_array_equal(embedders.embed_batch(lambda batch: outputs, raw, images), outputs)
