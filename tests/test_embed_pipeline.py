import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import embed
from retrieval import schema as S
from retrieval import tables
from retrieval.errors import ConfigError
from tests.helpers import shards

METADATA = ["--metadata", "image/class/label:int64,cls:int64", "--metadata", "json,txt"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shards.mixed_dataset(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def two_embedder_run(dataset, tiny_savedmodel, tmp_path_factory):
    globs, _, _, _ = dataset
    out = str(tmp_path_factory.mktemp("run") / "out")
    argv = [f"--input={g}" for g in globs] + [
        f"--output={out}",
        "--embedder=lite=builtin:efficientnet-lite0",
        f"--embedder=tiny={tiny_savedmodel},size=32,resize=crop",
        "--batch_size=4",
        "--row_group_size=5",
        *METADATA,
    ]
    return out, embed.run(argv)


def _table(path):
    return pq.read_table(path)


@pytest.mark.slow
def test_every_input_is_embedded_or_a_failure_row(dataset, two_embedder_run):
    _, good, n_failures, _ = dataset
    out, report = two_embedder_run
    assert report["status"] == "ok"
    counts = report["counts"]
    assert counts["records"] == len(good) + n_failures
    assert counts["failed_total"] == n_failures
    for name in ("lite", "tiny"):
        e = report["embedders"][name]
        assert e["reconciled"] and e["embedded"] == len(good) and e["failed_embed"] == 0
        assert sorted(_table(f"{out}/embeddings/{name}").column("id").to_pylist()) == sorted(good)
    with open(f"{out}/run_report.json") as f:
        assert json.load(f) == report


@pytest.mark.slow
def test_failures_table_names_source_stage_and_reason(dataset, two_embedder_run):
    globs, _, n_failures, _ = dataset
    root = os.path.dirname(os.path.dirname(globs[0]))
    out, _ = two_embedder_run
    failures = _table(f"{out}/failures")
    assert failures.schema.equals(S.FAILURES_SCHEMA, check_metadata=False)
    rows = {os.path.relpath(r["source"], root): r for r in failures.to_pylist()}
    assert len(rows) == n_failures
    assert rows["tfr/a.tfrecord#7"]["stage"] == "decode" and rows["tfr/a.tfrecord#7"]["id"] == "tf-random"
    assert (
        rows["tfr/a.tfrecord#8"]["stage"] == "read" and "image/encoded" in rows["tfr/a.tfrecord#8"]["message"]
    )
    assert "framing broken at record 2" in rows["tfr/b.tfrecord#2"]["message"]
    assert "no image member" in rows["wds/shard-000.tar#s/002"]["message"]
    assert "decompression-bomb" in rows["wds/shard-000.tar#s/004.png"]["message"]
    assert rows["wds/shard-000.tar#s/006.webp"]["stage"] == "read"  # cls 'x' is not an int64
    assert rows["folder/empty.jpg"]["message"] == "empty image bytes"
    assert rows["folder/trunc.jpg"]["stage"] == "decode"
    assert all(r["embedder"] is None for r in rows.values())


@pytest.mark.slow
def test_tables_match_the_schema_and_read_with_pandas(dataset, two_embedder_run):
    _, good, _, labels = dataset
    out, _ = two_embedder_run
    data = tables.read_embeddings(f"{out}/embeddings/lite")
    assert (
        data.spec.name == "lite"
        and data.spec.dim == 1280
        and (data.spec.resize, data.spec.pad, data.spec.filter) == ("crop", "grey", "bilinear")
    )
    np.testing.assert_allclose(np.linalg.norm(data.vectors, axis=1), 1.0, rtol=1e-5)
    frame = _table(f"{out}/embeddings/lite").to_pandas().set_index("id")
    assert list(frame.columns)[:5] == [S.SHA256, S.SOURCE, S.WIDTH, S.HEIGHT, S.EMBEDDING]
    assert (frame.loc["tf-rotated.jpg", "width"], frame.loc["tf-rotated.jpg", "height"]) == (48, 64)
    assert frame.loc["tf-3", "width"] == 88
    for key, label in labels.items():
        column = "cls" if key.startswith("s/") else "image/class/label"
        assert frame.loc[key, column] == label
    assert json.loads(frame.loc["s/000", "json"]) == {"a": 2, "b": 1}
    assert frame.loc["s/001", "txt"] == "sixteen bit"
    tiny = tables.read_embeddings(f"{out}/embeddings/tiny")
    assert tiny.vectors.shape == (len(good), 8) and tiny.spec.input_size == 32
    # --row_group_size=5 bounds the Parquet row groups.
    meta = pq.ParquetFile(pq.ParquetDataset(f"{out}/embeddings/lite").files[0]).metadata
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 5


@pytest.mark.slow
def test_same_bytes_same_sha_and_embedding_across_formats(tmp_path):
    from tests.helpers import images

    data = images.jpeg(seed=5)
    os.makedirs(tmp_path / "f")
    (tmp_path / "f" / "x.jpg").write_bytes(data)
    shards.webdataset_shard(tmp_path / "w.tar", [("x", {"jpg": data})])
    out = str(tmp_path / "out")
    embed.run([f"--input={tmp_path}/f/*.jpg", f"--input={tmp_path}/w.tar", f"--output={out}"])
    table = _table(f"{out}/embeddings/lite").to_pylist()
    assert (
        len(table) == 2
        and table[0]["sha256"] == table[1]["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    )
    np.testing.assert_allclose(table[0]["embedding"], table[1]["embedding"], atol=1e-6)


@pytest.mark.slow
def test_multi_processing_gives_the_same_embeddings(dataset, two_embedder_run, tmp_path):
    globs, good, _, _ = dataset
    out, _ = two_embedder_run
    mp_out = str(tmp_path / "mp")
    report = embed.run(
        [f"--input={g}" for g in globs]
        + [
            f"--output={mp_out}",
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
            "--batch_size=4",
            *METADATA,
        ]
    )
    assert report["embedders"]["lite"]["embedded"] == len(good) and report["status"] == "ok"
    a = _table(f"{out}/embeddings/lite").to_pandas().set_index("id").sort_index()
    b = _table(f"{mp_out}/embeddings/lite").to_pandas().set_index("id").sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(np.stack(a.embedding), np.stack(b.embedding), atol=1e-4)


@pytest.mark.slow
def test_test_pipeline_can_be_injected(tmp_path):
    from apache_beam.testing.test_pipeline import TestPipeline

    from tests.helpers import images

    (tmp_path / "x.png").write_bytes(images.la_png())
    out = str(tmp_path / "out")
    report = embed.run(
        [f"--input={tmp_path}/*.png", f"--output={out}"],
        test_pipeline=TestPipeline(runner="FnApiRunner", blocking=True),
    )
    assert report["embedders"]["lite"]["embedded"] == 1


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--input=/nonexistent/*.jpg", "--output=/tmp/x"], ["matches no files"]),
        (["--output=/tmp/x"], ["no --input"]),
        (["--input=x"], ["--output is required"]),
        (["--input=x", "--output=/tmp/y", "--embedder=a=builtin:nope"], ["builtin:efficientnet-lite0"]),
        (
            [
                "--input=x",
                "--output=/tmp/y",
                "--embedder=a=builtin:efficientnet-lite0",
                "--embedder=a=builtin:efficientnet-lite1",
            ],
            ["unique"],
        ),
        (["--input=x", "--output=/tmp/y", "--metadata=id:int64"], ["fixed column"]),
        (["--input=x", "--output=/tmp/y", "--metadata=label:int32"], ["int64"]),
        (["--input=x", "--output=/tmp/y", "--batch_size=0"], ["--batch_size must be >= 1"]),
    ],
)
def test_bad_configuration_fails_before_any_work(argv, words):
    with pytest.raises(Exception) as err:
        embed.run(argv)
    assert isinstance(err.value, (ConfigError,)) or "HandleError" in type(err.value).__name__
    for word in words:
        assert word in str(err.value)


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="--format"):
        embed.run([f"--input={tmp_path}/*.bin", f"--output={tmp_path}/out"])


@pytest.mark.slow
def test_output_of_a_previous_run_is_not_overwritten(two_embedder_run, dataset):
    out, _ = two_embedder_run
    with pytest.raises(ConfigError, match="already holds the results"):
        embed.run([f"--input={dataset[0][0]}", f"--output={out}"])


def test_row_infos_survive_beams_coder_and_dead_letters_become_failures():
    import pickle

    from apache_beam.coders import coders

    from pipelines.content import EmbedKey, EmbedRequest, Seen
    from pipelines.decode import RowInfo
    from pipelines.shards import MetadataColumn, Shard
    from retrieval.embedders import EmbedderSpec

    info = RowInfo(id="a", source="file:///a.jpg", sha256="0" * 64, width=3, height=4, metadata={"label": 7})
    assert pickle.loads(pickle.dumps(info)) == info
    coder = coders.FastPrimitivesCoder()
    assert coder.decode(coder.encode((info, b"pixels"))) == (info, b"pixels")

    spec = EmbedderSpec(name="lite", handle="h", fingerprint="f", dim=2)
    schema = S.embedding_schema(spec, (S.metadata_field("label", "int64"),))
    vector = np.array([0.6, 0.8], np.float32)
    table = embed.embedding_batch(
        [(info, vector)], spec=spec, schema=schema, metadata=[MetadataColumn("label", "int64")]
    )
    assert table.schema.equals(schema, check_metadata=True)
    assert table.to_pylist() == [
        {
            "id": "a",
            "sha256": "0" * 64,
            "source": "file:///a.jpg",
            "width": 3,
            "height": 4,
            "embedding": pytest.approx([0.6, 0.8]),
            "label": 7,
        }
    ]

    # A failed batch fails every id waiting for each of its contents (here two ids share one),
    # but not a verification sample's content (its rows are reused).
    shard = Shard("file:///a.jpg", "images", "file:///")
    rows = tuple(Seen(i, f"file:///{i}.jpg", "0" * 64, {}, shard, (0, n)) for n, i in enumerate("ab"))
    key = EmbedKey(EmbedRequest("0" * 64, "file:///a.jpg", shard, rows, ("lite",)), 3, 4)
    sample = EmbedKey(EmbedRequest("1" * 64, "file:///c.jpg", shard, rows[:1], (), ("lite",)), 3, 4)
    assert coder.decode(coder.encode((key, b"pixels"))) == (key, b"pixels")
    dead_letter = ([(key, b"p"), (sample, b"p")], (MemoryError, "MemoryError('out of memory')", "traceback"))
    failures = list(embed.inference_failures(dead_letter, "lite"))
    assert [f.to_row() for f in failures] == [
        {
            "id": i,
            "source": f"file:///{i}.jpg",
            "stage": "embed",
            "error_type": "MemoryError",
            "message": "MemoryError('out of memory')",
            "embedder": "lite",
        }
        for i in "ab"
    ]
    assert embed.failures_batch(failures).schema.equals(S.FAILURES_SCHEMA, check_metadata=True)


@pytest.mark.slow
def test_two_view_embedding_is_the_normalised_mean_of_its_normalised_views(tmp_path, tiny_savedmodel):
    from retrieval import embedders, imaging
    from tests.helpers import images

    folder = tmp_path / "photos"
    folder.mkdir()
    shapes = [(90, 30), (30, 80), (64, 48), (50, 50)]  # panorama, portrait, 4:3, square
    for i, (width, height) in enumerate(shapes):
        (folder / f"p{i}.jpg").write_bytes(images.jpeg(width, height, seed=i))
    out = str(tmp_path / "out")
    option = f"--embedder=t={tiny_savedmodel},size=32,resize=pad+crop,pad=black,filter=bicubic"
    assert embed.run([f"--input={folder}/*.jpg", f"--output={out}", option])["status"] == "ok"
    data = tables.read_embeddings(f"{out}/embeddings/t")
    assert (data.spec.resize, data.spec.pad, data.spec.filter) == ("pad+crop", "black", "bicubic")
    model, _ = embedders.complete_spec(embedders.parse_embedder_arg(f"t={tiny_savedmodel},size=32"))
    for item_id, vector in zip(data.ids, data.vectors):
        image = imaging.decode((folder / item_id).read_bytes(), min_size=32).image
        views = [
            imaging.resize(image, 32, imaging.Preprocessing(m, "black", "bicubic")) for m in ("pad", "crop")
        ]
        assert item_id == "p3.jpg" or not np.array_equal(*views)  # off square, two other views
        raw = np.asarray(model(np.stack(views).astype(np.float32) / 255), dtype=np.float64)
        mean = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).mean(axis=0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)
