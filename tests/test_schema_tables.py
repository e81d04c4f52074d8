import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval import schema as S
from retrieval import tables
from retrieval.embedders import EmbedderSpec
from retrieval.errors import ConfigError

SPEC = EmbedderSpec(
    name="lite", handle="builtin:efficientnet-lite0", fingerprint="sha256:ab+exporter:1", dim=4
)


def write(path, n, spec=SPEC, seed=0, prefix="img"):
    vectors = np.random.default_rng(seed).normal(size=(n, spec.dim)).astype(np.float32)
    ids = [f"{prefix}{i}" for i in range(n)]
    tables.write_embeddings(
        str(path),
        spec,
        ids,
        vectors,
        sha256s=[f"{i:064x}" for i in range(n)],
        sources=[f"file:///shard.tfrecord#{i}" for i in range(n)],
        widths=[640] * n,
        heights=[480] * n,
        row_group_size=7,
    )
    return ids, vectors


def test_round_trip_into_preallocated_matrix(tmp_path):
    ids_a, vec_a = write(tmp_path / "a.parquet", 23)
    ids_b, vec_b = write(tmp_path / "b.parquet", 5, seed=1, prefix="other")
    data = tables.read_embeddings(str(tmp_path))
    assert data.spec == SPEC
    assert data.vectors.dtype == np.float32 and data.vectors.flags["C_CONTIGUOUS"]
    by_id = dict(zip(data.ids, data.vectors))
    for i, v in zip(ids_a + ids_b, np.concatenate([vec_a, vec_b])):
        np.testing.assert_array_equal(by_id[i], v)
    assert len(data.ids) == 28


def test_table_reads_with_pyarrow_and_pandas_and_carries_the_spec(tmp_path):
    write(tmp_path / "a.parquet", 3)
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert json.loads(table.schema.metadata[S.EMBEDDER_KEY])["fingerprint"] == SPEC.fingerprint
    frame = table.to_pandas()
    assert list(frame.columns) == list(S.FIXED_COLUMNS)
    assert frame["width"].tolist() == [640] * 3 and len(frame["embedding"][0]) == 4


def test_tables_from_different_embedders_are_refused(tmp_path):
    write(tmp_path / "a.parquet", 3)
    other = EmbedderSpec(name="lite", handle="x", fingerprint="sha256:cd", dim=4)
    write(tmp_path / "b.parquet", 3, spec=other)
    with pytest.raises(ConfigError, match="one index per embedder"):
        tables.read_embeddings(str(tmp_path))


@pytest.mark.parametrize("change", [{"resize": "pad"}, {"pad": "black"}, {"filter": "lanczos"}])
def test_tables_of_the_same_weights_with_other_preprocessing_are_refused(tmp_path, change):
    write(tmp_path / "a.parquet", 3)
    write(tmp_path / "b.parquet", 3, spec=dataclasses.replace(SPEC, **change), prefix="other")
    with pytest.raises(ConfigError, match="different preprocessing") as err:
        tables.read_embeddings(str(tmp_path))
    assert f"{next(iter(change))}={next(iter(change.values()))}" in str(err.value)


def test_a_spec_recorded_before_pad_and_filter_existed_means_grey_and_bilinear():
    old = {k: v for k, v in SPEC.to_dict().items() if k not in ("pad", "filter")}
    legacy = EmbedderSpec.from_dict({**old, "resize": "crop"})
    assert (legacy.resize, legacy.pad, legacy.filter) == ("crop", "grey", "bilinear")
    assert EmbedderSpec.from_dict(SPEC.to_dict()) == SPEC


def test_foreign_parquet_is_refused_with_reason(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match="not an imgindex embedding table"):
        tables.read_embeddings(str(tmp_path / "x.parquet"))


def test_wrong_column_type_is_named():
    schema = S.embedding_schema(SPEC)
    bad = schema.set(schema.get_field_index("width"), pa.field("width", pa.string()))
    with pytest.raises(ConfigError, match="'width' has type string"):
        S.check_embedding_schema(bad)


def test_metadata_columns_cannot_shadow_fixed_ones():
    with pytest.raises(ConfigError, match="clash"):
        S.embedding_schema(SPEC, (pa.field("id", pa.int64()),))


def test_failure_rows_fit_the_failures_schema():
    failures = [
        S.Failure.of("gs://b/s.tar#x.jpg", "decode", ValueError("bad huffman"), id="x"),
        S.Failure.of("file:///a.jpg", "read", "empty file"),
        S.Failure.of("file:///b.jpg", "embed", KeyError(), embedder="lite"),
    ]
    table = pa.Table.from_pylist([f.to_row() for f in failures], schema=S.FAILURES_SCHEMA)
    assert table.column("error_type").to_pylist() == ["ValueError", "Invalid", "KeyError"]
    assert table.to_pylist()[0] == {
        "id": "x",
        "source": "gs://b/s.tar#x.jpg",
        "stage": "decode",
        "error_type": "ValueError",
        "message": "bad huffman",
        "embedder": None,
    }
    assert table.column("message").to_pylist()[2] == "KeyError()"  # an empty str() falls back to repr()
    assert table.column("embedder").to_pylist() == [None, None, "lite"]
    with pytest.raises(ValueError, match="stage"):
        S.Failure.of("s", "teleport", "x")


def test_failure_messages_are_cut_and_failures_pickle():
    import pickle

    failure = S.Failure.of("s", "read", "x" * 5000, id="i")
    assert len(failure.message) == S.MAX_FAILURE_MESSAGE == 2000
    assert pickle.loads(pickle.dumps(failure)) == failure


def test_tuning_queries_must_share_the_index_preprocessing_but_not_its_decode_size(tmp_path):
    for name in ("same", "other", "foreign"):
        (tmp_path / name).mkdir()
    write(tmp_path / "same" / "q.parquet", 4, spec=dataclasses.replace(SPEC, decode_size=260))
    assert tables.load_tuning_queries(str(tmp_path / "same"), SPEC).shape == (4, SPEC.dim)
    write(tmp_path / "other" / "q.parquet", 4, spec=dataclasses.replace(SPEC, resize="pad"))
    with pytest.raises(ConfigError, match="other preprocessing.*resize=pad.*resize=crop"):
        tables.load_tuning_queries(str(tmp_path / "other"), SPEC)
    foreign = dataclasses.replace(SPEC, fingerprint="sha256:other")
    write(tmp_path / "foreign" / "q.parquet", 4, spec=foreign)
    with pytest.raises(ConfigError, match="embed the queries with the same embedder"):
        tables.load_tuning_queries(str(tmp_path / "foreign"), SPEC)
