"""`imgindex embed` and `imgindex build` on object storage, against a real S3-compatible
server (moto on 127.0.0.1, the `s3_server` fixture): s3:// inputs, tables and run root;
reuse from the previous s3:// run; the publish order under a kill; retention on the store;
one-line errors for a missing bucket, wrong credentials and an unreachable endpoint.  The
published s3:// index holds the same ids and vectors as a local build of the same input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imgindex import cli
from pipelines import build, embed
from retrieval import killpoints, retention, runs, storage
from tests.helpers import images

REPO = Path(__file__).resolve().parents[1]
BUCKET = "imgindex-s3-pipelines"
FIRST, SECOND = "20260101T000000Z-s3aaaa", "20260101T000100Z-s3bbbb"


def _upload_folder(s3_server, folder, bucket, prefix):
    client = s3_server.client()
    for name in sorted(os.listdir(folder)):
        client.upload_file(os.path.join(folder, name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


def _build_argv(s3_server, tiny, inputs, root, *extra):
    return [
        f"--input={inputs}",
        f"--output={root}",
        f"--embedder=tiny={tiny},size=32",
        *s3_server.beam_flags(),
        *extra,
    ]


def _download_run(run_uri, local):
    """Every object of a published run, copied to `local` (checked on the way by SHA-256
    below, through runs.open_index)."""
    for obj in storage.list_prefix(run_uri):
        storage.download(obj.path, os.path.join(local, obj.path[len(run_uri) + 1 :]))
    return str(local)


def _vectors_by_id(run_directory, name="tiny"):
    manifest = runs.read_run_manifest(run_directory)
    index = runs.open_index(run_directory, name, manifest.embedders[name])
    stored = index.stored_vectors()
    return {str(i): np.asarray(stored[row]) for row, i in enumerate(index.ids)}


def _same_index(s3_server, remote_run, local_run, tmp_path):
    # A local build hands its own options (no S3 flags) to Beam's FileSystems: configure again.
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    remote = _vectors_by_id(_download_run(remote_run, tmp_path / "downloaded"))
    local = _vectors_by_id(local_run)
    assert sorted(remote) == sorted(local)
    for item_id, vector in local.items():
        np.testing.assert_allclose(remote[item_id], vector, rtol=0, atol=1e-6)


@pytest.fixture(autouse=True)
def _configured(s3_server):
    """Beam's FileSystems holds one set of options per process, and every pipeline replaces
    it (a local build's has no S3 flags): each test starts configured for the server."""
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory, tiny_savedmodel):
    """(bucket URI, s3:// input prefix, local input folder): 8 photos on the store."""
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    bucket = s3_server.make_bucket(BUCKET)
    folder = images.write_folder(tmp_path_factory.mktemp("s3_in") / "photos", 8)
    return bucket, _upload_folder(s3_server, folder, BUCKET, "photos"), folder


@pytest.fixture(scope="module")
def first_build(store, s3_server, tiny_savedmodel):
    bucket, inputs, _ = store
    root = f"{bucket}/root"
    result = build.run(_build_argv(s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, f"--run_id={FIRST}"))
    return root, result


