"""The incremental nightly build: vectors reused by content, duplicates, deletions, retention.

Real Beam (FnApiRunner), real Parquet, real ScaNN, the tiny real SavedModel of conftest.py.
"""

import glob
import io
import json
import logging
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import build
from pipelines.fetch import ReuseError
from retrieval import runs, tables
from retrieval import schema as S
from retrieval.errors import ConfigError, HandleError
from serving import Searcher, UnknownIdError
from tests.helpers import images

pytestmark = pytest.mark.slow


def _photo(seed):
    return images.jpeg(48 + seed % 7, 40, seed=seed)


def _day(folder, photos, labels):
    """An input of one night: a folder of photos {name: bytes} and a WebDataset shard whose
    samples {key: (bytes, label)} carry a `cls` sidecar."""
    os.makedirs(f"{folder}/photos", exist_ok=True)
    for name, data in photos.items():
        with open(f"{folder}/photos/{name}.jpg", "wb") as f:
            f.write(data)
    with tarfile.open(f"{folder}/w.tar", "w") as tar:
        for key, (data, label) in labels.items():
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))
    return [f"--input={folder}/photos", f"--input={folder}/w.tar"]


def _argv(tiny, inputs, root, *extra):
    return [*inputs, f"--output={root}", f"--embedder=tiny={tiny},size=32", "--metadata=cls:int64", *extra]


def _rows(run_dir, name="tiny"):
    """id -> (row without the embedding, vector) of a run's embedding table."""
    data = tables.read_embeddings(os.path.join(run_dir, runs.EMBEDDINGS_DIR, name), with_columns=True)
    return {row["id"]: (row, data.vectors[i]) for i, row in enumerate(data.columns.to_pylist())}


def _nights(tmp_path):
    day1_photos = {f"img{i:03d}": _photo(i) for i in range(20)}
    day1_labels = {f"w{i}": (_photo(100 + i), i) for i in range(6)}
    day2_photos = dict(day1_photos)
    day2_photos["img003"] = _photo(503)  # replaced
    del day2_photos["img004"]  # deleted
    day2_photos["img020"] = _photo(520)  # added
    day2_photos["img021"] = day1_photos["img000"]  # a new id with content indexed before
    day2_labels = dict(day1_labels)
    day2_labels["w1"] = (day1_labels["w1"][0], 42)  # same bytes, a new caption
    return _day(tmp_path / "day1", day1_photos, day1_labels), _day(
        tmp_path / "day2", day2_photos, day2_labels
    )


def test_incremental_build_equals_a_full_build_and_embeds_only_what_changed(tmp_path, tiny_savedmodel):
    day1, day2 = _nights(tmp_path)
    root = str(tmp_path / "root")
    first = build.run(_argv(tiny_savedmodel, day1, root))
    assert first.manifest.counts["embedders"]["tiny"]["reused"] == 0
    second = build.run(_argv(tiny_savedmodel, day2, root))
    full = build.run(_argv(tiny_savedmodel, day2, str(tmp_path / "full"), "--reuse_from=none"))

    counts = second.manifest.counts["embedders"]["tiny"]
    # img003 and img020 are new content; img021 repeats img000's; img004 is gone.
    assert counts == {
        "rows": 27,
        "reused": 25,
        "embedded": 2,
        "model_inputs": 2,
        "deleted": 1,
        "failed_embed": 0,
    }
    report = second.manifest.counts
    assert report["reuse_source"] == first.run_dir and report["failed_total"] == 0

    before, incremental, rebuilt = _rows(first.run_dir), _rows(second.run_dir), _rows(full.run_dir)
    assert (
        sorted(incremental) == sorted(rebuilt) and "img004.jpg" not in incremental and len(incremental) == 27
    )
    for item_id, (row, vector) in incremental.items():
        full_row, full_vector = rebuilt[item_id]
        assert row == full_row  # id, sha256, source, width, height, metadata: today's input
        np.testing.assert_allclose(vector, full_vector, rtol=0, atol=1e-6)
        if item_id in before and before[item_id][0]["sha256"] == row["sha256"]:
            assert np.array_equal(vector, before[item_id][1])  # reused: bitwise the same
    assert incremental["w1"][0]["cls"] == 42 and before["w1"][0]["cls"] == 1
    assert np.array_equal(incremental["img021.jpg"][1], before["img000.jpg"][1])

    # The index holds today's rows only: a deleted id is unknown to serving.
    searcher = Searcher.open(root)
    assert searcher.run_id == second.manifest.run_id
    assert searcher.info()["embedders"]["tiny"]["n"] == 27
    assert searcher.search_id("img021.jpg", k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UnknownIdError):
        searcher.search_id("img004.jpg")
    # The reused vectors were checked against today's model (at least 16, here every content).
    with open(os.path.join(second.run_dir, "run_report.json")) as f:
        verification = json.load(f)["reuse"]["verification"]["tiny"]
    assert verification["checked"] >= 16 and verification["worst_cosine"] > 1 - 1e-6


