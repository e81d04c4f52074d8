"""`imgindex serve` as an operator runs it: its flags (with defaults in --help), its log (INFO,
one line per event, stderr: start, swaps, refresh failures, refusals) and its stop on SIGTERM."""

import logging
import os
import signal
import subprocess
import sys

import pytest

from serving.http_server import _OneLineFormatter
from serving.limits import ServerLimits
from tests.helpers import runs_fixture as rf
from tests.helpers.http import call
from tests.helpers.serve_process import serving

RUN1, RUN2 = "20260101T000000Z-cmd001", "20260102T000000Z-cmd002"


def test_help_lists_the_limits_with_their_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "imgindex.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    defaults = ServerLimits()
    for flag, value in (
        ("--keep_alive_timeout", defaults.keep_alive_timeout),
        ("--body_timeout", defaults.body_timeout),
        ("--max_connections", defaults.max_connections),
        ("--max_requests", defaults.max_requests),
        ("--max_body_bytes", defaults.max_body_bytes),
        ("--max_buffered_bytes", defaults.max_buffered_bytes),
        ("--max_image_queries", defaults.max_image_queries),
        ("--image_wait_seconds", defaults.image_wait_seconds),
        ("--max_image_pixels", 16_000_000),
    ):
        assert flag in out
        assert f"(default: {value})" in " ".join(out.split()), flag
    assert "--expose_source" in out


def test_bad_limits_are_a_one_line_error(tmp_path):
    rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 50, 8, seed=1)}, run_id=RUN1)
    done = subprocess.run(
        [sys.executable, "-m", "imgindex.cli", "serve", str(tmp_path), "--max_requests=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "imgindex serve: error: max_requests must be an integer >= 1, got 0"
    )


@pytest.mark.slow
def test_the_log_tells_start_swaps_failures_and_refusals(tmp_path):
    rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 100, 8, seed=1)}, run_id=RUN1)
    with serving(tmp_path, "--refresh_seconds=0.2", "--expose_source") as server:
        start = server.wait_for_line("INFO serving.http: serving run")[0]
        assert (
            f"serving run {RUN1} of {os.path.abspath(tmp_path)} (embedders: v) on http://127.0.0.1:" in start
        )
        assert "refresh every 0.2 s" in start and "keep_alive_timeout=5.0" in start
        # --expose_source: hits carry their source.
        status, body = call(server.url, "/v1/search", {"id": "v-00001", "k": 1})
        assert status == 200 and body["hits"][0]["metadata"]["source"].startswith("file:///")
        # A refusal: one INFO line, the 100 KB id not echoed.
        assert call(server.url, "/v1/search", {"id": "q" * 100_000})[0] == 404
        refused = server.wait_for_line(
            r"INFO serving\.http: refused POST /v1/search from 127\.0\.0\.1:\d+: 404 unknown_id"
        )
        assert len(refused[0]) < 700
        # A swap.
        rf.write_run(tmp_path, {"v": rf.vector_embedder("v", 120, 8, seed=2)}, run_id=RUN2)
        server.wait_for_line(
            rf"INFO serving\.searcher: now serving run {RUN2}, was {RUN1} \(loaded in [\d.]+ s\)"
        )
        # A refresh failure: LATEST names a run that is not there.
        with open(os.path.join(tmp_path, "LATEST"), "w") as f:
            f.write("runs/20260103T000000Z-gone03\n")
        failed = server.wait_for_line(
            r"ERROR serving\.searcher: refresh failed to load 20260103T000000Z-gone03"
        )
        assert f"still serving run {RUN2}: IndexFormatError:" in failed[0]
        assert call(server.url, "/v1/healthz")[1]["run_id"] == RUN2
        assert server.stop(signal.SIGTERM) == 0
    lines = server.log()
    assert lines[-1].endswith(f"INFO serving.http: stopped serving run {RUN2}")
    assert all(line[:4].isdigit() for line in lines), "\n".join(lines)  # one line per event
    assert not [line for line in lines if "hypercorn" in line and "INFO" in line]


def test_a_traceback_is_logged_on_the_line_of_its_event():
    formatter = _OneLineFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "serving.http", logging.ERROR, __file__, 1, "internal error", None, sys.exc_info()
        )
    text = formatter.format(record)
    assert "\n" not in text
    assert text.startswith("ERROR serving.http: internal error | Traceback (most recent call last):")
    assert "ValueError: boom | second line" in text
