import json
import os
import stat
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from imgindex import cli
from pipelines import build, build_options
from retrieval import index, run_status, runs
from retrieval.errors import ConfigError, IndexFormatError
from tests.helpers import images


def _argv(tiny, inputs, root, *extra):
    return [*(f"--input={i}" for i in inputs), f"--output={root}", f"--embedder=tiny={tiny},size=32", *extra]


@pytest.fixture(scope="module")
def two_embedder_build(tmp_path_factory, tiny_savedmodel):
    """A published run of 30 photos with a `cls` metadata column and two embedders: "tiny"
    (32 px) and "big" (48 px, centre crop).  Read-only."""
    base = tmp_path_factory.mktemp("two_embedders")
    return build.run(
        [
            f"--input={images.write_folder(base / 'in', 30)}",
            f"--output={base / 'root'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
            f"--embedder=big={tiny_savedmodel},size=48,resize=crop",
            "--metadata=cls",
        ]
    )


@pytest.mark.slow
def test_build_publishes_a_complete_run(two_embedder_build):
    result = two_embedder_build
    root = result.root
    m = result.manifest
    assert runs.read_latest(root) == result.run_dir == runs.run_dir(root, m.run_id)
    assert m.status == "published" and m.gates["passed"] and m.counts["records"] == 30
    on_disk = runs.read_run_manifest(result.run_dir)
    assert on_disk.to_dict() == json.loads(json.dumps(m.to_dict()))
    entry = m.embedders["tiny"]
    assert (entry.n, entry.d, entry.method) == (30, 8, "brute_force")
    assert entry.spec["fingerprint"].startswith("sha256-tree:")
    loaded = index.load_index(os.path.join(result.run_dir, entry.index))
    metadata = pq.read_table(os.path.join(result.run_dir, entry.index, index.METADATA_FILE))
    assert metadata.column("id").to_pylist() == list(loaded.ids)
    assert {"source", "sha256", "width", "height", "cls"} <= set(metadata.column_names)
    assert "embedding" not in metadata.column_names
    # Published runs are immutable: no file can be written, every directory can (retention).
    for parent, _dirs, files in os.walk(result.run_dir):
        assert os.stat(parent).st_mode & stat.S_IWUSR
        assert not [f for f in files if os.stat(os.path.join(parent, f)).st_mode & 0o222]
    assert m.publisher is None and on_disk.publisher is None


@pytest.mark.slow
def test_failure_rate_gate_refuses_and_keeps_the_previous_run(tmp_path, tiny_savedmodel):
    root = str(tmp_path / "root")
    good = build.run(_argv(tiny_savedmodel, [images.write_folder(tmp_path / "good", 20)], root))
    bad_src = images.write_folder(tmp_path / "bad", 10, bad=5)
    with pytest.raises(build.GateError, match="failure rate 0.3333"):
        build.run(_argv(tiny_savedmodel, [bad_src], root, "--max_failure_rate=0.1"))
    assert runs.read_latest(root) == good.run_dir
    refused = [d for d in os.listdir(f"{root}/runs") if d != good.manifest.run_id]
    assert runs.read_run_manifest(f"{root}/runs/{refused[0]}").status == "rejected"
    # The same inputs pass with a looser gate, and the new run is published.
    again = build.run(_argv(tiny_savedmodel, [bad_src], root, "--max_failure_rate=0.5"))
    assert runs.read_latest(root) == again.run_dir != good.run_dir


@pytest.mark.slow
def test_a_publish_that_fails_before_latest_leaves_a_failed_run(tmp_path, tiny_savedmodel):
    root = tmp_path / "root"
    (root / runs.LATEST).mkdir(parents=True)  # LATEST cannot be read, nor replaced
    with pytest.raises(OSError):
        build.run(
            _argv(tiny_savedmodel, [images.write_folder(tmp_path / "in", 6)], str(root), "--reuse_from=none")
        )
    (run_id,) = os.listdir(root / runs.RUNS_DIR)
    manifest = runs.read_run_manifest(runs.run_dir(str(root), run_id))
    assert manifest.status == "failed" and manifest.error.startswith("IsADirectoryError while publishing")
    assert manifest.publisher is None


def test_recall_gate():
    report = {"counts": {"records": 100, "failed_total": 0}, "status": "ok"}
    embedders = {
        "a": SimpleNamespace(recall={"k": 10, "value": 0.91}),
        "b": SimpleNamespace(recall={"k": 10, "value": 0.99}),
    }
    opts = build_options.BuildOptions(flags=["--min_recall=0.95"]).view_as(build_options.BuildOptions)
    gate = build.gates(report, embedders, opts)
    assert not gate["passed"] and gate["reasons"] == [
        "a: recall@10 0.9100 is below --min_recall 0.95; raise the search knobs or lower --min_recall"
    ]
    opts = build_options.BuildOptions(flags=["--min_recall=0.9"]).view_as(build_options.BuildOptions)
    assert build.gates(report, embedders, opts)["passed"]


@pytest.mark.slow
def test_failed_run_is_recorded_and_latest_unchanged(tmp_path, tiny_savedmodel):
    root = str(tmp_path / "root")
    good = build.run(_argv(tiny_savedmodel, [images.write_folder(tmp_path / "a", 12)], root))
    # Three images cannot teach a PCA of 7 axes: the index stage raises after the embedding.
    with pytest.raises(ConfigError, match="needs more than 7 vectors"):
        build.run(_argv(tiny_savedmodel, [images.write_folder(tmp_path / "x", 3)], root, "--pca_dim=7"))
    assert runs.read_latest(root) == good.run_dir
    failed = [d for d in os.listdir(f"{root}/runs") if d != good.manifest.run_id][0]
    manifest = runs.read_run_manifest(f"{root}/runs/{failed}")
    assert manifest.status == "failed" and "needs more than 7 vectors" in manifest.error
    with pytest.raises(Exception, match="not publishable"):
        run_status.publish(root, failed)


