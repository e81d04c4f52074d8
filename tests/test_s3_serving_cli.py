"""`imgindex serve s3://...` against moto's real S3 server on 127.0.0.1: the store's flags,
a hot swap when LATEST moves, a broken run refused while the old one keeps serving, and one
clear line (exit 2) when the store cannot be used at start."""

import os
import signal
import subprocess
import sys

import pytest

from retrieval import storage
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call
from tests.helpers.s3 import point_latest, upload_run
from tests.helpers.serve_process import serving

RUN1 = "20260201T000000Z-aaaaaa"
RUN2 = "20260202T000000Z-bbbbbb"


@pytest.fixture
def bucket(s3_server):
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    return s3_server.make_bucket("serve-cli-test")


def serve_once(*args):
    """`imgindex serve` that is expected to fail at start: (exit status, stderr lines)."""
    proc = subprocess.run(
        [sys.executable, "-m", "imgindex.cli", "serve", *args, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.slow
def test_serve_follows_an_s3_root_and_keeps_serving_through_a_broken_run(bucket, s3_server, tmp_path):
    local = tmp_path / "local"
    run1 = rf.write_run(local, {"v": rf.vector_embedder("v", 100, 8, seed=1)}, run_id=RUN1)
    root = storage.join(bucket, "out")
    upload_run(run1, root)
    cache = tmp_path / "cache"
    flags = [*s3_server.beam_flags(), f"--cache_dir={cache}", "--refresh_seconds=0.3"]
    with serving(root, *flags) as server:
        start = server.wait_for_line("INFO serving.http: serving run")[0]
        assert f"serving run {RUN1} of {root} (embedders: v)" in start
        assert server.wait_for_line(rf"copied run {RUN1} of {root} to .*: \d+ files, \d+ bytes downloaded")
        status, body = call(server.url, "/v1/search", {"id": "v-00001", "k": 1})
        assert status == 200 and body["hits"][0]["id"] == "v-00001" and body["run_id"] == RUN1
        index = call(server.url, "/v1/index")[1]
        assert index["root"] == "." and index["run_dir"] == f"runs/{RUN1}"
        assert str(cache) not in str(index)  # no server paths
        # A new run, LATEST moved: swapped in, the old run pruned only once it is two back.
        run2 = rf.write_run(local, {"v": rf.vector_embedder("v", 120, 8, seed=2)}, run_id=RUN2)
        upload_run(run2, root)
        server.wait_for_line(rf"INFO serving\.searcher: now serving run {RUN2}, was {RUN1}")
        assert call(server.url, "/v1/healthz")[1]["run_id"] == RUN2
        # LATEST naming a run whose files are not there: one line, the old run serves.
        point_latest(root, "20260203T000000Z-gone03")
        failed = server.wait_for_line(
            r"ERROR serving\.searcher: refresh failed to load 20260203T000000Z-gone03"
        )
        assert (
            f"still serving run {RUN2}: IndexFormatError: run 20260203T000000Z-gone03 is incomplete"
            in failed[0]
        )
        assert call(server.url, "/v1/search", {"id": "v-00110", "k": 1})[1]["run_id"] == RUN2
        assert server.stop(signal.SIGTERM) == 0
    lines = server.log()
    assert all(line[:4].isdigit() for line in lines), "\n".join(lines)  # one line per event


def test_serve_refuses_a_store_it_cannot_use_with_one_line(bucket, s3_server, tmp_path):
    flags = [*s3_server.beam_flags(), f"--cache_dir={tmp_path / 'cache'}"]
    code, lines = serve_once("s3://no-such-bucket-cli/out", *flags)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        "imgindex serve: error: s3://no-such-bucket-cli: cannot use the bucket: the bucket no-such-bucket-cli does not exist"
    )
    assert "--s3_endpoint_url" in lines[0]
    unreachable = [f for f in flags if not f.startswith("--s3_endpoint_url")]
    code, lines = serve_once(
        "s3://serve-cli-test/out",
        *unreachable,
        "--s3_endpoint_url=http://127.0.0.1:9",
        "--store_timeout_seconds=2",
    )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(
        "imgindex serve: error: s3://serve-cli-test: cannot use the bucket: Could not connect"
    )
    code, lines = serve_once("s3://serve-cli-test/out", *flags)
    assert code == 2 and len(lines) == 1, lines
    assert "s3://serve-cli-test/out has no LATEST: no run is published there yet" in lines[0]


def test_serve_refuses_wrong_credentials_with_one_line(s3_auth_server, tmp_path):
    code, lines = serve_once(
        "s3://imgs/out",
        f"--s3_endpoint_url={s3_auth_server.endpoint}",
        "--s3_access_key_id=AKIAWRONGWRONGWRONG1",
        "--s3_secret_access_key=wrong",
        "--s3_region_name=us-east-1",
        f"--cache_dir={tmp_path}",
    )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("imgindex serve: error: s3://imgs: cannot use the bucket: access denied (403)")


def test_serve_help_lists_the_store_options():
    out = subprocess.run(
        [sys.executable, "-m", "imgindex.cli", "serve", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for flag in (
        "--cache_dir",
        "--store_timeout_seconds",
        "--s3_endpoint_url",
        "--s3_access_key_id",
        "--s3_secret_access_key",
        "--s3_region_name",
        "--project",
    ):
        assert flag in out


def _cli(*argv):
    proc = subprocess.run(
        [sys.executable, "-m", "imgindex.cli", *argv], capture_output=True, text=True, timeout=180
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_runs_and_query_take_the_store_flags_inspect_says_what_to_use(bucket, s3_server, tmp_path):
    local = tmp_path / "local"
    rf.write_run(local, {"v": rf.vector_embedder("v", 100, 8, seed=1)}, run_id=RUN1)
    root = storage.join(bucket, "root")
    upload_run(local / "runs" / RUN1, root)
    flags = s3_server.beam_flags()
    code, out, err = _cli("runs", root, *flags)
    assert code == 0, err
    assert out.splitlines()[1].startswith(f"* {RUN1}") and "published" in out and "v=100" in out
    code, out, err = _cli(
        "query", root, "--id", "v-00001", "--k", "3", *flags, f"--cache_dir={tmp_path / 'c'}"
    )
    assert code == 0, err
    assert out.splitlines()[1].split()[:2] == ["1", "1.0000"] and "v-00001" in out.splitlines()[1]
    code, out, err = _cli("runs", "s3://no-such-bucket-imgindex/root", *flags)
    assert code == 2 and err.count("\n") == 1 and "no-such-bucket-imgindex" in err and "Traceback" not in err
    code, out, err = _cli("inspect", root)
    assert code == 2 and "imgindex runs ROOT" in err and err.count("\n") == 1
