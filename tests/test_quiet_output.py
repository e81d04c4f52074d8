"""What `imgindex embed` / `imgindex build` show a user: a progress line on a terminal (and
nothing when stderr is not one), defaults in --help, and no library noise."""

import io
import logging
import os
import subprocess
import sys

import pytest

from imgindex import cli
from pipelines import progress
from pipelines.build_options import BuildOptions
from pipelines.options import check_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "command, shown",
    [
        ("embed", ["images per model call (default: 32)", "(default: 67108864)", "(default: auto)"]),
        ("build", ["(default: 0.95)", "(default: 2048)", "(default: 0.01)"]),
    ],
)
def test_help_shows_defaults(command, shown):
    text = " ".join(cli.beam_help(command).split())
    for words in shown:
        assert words in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_beam_logs_nothing_about_imgindex_flags_or_their_values(caplog):
    """Beam does not know the flags of BuildOptions (a subclass of a subclass) and logged
    "Unparseable argument" for them and for values given as a separate argument."""
    argv = check_flags(
        [
            "--input=x",
            "--output=y",
            "--max_failure_rate",
            "0.0123",
            "--keep_runs=7",
            "--min_recall",
            "0.9321",
        ],
        BuildOptions,
    )
    with caplog.at_level(logging.INFO):
        BuildOptions(flags=argv).get_all_options(retain_unknown_options=True, display_warnings=True)
    assert not [r.getMessage() for r in caplog.records if "Unparseable" in r.getMessage()]


def test_portable_job_servers_lists_of_imgindex_flags_are_dropped_others_kept():
    """The portable runner's job server reparses the options and warns about all of build's
    flags at once; a list with a flag nobody knows still shows."""
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")

    def shown(message, arg):
        record = logging.LogRecord(beam_log.name, logging.WARNING, __file__, 0, message, (arg,), None)
        return all(f.filter(record) for f in beam_log.filters)

    assert not shown("Discarding unparseable args: %s", ["--index_shards=2", "--keep_runs=3"])
    assert shown("Discarding unparseable args: %s", ["--index_shards=2", "--made_up=1"])
    assert not shown("Discarding invalid overrides: %s", {"index_shards": 2, "min_recall": 0.9})
    assert shown("Discarding invalid overrides: %s", {"index_shards": 2, "made_up": 1})


def test_progress_line_reading_then_embedding():
    display = progress.Display(shards=4, embedders=["a", "b"])
    progress.reset()
    display._started = 100.0
    progress.count("shards", 1)
    progress.count("read", 50)
    progress.count("failed", 2)
    line = display.line(now=110.0)
    assert "reading shards 1/4" in line and "50 records read" in line and "ETA 0:30" in line
    progress.count("shards", 3)
    progress.count("read", 150)  # 200 read in all
    assert "ETA ?" in display.line(now=120.0)  # the embedding rate is not known yet
    for name in "ab":
        progress.count(f"rows.{name}", 90)
    progress.count("rows.b", 10)
    progress.count("dropped", 10)  # 100 of 200 done for the slower embedder "a"
    line = display.line(now=130.0)
    assert "200 records read, 90 embedded, 2 failed" in line
    assert "10.0 records/s" in line and "ETA 0:10" in line
    progress.reset()


def test_progress_is_off_when_stderr_is_not_a_terminal():
    assert not progress.wanted("auto", io.StringIO())
    assert progress.wanted("on", io.StringIO()) and not progress.wanted("off")


@pytest.mark.slow
def test_scann_logs_follow_tf_cpp_min_log_level():
    """ScaNN's C++ INFO lines (absl, which reads no environment variable) on a tree-AH build:
    gone when TF_CPP_MIN_LOG_LEVEL asks for it, as the `imgindex` command does."""
    code = (
        "import numpy as np\n"
        "from retrieval.index import IndexConfig, build_index\n"
        "v = np.random.default_rng(0).standard_normal((3000, 16)).astype('float32')\n"
        "config = IndexConfig(method='tree_ah', num_leaves=10, training_sample_size=3000, leaves_to_search=10, pre_reorder_num_neighbors=100)\n"
        "build_index(v, [str(i) for i in range(len(v))], config=config)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    loud = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "partitioner" in loud.stderr  # the lines exist: the test can fail
    quiet = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert quiet.stderr.strip() == ""