@pytest.mark.slow
def test_tuning_queries_measure_the_published_recall(tmp_path, tiny_savedmodel):
    # Held-out queries from a .npy file and from embedding tables of the same embedder.
    root = str(tmp_path / "root")
    queries = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    result = build.run(
        _argv(
            tiny_savedmodel,
            [images.write_folder(tmp_path / "in", 30)],
            root,
            f"--tuning_queries=tiny={tmp_path / 'q.npy'}",
        )
    )
    recall = result.manifest.embedders["tiny"].recall
    assert recall["method"].startswith("held-out: 20 query vectors") and recall["n_queries"] == 20
    assert recall["value"] == 1.0  # brute force is exact
    tables = os.path.join(result.run_dir, runs.EMBEDDINGS_DIR, "tiny")
    again = build.run(
        _argv(
            tiny_savedmodel,
            [images.write_folder(tmp_path / "in2", 30, seed=50)],
            root,
            f"--tuning_queries={tables}",
        )
    )
    assert again.manifest.embedders["tiny"].recall["method"].startswith("held-out: 30 query vectors")


@pytest.mark.slow
def test_tuning_queries_measure_a_sharded_builds_recall(sharded_build):
    # --tuning_queries=PATH (no EMBEDDER=: the run's only embedder) of 20 vectors.
    recall = sharded_build.manifest.embedders["tiny"].recall
    assert recall["method"].startswith("held-out over the merged shards: 20 query vectors")
    assert recall["value"] == 1.0  # brute-force shards
    # Every k of the ladder up to --serve_max_k (100), measured at most at the 40 rows there are.
    assert [(e["k"], e["value"]) for e in recall["per_k"]] == [(10, 1.0), (40, 1.0)]
    assert sharded_build.manifest.embedders["tiny"].search_defaults == {"k": 10, "max_k": 100}


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--min_recall=1.5"], "--min_recall"),
        (["--max_failure_rate=-1"], "--max_failure_rate"),
        (["--run_id=../x"], "--run_id"),
        (["--tuning_queries=other=q.npy"], "unknown embedder 'other'; the run's embedders are \\['tiny'\\]"),
        (["--tuning_queries=/no/such/file.npy"], "is not an existing local file"),
    ],
)
def test_bad_build_options_fail_before_work(tmp_path, tiny_savedmodel, extra, words):
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match=words):
        build.run(_argv(tiny_savedmodel, [str(tmp_path)], str(root), *extra))
    assert not root.exists()


@pytest.mark.slow
def test_cli_build_exit_status_and_summary(tmp_path, tiny_savedmodel, capsys):
    root = str(tmp_path / "root")
    src = images.write_folder(tmp_path / "in", 8, bad=4)
    assert cli.main(["build", *_argv(tiny_savedmodel, [src], root)]) == 3
    assert "refused" in capsys.readouterr().err and runs.read_latest(root) is None
    assert cli.main(["build", *_argv(tiny_savedmodel, [src], root, "--max_failure_rate=0.5")]) == 0
    assert "published" in capsys.readouterr().out and runs.read_latest(root) is not None


@pytest.mark.slow
def test_two_embedders_give_two_indexes_served_side_by_side(two_embedder_build):
    from serving import EmbedderRequiredError, Searcher

    assert sorted(two_embedder_build.manifest.embedders) == ["big", "tiny"]
    searcher = Searcher.open(two_embedder_build.root)
    assert searcher.embedders == ["big", "tiny"]
    with pytest.raises(EmbedderRequiredError, match="big, tiny"):
        searcher.search_id("img003.jpg")
    for name in ("big", "tiny"):
        assert searcher.search_id("img003.jpg", k=1, embedder=name)[0].id == "img003.jpg"


@pytest.mark.parametrize(
    "content, message",
    [
        ("[]", "a JSON list, not an object"),
        ('{"kind": "imgindex.run", "format_version": 1, "run_id": "r"}', "lacks status, inputs, counts"),
        (
            '{"kind": "imgindex.run", "format_version": 1, "run_id": "r", "status": "published", "inputs": {}, '
            '"counts": [], "embedders": {}, "gates": {}, "timings": {}}',
            "damaged: counts has the wrong type",
        ),
    ],
)
def test_damaged_run_manifest_is_a_clear_error(tmp_path, content, message):
    (tmp_path / runs.RUN_MANIFEST).write_text(content)
    with pytest.raises(IndexFormatError, match=message):
        runs.read_run_manifest(str(tmp_path))


def test_publish_replaces_latest_atomically(tmp_path):
    root = tmp_path / "root"
    for run_id in ("r1", "r2"):
        os.makedirs(runs.run_dir(str(root), run_id))
        runs.write_run_manifest(
            runs.run_dir(str(root), run_id),
            runs.RunManifest(
                run_id=run_id, status="published", inputs={}, counts={}, embedders={}, gates={}, timings={}
            ),
        )
        run_status.publish(str(root), run_id)
        assert runs.read_latest(str(root)) == runs.run_dir(str(root), run_id)
    assert sorted(os.listdir(root)) == [runs.LATEST, runs.RUNS_DIR]  # no temporary file left
