"""The builtin models' cache: where it is, concurrent exports publishing one copy, and a cache
entry verified against its export (damaged, altered or old entries are exported again).
"""

import importlib
import json
import multiprocessing
import os
import shutil
import stat

import numpy as np
import pytest

from retrieval.builtin import fingerprint, materialize
from retrieval.errors import HandleError
from tests.helpers.images import sample_photos

# The package re-exports the function materialize(), which shadows the submodule's name.
materialize_module = importlib.import_module("retrieval.builtin.materialize")


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGINDEX_CACHE_DIR", str(tmp_path))
    assert materialize_module.cache_root() == str(tmp_path)
    assert materialize_module.cache_root(str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    monkeypatch.delenv("IMGINDEX_CACHE_DIR")
    assert materialize_module.cache_root() == os.path.expanduser("~/.cache/imgindex")


def test_an_object_store_cache_dir_is_refused_with_the_fix(monkeypatch, tmp_path):
    with pytest.raises(HandleError, match=r"--model_cache_dir 'gs://b/cache'.*local or mounted"):
        materialize_module.cache_root("gs://b/cache")
    monkeypatch.setenv("IMGINDEX_CACHE_DIR", "s3://b/cache")
    with pytest.raises(HandleError, match=r"\$IMGINDEX_CACHE_DIR 's3://b/cache'"):
        materialize_module.cache_root()


@pytest.mark.slow
def test_concurrent_materialize_publishes_one_complete_copy(tmp_path):
    cache = str(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap(materialize, [("builtin:efficientnet-lite0", cache)] * 3)
    assert len({r.path for r in results}) == 1
    path = results[0].path
    assert results[0].fingerprint == fingerprint("efficientnet-lite0")
    # Losers of the rename race removed their temporary exports.
    assert os.listdir(os.path.join(cache, "models")) == [os.path.basename(path)]
    assert materialize("efficientnet-lite0", cache_dir=cache) == results[0]


def test_publish_keeps_the_winners_copy(tmp_path):
    final, late = tmp_path / "final", tmp_path / "late"
    final.mkdir()
    (final / "winner").write_text("")
    late.mkdir()
    (late / "loser").write_text("")
    materialize_module._publish(str(late), str(final))
    assert os.listdir(final) == ["winner"]


@pytest.mark.slow
def test_a_cached_model_with_a_negated_kernel_is_exported_again(lite0, lite0_hub, tmp_path, caplog):
    import tensorflow as tf
    import tensorflow_hub as hub

    cache = tmp_path / "cache"
    copy = cache / "models" / os.path.basename(lite0.path)
    shutil.copytree(lite0.path, copy)
    assert materialize("efficientnet-lite0", cache_dir=str(cache)).path == str(copy)  # intact: used
    # One kernel negated, written back as the SavedModel's variables; the marker is untouched.
    loaded = tf.saved_model.load(str(copy))
    kernel = next(v for v in loaded.variables if v.shape == (3, 3, 3, 32))  # the stem convolution
    kernel.assign(-kernel)
    tf.train.Checkpoint(root=loaded).write(str(copy / "variables" / "variables"))
    images = sample_photos(224)
    expected = lite0_hub(images).numpy()
    assert np.abs(hub.load(str(copy))(images).numpy() - expected).max() > 0.1  # the damage is real

    with caplog.at_level("WARNING", logger=materialize_module.__name__):
        model = materialize("efficientnet-lite0", cache_dir=str(cache))

    assert model.path == str(copy) and model.fingerprint == fingerprint("efficientnet-lite0")
    np.testing.assert_allclose(hub.load(model.path)(images).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert os.listdir(cache / "models") == [copy.name]  # no temporary or damaged copy left
    assert "exporting it again" in caplog.text and "variables" in caplog.text
    with open(copy / "imgindex_builtin.json") as f:
        recorded = json.load(f)["files"]
    assert set(recorded) == {
        "saved_model.pb",
        "fingerprint.pb",
        "variables/variables.index",
        "variables/variables.data-00000-of-00001",
    }


def _copy_of(model, tmp_path):
    copy = tmp_path / "models" / os.path.basename(model.path)
    shutil.copytree(model.path, copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, reason",
    [
        (
            lambda d: (d / "saved_model.pb").write_bytes(b"x" * (d / "saved_model.pb").stat().st_size),
            "saved_model.pb differs from the exported file",
        ),
        (lambda d: (d / "fingerprint.pb").write_bytes(b"x"), "fingerprint.pb has 1 bytes"),
        (lambda d: (d / "variables" / "variables.index").unlink(), "files missing"),
        (lambda d: (d / "extra.pb").write_bytes(b""), "not from the export"),
        (lambda d: (d / "imgindex_builtin.json").write_text('{"fingerprint": "x"}'), "names fingerprint"),
        (lambda d: (d / "imgindex_builtin.json").unlink(), "no readable"),
    ],
)
def test_a_cache_entry_that_differs_from_its_export_is_found(lite0, tmp_path, damage, reason):
    copy = _copy_of(lite0, tmp_path)
    assert materialize_module._problem(str(copy), lite0.fingerprint) is None  # hashed: intact
    damage(copy)
    # Seen although this process verified the entry a moment ago (sizes, mtimes, inodes).
    assert reason in materialize_module._problem(str(copy), lite0.fingerprint)


@pytest.mark.slow
def test_a_marker_without_checksums_is_an_old_export(lite0, tmp_path):
    copy = _copy_of(lite0, tmp_path)
    marker = copy / "imgindex_builtin.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    assert "records no checksums" in materialize_module._problem(str(copy), lite0.fingerprint)


@pytest.mark.slow
def test_the_cache_entry_follows_the_umask(lite0):
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(lite0.path).st_mode) == 0o777 & ~umask
