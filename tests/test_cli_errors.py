"""What the imgindex command does when things go wrong: output into a pipe that closes, Ctrl-C,
and plain mistakes (one line on stderr, exit status 2, no traceback)."""

import errno
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from imgindex import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imgindex(*argv: str) -> list[str]:
    return [sys.executable, "-m", "imgindex.cli", *map(str, argv)]


# --------------------------------------------------------------------------- pipes, Ctrl-C


@pytest.fixture(scope="module")
def many_queries(tmp_path_factory):
    """50 query vectors for the vector_run: at --k 200, ~1 MB of table and ~3 MB of JSON."""
    import numpy as np

    path = tmp_path_factory.mktemp("queries") / "q.npy"
    np.save(path, np.random.default_rng(3).standard_normal((50, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize("output", ["--json", "table"])
def test_query_piped_into_head_exits_quietly(vector_run, many_queries, output):
    argv = _imgindex("query", vector_run, "--vector", many_queries, "--k", "200")
    argv += ["--json"] if output == "--json" else []
    result = subprocess.run(
        ["bash", "-c", f"{shlex.join(argv)} | head -c 10; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.stderr == b""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert len(result.stdout) == 10 and result.stdout.startswith(b"[" if output == "--json" else b"query")
    assert result.returncode == cli.EXIT_BROKEN_PIPE


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "{root}"],
        ["runs", "{root}", "--json"],
        ["inspect", "{root}"],
        ["inspect", "{root}", "--json"],
    ],
)
def test_output_into_a_closed_pipe_exits_quietly(vector_run, argv):
    # The reader is gone before the command writes its first byte: every write fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            _imgindex(*(a.format(root=vector_run) for a in argv)),
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.stderr == b"" and result.returncode == cli.EXIT_BROKEN_PIPE


def test_ctrl_c_during_query_is_one_line_and_status_130(tmp_path):
    # The query blocks reading its --vector file, a FIFO nobody writes into, until Ctrl-C.
    fifo = tmp_path / "q.npy"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        _imgindex("query", tmp_path, "--vector", fifo),
        stderr=subprocess.PIPE,
        cwd=REPO,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        writer = _open_when_read(fifo, child)
        # A SIGINT landing just before the child's read() starts is only noted, and the read
        # then blocks (no EINTR): as a user would, press Ctrl-C again until the child stops.
        err = None
        for _ in range(12):
            child.send_signal(signal.SIGINT)
            try:
                _, err = child.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        os.close(writer)
    finally:
        child.kill()
    assert child.returncode == cli.EXIT_INTERRUPTED
    assert err == "imgindex query: interrupted\n"


def _as_from_a_terminal() -> None:
    """The child starts with SIGINT as a shell gives it (default, not blocked), whatever an
    earlier test left in this process: a blocked or ignored SIGINT is inherited by a child,
    and the suite's child once ignored a dozen Ctrl-Cs that it answers at once alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _open_when_read(fifo, child: subprocess.Popen) -> int:
    """The FIFO's write end, opened once `child` has opened its read end."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or child.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# --------------------------------------------------------------------------- plain mistakes


def _one_line_error(capsys, argv: list[str], command: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imgindex {command}: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_user_errors_are_one_line_not_a_traceback(capsys, tmp_path):
    assert cli.main(["models", "--export", "efficientnet-b7", "--cache_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgindex models: error:") and "efficientnet-lite0" in err
    assert "Traceback" not in err


def test_query_missing_files_are_one_line_errors_before_the_index_opens(tmp_path, capsys):
    not_an_index = str(tmp_path / "no-such-root")  # opening it first would fail differently
    for flag, path in (("--image", tmp_path / "missing.jpg"), ("--vector", tmp_path / "missing.npy")):
        assert cli.main(["query", not_an_index, flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"imgindex query: error: {flag} {path}") and "no-such-root" not in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_a_root_that_is_missing_or_not_a_directory_is_a_one_line_error(command, tmp_path, capsys):
    query = ["--vector", "1,2"] if command == "query" else []
    err = _one_line_error(capsys, [command, str(tmp_path / "typo"), *query], command)
    assert f"{tmp_path / 'typo'} does not exist" in err
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, [command, str(tmp_path / "file"), *query], command)
    assert "is not a directory" in err


@pytest.mark.parametrize("command", ["query", "inspect"])
def test_a_root_without_latest_or_with_a_garbled_one_is_a_one_line_error(command, tmp_path, capsys):
    query = ["--vector", "1,2"] if command == "query" else []
    err = _one_line_error(capsys, [command, str(tmp_path), *query], command)
    assert "no LATEST" in err and "imgindex build" in err
    (tmp_path / "LATEST").write_bytes(b"\x86\xff\x00garbage")
    err = _one_line_error(capsys, [command, str(tmp_path), *query], command)
    assert "LATEST is not text" in err


def test_unreadable_vector_files_are_one_line_errors(vector_run, tmp_path, capsys):
    import numpy as np

    (tmp_path / "dir.npy").mkdir()
    (tmp_path / "text.npy").write_text("0.1,0.2\n")  # not a .npy: np.load would try a pickle
    np.save(tmp_path / "whole.npy", np.ones(8, np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:100])
    for name, says in (
        ("dir.npy", "cannot read it: Is a directory"),
        ("text.npy", "is not a .npy file"),
        ("cut.npy", "cannot read it as a .npy array"),
    ):
        err = _one_line_error(capsys, ["query", str(vector_run), "--vector", str(tmp_path / name)], "query")
        assert f"--vector {tmp_path / name}" in err and says in err and "pickle" not in err


def test_index_and_models_path_mistakes_are_one_line_errors(tmp_path, capsys):
    err = _one_line_error(
        capsys, ["index", "--embeddings", str(tmp_path / "none"), "--output", str(tmp_path / "ix")], "index"
    )
    assert "does not exist" in err
    (tmp_path / "notes.txt").write_text("not parquet")
    err = _one_line_error(
        capsys,
        ["index", "--embeddings", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "ix")],
        "index",
    )
    assert "cannot read embedding tables" in err and not (tmp_path / "ix").exists()
    # A cache directory under a file: the OSError's one line names the path.
    err = _one_line_error(
        capsys,
        ["models", "--export", "efficientnet-lite0", "--cache_dir", str(tmp_path / "notes.txt" / "c")],
        "models",
    )
    assert "Not a directory" in err and "notes.txt" in err
