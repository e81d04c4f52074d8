"""Files and integrity of published runs: modes that follow the umask, read-only published
runs, and a served run damaged in place (an error, never a dead server).  Real files, real
accounts (when the tests run as root), a real `imgindex serve` in a subprocess."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from retrieval import index, run_status, runs
from retrieval.atomic_files import WRITE_BITS, make_temp_dir, make_temp_file, write_text_atomic
from retrieval.errors import IndexFormatError
from tests.helpers import runs_fixture as rf

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _tree(directory):
    """(directories, files) under `directory`, itself included among the directories."""
    dirs, files = [Path(directory)], []
    for parent, names, leaves in os.walk(directory):
        dirs += [Path(parent, n) for n in names]
        files += [Path(parent, n) for n in leaves]
    return dirs, files


def _write_run(root, run_id="20260101T000000Z-aaaaaa", status="rejected"):
    data = {"a": rf.vector_embedder("a", 300, 8, seed=0)}
    return rf.write_run(root, data, run_id=run_id, status=status, publish=False)


def _set_status(run_dir, status):
    manifest = runs.read_run_manifest(run_dir)
    manifest.status = status
    runs.write_run_manifest(run_dir, manifest)


# --- item 16: modes follow the umask ---------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_written_through_a_temporary_file_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        root = tmp_path / "root"
        run_dir = _write_run(root)
        index_dir = Path(runs.index_dir(run_dir, "a"))
        # Before the publish: every file and directory as any new one (0666 / 0777 less the umask).
        dirs, files = _tree(run_dir)
        assert {_mode(d) for d in dirs} == {0o777 & ~umask}
        assert {_mode(f) for f in files} == {0o666 & ~umask}
        assert index_dir / "manifest.json" in files and Path(run_dir, runs.RUN_MANIFEST) in files
        fd, path = make_temp_file(tmp_path, prefix=".x.", suffix=".tmp")
        os.close(fd)
        assert _mode(path) == 0o666 & ~umask and _mode(make_temp_dir(tmp_path, ".d.")) == 0o777 & ~umask

        _set_status(run_dir, runs.PUBLISHING)
        run_status.publish(str(root), os.path.basename(run_dir))
    finally:
        os.umask(old)
    assert _mode(root / runs.LATEST) == 0o666 & ~umask
    # After it: the run's files are read-only, its directories as they were (retention deletes).
    dirs, files = _tree(run_dir)
    assert {_mode(d) for d in dirs} == {0o777 & ~umask}
    assert {_mode(f) for f in files} == {0o444}
    assert runs.read_run_manifest(run_dir).status == runs.PUBLISHED
    assert sorted(p.name for p in root.iterdir()) == [runs.LATEST, runs.RUNS_DIR]  # no temporary file


def test_write_text_atomic_read_only_and_an_existing_read_only_target(tmp_path):
    path = tmp_path / "f.json"
    write_text_atomic(path, "1", read_only=True)
    assert not _mode(path) & WRITE_BITS
    write_text_atomic(path, "2")  # replaced by rename: the old file's mode does not matter
    assert path.read_text() == "2" and _mode(path) & 0o200


def _as_nobody(imports, code, cwd):
    """Runs Python `code` as the account nobody when these tests run as root (else as this
    account).  The interpreter lives where nobody may not look (under /root), so the child
    runs `imports` first, as root, then drops to nobody and runs `code`."""
    drop = "import os\nif os.geteuid() == 0:\n    os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", imports + "\n" + drop + code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def shared_dir():
    """A directory every account may enter (pytest's own temporary directories are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="imgindex-shared-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root")
def test_a_run_published_by_one_account_is_served_by_another(shared_dir):
    old = os.umask(0o022)
    try:
        root = shared_dir / "root"
        root.mkdir()
        run_dir = _write_run(root, status=runs.PUBLISHING)
        run_status.publish(str(root), os.path.basename(run_dir))
    finally:
        os.umask(old)
    # As root: every module a Searcher needs is imported (opening the run once), not checked.
    imports = f"from serving import Searcher\nSearcher.open({str(root)!r}).search_id('a-00001')"
    code = (
        f"s = Searcher.open({str(root)!r})\n"
        "hits = s.search_id('a-00007', k=3)\n"
        "assert hits[0].id == 'a-00007', hits\n"
        "assert len(s.search_vector([0.5] * 8, k=3)) == 3\n"
        "print('served', os.geteuid(), s.run_id)\n"
    )
    result = _as_nobody(imports, code, shared_dir)
    assert result.returncode == 0, result.stderr
    assert f"served {NOBODY} {os.path.basename(run_dir)}" in result.stdout


# --- item 18: published runs are read-only; a damaged served file is an error --------------


def test_published_files_are_read_only_for_their_owner_and_retention_deletes_them(shared_dir):
    if os.geteuid() == 0:
        os.chown(shared_dir, NOBODY, NOBODY)
    imports = (
        "from pathlib import Path\n"
        "from retrieval import retention, runs\n"
        "from tests.helpers.run_dirs import make_run\n"
    )
    code = (
        "root = Path('root')\n"
        "old, before, latest = (make_run(root, h, publish=True) for h in range(3))\n"
        "part = Path(runs.run_dir(str(root), latest), 'embeddings', 'clip', 'part-0.parquet')\n"
        "try:\n"
        "    open(part, 'r+b')\n"
        "    raise SystemExit('a published file was writable')\n"
        "except PermissionError:\n"
        "    pass\n"
        "report = retention.apply_retention(root, keep_runs=2, keep_failed_hours=24)\n"
        "assert [e.run_id for e in report.deleted] == [old] and not report.errors, report\n"
        "assert sorted(os.listdir(root / 'runs')) == [before, latest]\n"
        "print('ok')\n"
    )
    result = _as_nobody(imports, code, shared_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url, payload):
    request = urllib.request.Request(
        url + "/v1/search", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_a_dataset_truncated_while_served_is_an_error_not_a_dead_server(tmp_path):
    root = tmp_path / "root"
    # Brute force over 3,000 x 8: ScaNN keeps its own copy; id queries read scann/dataset.npy.
    run_dir = rf.write_run(root, {"a": rf.vector_embedder("a", 3000, 8)}, run_id="20260101T000000Z-aaaaaa")
    dataset = Path(runs.index_dir(run_dir, "a"), "scann", "dataset.npy")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgindex.cli",
            "serve",
            str(root),
            "--port",
            str(port),
            "--refresh_seconds",
            "0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                with urllib.request.urlopen(url + "/v1/healthz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        status, body = _post(url, {"id": "a-02999", "k": 3})
        assert status == 200 and body["hits"][0]["id"] == "a-02999"

        os.chmod(dataset, 0o644)  # what `cp other dataset.npy` does as root: truncate, write
        with open(dataset, "r+b") as f:
            f.truncate(4096)

        status, body = _post(url, {"id": "a-02999", "k": 3})  # the row is past the end now
        assert status >= 400 and body["error"], (status, body)
        assert server.poll() is None, f"the server died: {server.returncode}"
        status, body = _post(url, {"vector": [0.5] * 8, "k": 3})  # ScaNN's copy still answers
        assert status == 200 and len(body["hits"]) == 3
        with urllib.request.urlopen(url + "/v1/healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode != -signal.SIGBUS


def test_an_index_opened_with_a_short_dataset_is_refused(tmp_path):
    directory = tmp_path / "index"
    rng = np.random.default_rng(0)
    index.build_index(rng.standard_normal((50, 4)).astype(np.float32), [f"i{i}" for i in range(50)]).save(
        directory
    )
    dataset = directory / "scann" / "dataset.npy"
    loaded = index.load_index(directory)
    with open(dataset, "r+b") as f:
        f.truncate(dataset.stat().st_size - 4)
    with pytest.raises(IndexFormatError, match="truncated or modified"):
        loaded.stored_vectors()