def test_identical_images_are_embedded_once_and_every_id_is_served(tmp_path, tiny_savedmodel):
    same = _photo(7)
    photos = {**{f"copy{i}": same for i in range(5)}, **{f"other{i}": _photo(200 + i) for i in range(3)}}
    inputs = _day(tmp_path / "in", photos, {})[:1]
    result = build.run(_argv(tiny_savedmodel, inputs, str(tmp_path / "root")))
    counts = result.manifest.counts
    assert counts["duplicate_content"] == 4 and counts["embedders"]["tiny"]["model_inputs"] == 4
    assert counts["embedders"]["tiny"]["rows"] == 8
    searcher = Searcher.open(str(tmp_path / "root"))
    hits = searcher.search_id("copy3.jpg", k=5)
    assert {hit.id for hit in hits} == {f"copy{i}.jpg" for i in range(5)}
    assert all(hit.score == pytest.approx(1.0, abs=1e-5) for hit in hits)


def test_changing_one_embedders_preprocessing_re_embeds_only_that_embedder(tmp_path, tiny_savedmodel):
    inputs = _day(tmp_path / "in", {f"img{i}": _photo(i) for i in range(12)}, {})[:1]
    root = str(tmp_path / "root")

    def argv(resize):
        return [
            *inputs,
            f"--output={root}",
            f"--embedder=a={tiny_savedmodel},size=32",
            f"--embedder=b={tiny_savedmodel},size=32,resize={resize}",
        ]

    build.run(argv("crop"))
    second = build.run(argv("stretch"))
    counts = second.manifest.counts["embedders"]
    assert (counts["a"]["reused"], counts["a"]["embedded"]) == (12, 0)
    assert (counts["b"]["reused"], counts["b"]["embedded"]) == (0, 12)
    with open(os.path.join(second.run_dir, "run_report.json")) as f:
        status = json.load(f)["reuse"]["embedders"]
    assert status["a"]["status"] == "reused"
    assert "same weights but other preprocessing" in status["b"]["status"]
    assert "resize=crop" in status["b"]["status"] and "resize=stretch" in status["b"]["status"]


def _as_written_before_pad_and_filter(run_dir):
    """Rewrites a run's tables as imgindex wrote them before pad colours and filters existed:
    no `pad`/`filter` in the embedder spec, and the pixels rule of that time."""
    for path in glob.glob(os.path.join(run_dir, runs.EMBEDDINGS_DIR, "*", "*.parquet")):
        table = pq.read_table(path)
        spec = json.loads(table.schema.metadata[S.EMBEDDER_KEY])
        assert spec.pop("pad") == "grey" and spec.pop("filter") == "bilinear"
        spec["pixels"] = "pillow-rgb/1: EXIF upright, alpha on white, JPEG draft, bilinear, pad 127"
        metadata = {**table.schema.metadata, S.EMBEDDER_KEY: json.dumps(spec, sort_keys=True).encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)