@pytest.mark.slow
def test_embed_from_s3_inputs_to_s3_output(store, s3_server, tiny_savedmodel):
    bucket, inputs, _ = store
    output = f"{bucket}/embed-out"
    report = embed.run(
        [
            f"--input={inputs}/*.jpg",
            f"--output={output}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
            *s3_server.beam_flags(),
        ]
    )
    assert report["counts"]["records"] == 8 and report["embedders"]["tiny"]["rows"] == 8
    keys = s3_server.keys(BUCKET, "embed-out/")
    assert "embed-out/run_report.json" in keys
    assert any(k.startswith("embed-out/embeddings/tiny/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("embed-out/failures/") for k in keys)
    assert json.loads(storage.read_bytes(f"{output}/run_report.json"))["counts"]["records"] == 8


@pytest.mark.slow
def test_build_publishes_to_an_s3_root_like_a_local_build(
    first_build, store, s3_server, tiny_savedmodel, tmp_path
):
    root, result = first_build
    _, _, folder = store
    assert result.manifest.status == runs.PUBLISHED
    assert storage.read_bytes(f"{root}/LATEST") == f"runs/{FIRST}\n".encode()
    run = runs.run_dir(root, FIRST)
    keys = s3_server.keys(BUCKET, f"root/runs/{FIRST}/")
    assert f"root/runs/{FIRST}/run_manifest.json" in keys
    assert f"root/runs/{FIRST}/run_report.json" in keys
    assert f"root/runs/{FIRST}/index/tiny/manifest.json" in keys
    assert not [k for k in keys if "/." in k]  # no scratch left on the store
    assert runs.read_run_manifest(run).status == runs.PUBLISHED
    local = build.run(
        [
            f"--input={folder}/*.jpg",
            f"--output={tmp_path / 'local'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
        ]
    )
    _same_index(s3_server, run, local.run_dir, tmp_path)


@pytest.mark.slow
def test_second_build_reuses_the_previous_s3_run(first_build, store, s3_server, tiny_savedmodel, tmp_path):
    root, _ = first_build
    bucket, inputs, _ = store
    extra = images.write_folder(tmp_path / "more", 2, seed=100)
    client = s3_server.client()
    for name in os.listdir(extra):
        client.upload_file(os.path.join(extra, name), BUCKET, f"photos2/new-{name}")
    argv = _build_argv(s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, f"--run_id={SECOND}")
    result = build.run([*argv, f"--input={bucket}/photos2/*.jpg"])
    counts = result.manifest.counts["embedders"]["tiny"]
    assert (counts["rows"], counts["reused"], counts["embedded"]) == (10, 8, 2)
    assert result.manifest.counts["reuse_source"] == runs.run_dir(root, FIRST)
    assert storage.read_bytes(f"{root}/LATEST") == f"runs/{SECOND}\n".encode()
    assert runs.read_latest(root) == runs.run_dir(root, SECOND)
    # the previous run is kept (the one before LATEST's) and its status stays true
    assert runs.read_run_manifest(runs.run_dir(root, FIRST)).status == runs.PUBLISHED


@pytest.mark.slow
def test_sharded_build_on_s3_matches_a_local_sharded_build(store, s3_server, tiny_savedmodel, tmp_path):
    bucket, inputs, folder = store
    root = f"{bucket}/sharded"
    queries = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    storage.upload(str(tmp_path / "q.npy"), f"{bucket}/queries/q.npy")
    flags = ["--index_shards=2", "--reuse_from=none"]
    result = build.run(
        _build_argv(
            s3_server,
            tiny_savedmodel,
            f"{inputs}/*.jpg",
            root,
            *flags,
            f"--tuning_queries={bucket}/queries/q.npy",
        )
    )
    entry = result.manifest.embedders["tiny"]
    assert entry.shards == 2 and entry.n == 8
    assert entry.recall["method"].startswith("held-out over the merged shards: 10 query vectors")
    keys = s3_server.keys(BUCKET, "sharded/")
    assert not [k for k in keys if "/." in k]  # the partitions are gone
    local = build.run(
        [
            f"--input={folder}/*.jpg",
            f"--output={tmp_path / 'local'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
            *flags,
            f"--tuning_queries={tmp_path / 'q.npy'}",
        ]
    )
    _same_index(s3_server, result.run_dir, local.run_dir, tmp_path)


@pytest.mark.slow
def test_a_build_killed_before_latest_leaves_the_old_run_published(
    first_build, store, s3_server, tiny_savedmodel, tmp_path
):
    root, _ = first_build
    _, inputs, _ = store
    before_latest = storage.read_bytes(f"{root}/LATEST")
    old_run = runs.read_latest(root)
    old_objects = [(o.path, o.size) for o in storage.list_prefix(old_run)]
    killed = "20260101T000200Z-killed"
    flag = tmp_path / "reached"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        killpoints.ENV: "publishing",
        killpoints.FILE_ENV: str(flag),
    }
    argv = [sys.executable, "-m", "imgindex.cli", "build"]
    argv += _build_argv(s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, f"--run_id={killed}")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"the build ended ({proc.returncode}) before publishing: {proc.stderr.read().decode()}"
                )
            assert time.monotonic() < deadline, "the build did not reach 'publishing'"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    # killed after its run manifest ("publishing") and before LATEST: nothing moved
    assert runs.read_run_manifest(runs.run_dir(root, killed)).status == runs.PUBLISHING
    assert storage.read_bytes(f"{root}/LATEST") == before_latest
    assert [(o.path, o.size) for o in storage.list_prefix(old_run)] == old_objects
    assert runs.read_run_manifest(old_run).status == runs.PUBLISHED
    # its true status: failed (its publisher is gone, LATEST does not name it)
    listed = {info.run_id: info.status for info in retention.output_root.list_runs(root)}
    assert listed[killed] == runs.FAILED


def _fake_run(root, run_id, status, files=("index/x/a.bin",)):
    directory = runs.run_dir(root, run_id)
    for rel in files:
        storage.put_bytes(storage.join(directory, rel), b"x" * 10)
    if status is not None:
        manifest = runs.RunManifest(
            run_id=run_id,
            status=status,
            inputs={},
            counts={},
            embedders={},
            gates={},
            timings={},
            created_at=f"{run_id[:4]}-{run_id[4:6]}-{run_id[6:8]}T00:00:00+00:00",
        )
        runs.write_run_manifest(directory, manifest)
    return directory