def test_tables_from_before_the_preprocessing_change_are_never_mixed_with_new_vectors(
    tmp_path, tiny_savedmodel
):
    """Yesterday's tables (the old default: grey pad, bilinear) are reused only by an embedder
    asking for exactly that preprocessing; the new default re-embeds and says why."""
    inputs = _day(tmp_path / "in", {f"img{i}": _photo(i) for i in range(12)}, {})[:1]
    root = str(tmp_path / "root")

    def argv(options):
        return [*inputs, f"--output={root}", f"--embedder=a={tiny_savedmodel},size=32{options}"]

    first = build.run(argv(",resize=pad,pad=grey,filter=bilinear"))
    _as_written_before_pad_and_filter(first.run_dir)
    same_rules = build.run(argv(",resize=pad,pad=grey,filter=bilinear"))
    counts = same_rules.manifest.counts["embedders"]["a"]
    assert (counts["reused"], counts["embedded"]) == (12, 0)
    _as_written_before_pad_and_filter(same_rules.run_dir)
    new_default = build.run(argv(""))
    counts = new_default.manifest.counts["embedders"]["a"]
    assert (counts["reused"], counts["embedded"]) == (0, 12)
    with open(os.path.join(new_default.run_dir, "run_report.json")) as f:
        status = json.load(f)["reuse"]["embedders"]["a"]["status"]
    assert "same weights but other preprocessing" in status and "pad 127" in status


def test_duplicate_ids_fail_before_the_model_and_name_both_sources(tmp_path, tiny_savedmodel):
    a = _day(tmp_path / "a", {f"img{i}": _photo(i) for i in range(4)}, {})[:1]
    b = _day(tmp_path / "b", {"img1": _photo(50)}, {})[:1]
    root = str(tmp_path / "root")
    with pytest.raises(build.GateError, match="failure rate 0.2000"):
        build.run(_argv(tiny_savedmodel, a + b, root))
    run_dir = os.path.join(root, runs.RUNS_DIR, os.listdir(os.path.join(root, runs.RUNS_DIR))[0])
    failures = pq.read_table(os.path.join(run_dir, runs.FAILURES_DIR)).to_pylist()
    assert (
        len(failures) == 1 and failures[0]["stage"] == "read" and failures[0]["error_type"] == "DuplicateId"
    )
    assert "a/photos/img1.jpg" in failures[0]["message"] and "b/photos/img1.jpg" in failures[0]["message"]
    assert failures[0]["source"].endswith("b/photos/img1.jpg")
    manifest = runs.read_run_manifest(run_dir)
    assert manifest.counts["duplicate_ids"] == 1 and manifest.counts["embedders"]["tiny"]["model_inputs"] == 4


def test_a_damaged_previous_table_is_embedded_in_full(tmp_path, tiny_savedmodel):
    day1, day2 = _nights(tmp_path)
    root = str(tmp_path / "root")
    first = build.run(_argv(tiny_savedmodel, day1, root))
    table_dir = os.path.join(first.run_dir, runs.EMBEDDINGS_DIR, "tiny")
    for name in os.listdir(table_dir):
        os.chmod(os.path.join(table_dir, name), 0o644)  # published runs are read-only
        with open(os.path.join(table_dir, name), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)  # no footer any more
    second = build.run(_argv(tiny_savedmodel, day2, root))
    counts = second.manifest.counts["embedders"]["tiny"]
    assert (counts["reused"], counts["embedded"], counts["rows"]) == (0, 27, 27)
    with open(os.path.join(second.run_dir, "run_report.json")) as f:
        status = json.load(f)["reuse"]["embedders"]["tiny"]["status"]
    assert status.startswith("embedded in full: the previous table") and "damaged" in status


def test_the_verification_sample_catches_a_perturbed_previous_table(tmp_path, tiny_savedmodel):
    day1, day2 = _nights(tmp_path)
    root = str(tmp_path / "root")
    first = build.run(_argv(tiny_savedmodel, day1, root))
    table_dir = os.path.join(first.run_dir, runs.EMBEDDINGS_DIR, "tiny")
    for name in os.listdir(table_dir):
        path = os.path.join(table_dir, name)
        os.chmod(path, 0o644)  # published runs are read-only
        table = pq.read_table(path)
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        vectors[:, 0] += 1e-2  # what another TensorFlow build might have made
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        index = table.schema.get_field_index("embedding")
        pq.write_table(table.set_column(index, table.schema.field(index), column), path)
    with pytest.raises(ReuseError, match="differs from today's embedding"):
        build.run(_argv(tiny_savedmodel, day2, root))
    assert runs.read_latest(root) == first.run_dir
    failed = [r for r in os.listdir(os.path.join(root, runs.RUNS_DIR)) if r != first.manifest.run_id]
    manifest = runs.read_run_manifest(os.path.join(root, runs.RUNS_DIR, failed[0]))
    assert manifest.status == "failed" and "ReuseError" in manifest.error


def test_reuse_from_a_path_and_bad_configuration_before_any_run_directory(tmp_path, tiny_savedmodel):
    day1, day2 = _nights(tmp_path)
    first = build.run(_argv(tiny_savedmodel, day1, str(tmp_path / "elsewhere")))
    root = str(tmp_path / "root")
    table_dir = os.path.join(first.run_dir, runs.EMBEDDINGS_DIR, "tiny")
    result = build.run(_argv(tiny_savedmodel, day2, root, f"--reuse_from={table_dir}"))
    assert result.manifest.counts["embedders"]["tiny"]["reused"] == 25
    run_count = len(os.listdir(os.path.join(root, runs.RUNS_DIR)))
    for flags, error, message in (
        ([f"--reuse_from={tmp_path / 'nowhere'}"], ConfigError, "does not exist"),
        ([f"--reuse_from={tmp_path / 'day1'}"], ConfigError, "holds no embedding tables"),
        (["--keep_runs=1"], ConfigError, "keep_runs must be 0"),
        (["--verify_reuse_fraction=2"], ConfigError, r"must be in \[0, 1\]"),
    ):
        with pytest.raises(error, match=message):
            build.run(_argv(tiny_savedmodel, day2, root, *flags))
    with pytest.raises(HandleError):
        build.run([*day2, f"--output={root}", f"--embedder=x={tmp_path / 'no-model'}"])
    assert len(os.listdir(os.path.join(root, runs.RUNS_DIR))) == run_count


def test_retention_keeps_the_newest_runs_and_records_what_it_deleted(tmp_path, tiny_savedmodel, caplog):
    inputs = _day(tmp_path / "in", {f"img{i}": _photo(i) for i in range(6)}, {})[:1]
    root = str(tmp_path / "root")
    results = [build.run(_argv(tiny_savedmodel, inputs, root, "--keep_runs=2")) for _ in range(4)]
    # Beam does not see build's own flags; their "Unparseable argument" warnings are dropped
    # (Beam logs each message once per process, so the filter is checked directly too).
    assert not [r for r in caplog.records if "Unparseable argument" in r.getMessage()]
    beam_options_log = logging.getLogger("apache_beam.options.pipeline_options")

    def passes(message):
        record = logging.LogRecord(beam_options_log.name, logging.WARNING, __file__, 0, message, (), None)
        return all(f.filter(record) for f in beam_options_log.filters)

    assert not passes("Unparseable argument: --keep_runs=2. Did you mean '--dry_run'?'")
    assert not passes("Unparseable argument: --min_recall=0.9")
    assert passes("Unparseable argument: --not_a_flag=1")
    kept = sorted(os.listdir(os.path.join(root, runs.RUNS_DIR)))
    assert kept == [r.manifest.run_id for r in results[-2:]]
    last = runs.read_run_manifest(results[-1].run_dir)
    assert [d["run_id"] for d in last.retention["deleted"]] == [results[1].manifest.run_id]
    assert runs.read_latest(root) == results[-1].run_dir


def test_incremental_build_on_the_multi_processing_runner(tmp_path, tiny_savedmodel):
    day1, day2 = _nights(tmp_path)
    root = str(tmp_path / "root")
    flags = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
    first = build.run(_argv(tiny_savedmodel, day1, root, *flags))
    second = build.run(_argv(tiny_savedmodel, day2, root, *flags))
    counts = second.manifest.counts["embedders"]["tiny"]
    assert (counts["rows"], counts["reused"], counts["embedded"], counts["deleted"]) == (27, 25, 2, 1)
    before, after = _rows(first.run_dir), _rows(second.run_dir)
    assert all(np.array_equal(after[i][1], before[i][1]) for i in after if i in before and i != "img003.jpg")
    shutil.rmtree(root)