@pytest.mark.slow
def test_retention_deletes_old_runs_on_the_store(store, s3_server):
    bucket, _, _ = store
    root = f"{bucket}/retention"
    ids = [f"2026010{i}T000000Z-ret00{i}" for i in range(1, 6)]
    for run_id in ids:
        _fake_run(root, run_id, runs.PUBLISHED)
    failed = _fake_run(root, "20251201T000000Z-fail00", runs.FAILED)
    unfinished = _fake_run(root, "20251202T000000Z-kill00", None)
    _fake_run(
        root, "20251203T000000Z-pub000", runs.PUBLISHED, files=("index/x/a.bin", "index/x/.partitions/p")
    )
    storage.put_bytes(f"{root}/LATEST", f"runs/{ids[3]}\n".encode())  # not the newest: a rollback
    report = retention.apply_retention(root, keep_runs=3, keep_failed_hours=0)
    assert not report.errors
    left = {k.split("/")[2] for k in s3_server.keys(BUCKET, "retention/runs/")}
    # LATEST's run, the one before it, the newer published one; of the rest, none (3 kept)
    assert left == {ids[2], ids[3], ids[4]}
    deleted = {e.run_id for e in report.deleted}
    assert {failed.rsplit("/", 1)[1], unfinished.rsplit("/", 1)[1], ids[0], ids[1]} <= deleted
    assert storage.read_bytes(f"{root}/LATEST") == f"runs/{ids[3]}\n".encode()


def _cli_error(argv, capsys):
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


def test_missing_bucket_is_one_clear_line(s3_server, tiny_savedmodel, capsys, tmp_path):
    inputs = images.write_folder(tmp_path / "in", 2)
    argv = ["build", *_build_argv(s3_server, tiny_savedmodel, inputs, "s3://no-such-bucket-imgindex/root")]
    code, err = _cli_error(argv, capsys)
    assert code == 2
    assert err.startswith("imgindex build: error: s3://no-such-bucket-imgindex") and err.count("\n") == 1
    assert "Traceback" not in err and "--s3_endpoint_url" in err


def test_unreachable_endpoint_is_one_clear_line(s3_server, tiny_savedmodel, capsys, tmp_path):
    inputs = images.write_folder(tmp_path / "in", 2)
    flags = [f for f in s3_server.beam_flags() if not f.startswith("--s3_endpoint_url")]
    argv = ["build", f"--input={inputs}", f"--output=s3://{BUCKET}/x", f"--embedder=tiny={tiny_savedmodel}"]
    try:
        code, err = _cli_error([*argv, *flags, "--s3_endpoint_url=http://127.0.0.1:9"], capsys)
    finally:
        storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    assert code == 2 and err.startswith("imgindex build: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_wrong_credentials_are_one_clear_line(s3_auth_server, s3_server, tiny_savedmodel, capsys, tmp_path):
    inputs = images.write_folder(tmp_path / "in", 2)
    argv = ["build", *_build_argv(s3_auth_server, tiny_savedmodel, inputs, "s3://some-bucket/root")]
    try:
        code, err = _cli_error(argv, capsys)
    finally:
        storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    assert code == 2 and err.startswith("imgindex build: error: s3://some-bucket") and err.count("\n") == 1
    assert "Traceback" not in err
    assert "InvalidAccessKeyId" in err or "Access Key" in err or "403" in err, err


def test_missing_tuning_queries_on_the_store_fail_before_work(store, s3_server, tiny_savedmodel):
    bucket, inputs, _ = store
    root = f"{bucket}/never"
    argv = _build_argv(
        s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, f"--tuning_queries={bucket}/absent.npy"
    )
    with pytest.raises(build.ConfigError, match="--tuning_queries"):
        build.run(argv)
    assert s3_server.keys(BUCKET, "never/") == []


@pytest.mark.slow
def test_searcher_serves_the_builds_of_an_s3_root_and_swaps_to_the_next_night(
    store, s3_server, tiny_savedmodel, tmp_path
):
    """End to end on the store: `imgindex build` publishes, `Searcher.open` serves that root
    from its verified copy, and the next night's incremental build is swapped in."""
    from serving import Searcher

    bucket, inputs, folder = store
    root = f"{bucket}/e2e"
    first = build.run(_build_argv(s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, "--run_id=n1"))
    local = build.run(
        [
            f"--input={folder}/*.jpg",
            f"--output={tmp_path / 'local'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
        ]
    )
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    searcher = Searcher.open(root, storage_flags=s3_server.beam_flags(), cache_dir=str(tmp_path / "cache"))
    reference = Searcher.open(local.run_dir)
    assert searcher.info()["run_id"] == first.manifest.run_id == "n1"
    for item_id in sorted(_vectors_by_id(local.run_dir))[:3]:
        got, want = searcher.search_id(item_id, k=5), reference.search_id(item_id, k=5)
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    extra = images.write_folder(tmp_path / "more", 2, seed=200)
    for name in os.listdir(extra):
        s3_server.client().upload_file(os.path.join(extra, name), BUCKET, f"e2e-more/new-{name}")
    argv = _build_argv(s3_server, tiny_savedmodel, f"{inputs}/*.jpg", root, "--run_id=n2")
    second = build.run([*argv, f"--input={bucket}/e2e-more/*.jpg"])
    assert second.manifest.counts["embedders"]["tiny"]["reused"] == 8
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    assert searcher.refresh() is True
    assert searcher.info()["run_id"] == "n2" and searcher.info()["embedders"]["tiny"]["n"] == 10
