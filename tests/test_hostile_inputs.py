"""Hostile inputs: the readers' limits and framing rules, and one real `imgindex embed` run
over a generated corpus of hostile records (tests/helpers/fuzz.py)."""

import gzip
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import tarfile
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipelines import shards as S
from pipelines.embed import run as embed_run
from pipelines.read_webdataset import MAX_TAR_HEADER_BYTES
from retrieval.errors import ConfigError
from tests.helpers import fuzz, fuzz_records, images
from tests.helpers import shards as shard_writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path, fmt, **config):
    """Every item read_shard yields for one file, by kind."""
    items = list(S.read_shard(S.Shard(str(path), fmt, "", os.path.getsize(path)), S.ReaderConfig(**config)))
    out = {"records": [], "failures": [], "skipped": [], "untrusted": []}
    for item in items:
        kind = {S.Record: "records", S.Skipped: "skipped", S.Untrusted: "untrusted"}.get(
            type(item), "failures"
        )
        out[kind].append(item)
    return out


def _tar(members):
    """(name, bytes | kind) -> tar bytes; kind: symlink, hardlink, directory, fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "directory": tarfile.DIRTYPE,
            }.get(data, tarfile.FIFOTYPE)
            info.linkname = "target" if data in ("symlink", "hardlink") else ""
            tar.addfile(info)
    return buf.getvalue()


def _samples(n, start=0):
    return [
        (f"k{i}.{ext}", data)
        for i in range(start, start + n)
        for ext, data in (("jpg", images.jpeg(seed=i)), ("txt", b"t"))
    ]


# --- WebDataset framing -------------------------------------------------------------------


def test_tar_cut_mid_member_gives_one_row_for_the_rest(tmp_path):
    data = _tar(_samples(4))
    offset = data.index(b"k2.jpg") - 0  # header of k2.jpg starts at its name
    (tmp_path / "cut.tar").write_bytes(data[: offset + 512 + 200])
    got = _read(tmp_path / "cut.tar", "webdataset")
    assert [r.id for r in got["records"]] == ["k0", "k1"]
    assert len(got["failures"]) == 1  # no extra "has no image member (members: )" row
    row = got["failures"][0]
    assert row.error_type == "BrokenShard" and row.source.endswith("#k2.jpg")
    assert "bytes from byte" in row.message and "k2" in row.message
    lost = len(data[: offset + 512 + 200]) - offset
    assert f"{lost} bytes from byte {offset}" in row.message


@pytest.mark.parametrize("where", ["garbage header", "cut at a header", "cut inside a header"])
def test_tar_breaks_after_the_first_member_are_never_silent(tmp_path, where):
    data = _tar(_samples(4))
    offset = data.index(b"k2.jpg")
    if where == "garbage header":
        data = data[:offset] + images.random_bytes(512, 1) + data[offset + 512 :]
    elif where == "cut at a header":
        data = data[:offset]
    else:
        data = data[: offset + 100]
    (tmp_path / "x.tar").write_bytes(data)
    got = _read(tmp_path / "x.tar", "webdataset")
    # tarfile alone ends such an archive silently after k1; the sample being read (k1) and the
    # rest are one row.
    assert [r.id for r in got["records"]] == ["k0"]
    assert [f.error_type for f in got["failures"]] == ["BrokenShard"]
    assert got["failures"][0].source.endswith("#k1.jpg")


def test_tar_links_directories_and_dot_members_are_skipped_and_counted(tmp_path):
    members = _samples(1) + [
        ("k1.jpg", "symlink"),
        ("k1.txt", b"x"),
        ("dir/", "directory"),
        ("hl", "hardlink"),
    ]
    members += [("fifo", "fifo"), ("._k0.jpg", b"\0\5\26\7")] + _samples(1, start=2)
    (tmp_path / "x.tar").write_bytes(_tar(members))
    got = _read(tmp_path / "x.tar", "webdataset")
    assert [r.id for r in got["records"]] == ["k0", "k2"]
    assert sorted(s.kind for s in got["skipped"]) == ["directory", "hardlink", "hidden", "other", "symlink"]
    (row,) = got["failures"]
    assert row.id == "k1" and "no image member" in row.message and "k1.jpg (symlink)" in row.message


def test_tar_member_above_the_limit_is_a_failure_and_the_next_sample_is_read(tmp_path):
    members = _samples(1) + [("big.jpg", images.random_bytes(5000)), ("big.txt", b"x")] + _samples(1, start=1)
    (tmp_path / "x.tar").write_bytes(_tar(members))
    got = _read(tmp_path / "x.tar", "webdataset", max_record_bytes=4096)
    assert [r.id for r in got["records"]] == ["k0", "k1"]
    (row,) = got["failures"]
    assert (row.id, row.error_type) == ("big", "RecordTooLarge") and "5000 bytes" in row.message


def test_oversized_pax_header_is_refused_not_read(tmp_path):
    big_name = "k/" + "x" * (MAX_TAR_HEADER_BYTES + 10) + ".jpg"
    members = _samples(1) + [(big_name, images.jpeg())]
    (tmp_path / "x.tar").write_bytes(_tar(members))
    got = _read(tmp_path / "x.tar", "webdataset")
    assert [f.error_type for f in got["failures"]] == ["BrokenShard"]
    assert "extended" in got["failures"][0].message


# --- TFRecord framing -----------------------------------------------------------------------


def _tfrecord(tmp_path, n, name="x.tfrecord"):
    shard_writers.tfrecord_shard(
        tmp_path / name,
        [{"image/encoded": images.jpeg(seed=i), "image/key": f"t{i}".encode()} for i in range(n)],
    )
    data = (tmp_path / name).read_bytes()
    offsets, at = [], 0
    while at < len(data):
        offsets.append(at)
        at += 16 + int.from_bytes(data[at : at + 8], "little")
    return data, offsets


def test_tfrecord_data_crc_failure_is_one_row_and_reading_goes_on(tmp_path):
    data, offsets = _tfrecord(tmp_path, 4)
    damaged = bytearray(data)
    damaged[offsets[1] + 30] ^= 0x01
    (tmp_path / "x.tfrecord").write_bytes(bytes(damaged))
    got = _read(tmp_path / "x.tfrecord", "tfrecord")
    assert [r.id for r in got["records"]] == ["t0", "t2", "t3"]
    assert [(f.source.rsplit("#")[1], f.error_type) for f in got["failures"]] == [("1", "ChecksumError")]


def test_tfrecord_length_crc_failure_loses_the_rest_and_says_how_many_bytes(tmp_path):
    data, offsets = _tfrecord(tmp_path, 4)
    damaged = bytearray(data)
    damaged[offsets[2] + 1] ^= 0x01
    (tmp_path / "x.tfrecord").write_bytes(bytes(damaged))
    got = _read(tmp_path / "x.tfrecord", "tfrecord")
    assert [r.id for r in got["records"]] == ["t0", "t1"]
    (row,) = got["failures"]
    assert row.source.endswith("#2") and row.error_type == "BrokenShard"
    assert f"{len(data) - offsets[2]} bytes from byte {offsets[2]} to the end" in row.message


def test_tfrecord_above_the_limit_is_skipped_unread(tmp_path):
    shard_writers.tfrecord_shard(
        tmp_path / "x.tfrecord",
        [
            {"image/encoded": images.jpeg(seed=0), "image/key": b"t0"},
            {"image/encoded": images.random_bytes(10_000), "image/key": b"big"},
            {"image/encoded": images.jpeg(seed=2), "image/key": b"t2"},
        ],
    )
    got = _read(tmp_path / "x.tfrecord", "tfrecord", max_record_bytes=5000)
    assert [r.id for r in got["records"]] == ["t0", "t2"]
    (row,) = got["failures"]
    assert row.source.endswith("#1") and row.error_type == "RecordTooLarge"


# --- gzip integrity ---------------------------------------------------------------------------


def _flip_crc(data):
    out = bytearray(data)
    out[-8] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("fmt", ["webdataset", "tfrecord"])
def test_gzip_crc_failure_makes_the_whole_shard_untrusted(tmp_path, fmt):
    if fmt == "webdataset":
        raw, name = _tar(_samples(8)), "x.tar.gz"
    else:
        raw, _ = _tfrecord(tmp_path, 8)
        name = "x.tfrecord.gz"
    (tmp_path / name).write_bytes(_flip_crc(gzip.compress(raw)))
    got = _read(tmp_path / name, fmt)
    (untrusted,) = got["untrusted"]
    assert "CRC" in untrusted.reason or "crc" in untrusted.reason.lower()
    assert len(got["records"]) == 8 and not got["failures"]  # read, but ReadHashDoFn discards them
    # The same bytes with a good CRC are trusted.
    (tmp_path / name).write_bytes(gzip.compress(raw))
    assert not _read(tmp_path / name, fmt)["untrusted"]


def test_a_member_altered_inside_a_tar_gz_is_never_embedded(tmp_path):
    """The review's case: a .tar.gz whose stream fails its CRC had all its members embedded,
    one with altered bytes.  Here the altered byte sits in an image member's data."""
    raw = _tar(_samples(8))
    (tmp_path / "x.tar.gz").write_bytes(fuzz_records.stored_gzip(raw))
    assert not _read(tmp_path / "x.tar.gz", "webdataset")["untrusted"]  # the writer is right
    damaged = bytearray(fuzz_records.stored_gzip(raw))
    damaged[damaged.index(images.jpeg(seed=3)[200:216])] ^= 0x01
    (tmp_path / "x.tar.gz").write_bytes(bytes(damaged))
    got = _read(tmp_path / "x.tar.gz", "webdataset")
    assert len(got["records"]) == 8  # tarfile alone sees nothing wrong ...
    assert [u.reason.split(":")[0] for u in got["untrusted"]] == ["BadGzipFile"]  # ... the CRC does


def test_bytes_after_the_last_gzip_member_do_not_discard_the_checked_records(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress(_tar(_samples(3))) + b"\x00" * 100 + b"junk")
    got = _read(tmp_path / "x.tar.gz", "webdataset")
    assert [r.id for r in got["records"]] == ["k0", "k1", "k2"] and not got["untrusted"]


def test_truncated_gzip_keeps_what_came_before_the_cut(tmp_path):
    raw = _tar(_samples(40))
    compressed = gzip.compress(raw)
    (tmp_path / "x.tar.gz").write_bytes(compressed[: len(compressed) * 2 // 3])
    got = _read(tmp_path / "x.tar.gz", "webdataset")
    assert not got["untrusted"]  # a cut is not corruption: what inflated is the original
    assert 10 < len(got["records"]) < 40
    assert [r.id for r in got["records"]] == [f"k{i}" for i in range(len(got["records"]))]
    (row,) = got["failures"]
    assert row.error_type == "BrokenShard" and "EOFError" in row.message


# --- folders --------------------------------------------------------------------------------


def test_folder_inputs_take_images_by_extension_and_count_the_rest(tmp_path):
    for name in ["a.JPG", "b.Png", "sub/c.tiff", ".DS_Store", "._a.jpg", ".git/d.jpg", "notes.txt", "README"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    inputs = S.expand_inputs([str(tmp_path)])
    assert sorted(os.path.basename(s.path) for s in inputs.shards) == ["a.JPG", "b.Png", "c.tiff"]
    assert {k: len(v) for k, v in inputs.skipped.items()} == {"hidden": 3, "non_image": 2}
    # --format images: a non-image extension is skipped too, not a failure.
    assert {k: len(v) for k, v in S.expand_inputs([str(tmp_path)], "images").skipped.items()} == {
        "hidden": 3,
        "non_image": 2,
    }
    # A glob that spells the dot itself asks for dot-names.
    assert [os.path.basename(s.path) for s in S.expand_inputs([f"{tmp_path}/._*.jpg"]).shards] == ["._a.jpg"]


def test_a_glob_matching_only_skipped_files_is_an_error_before_work(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    with pytest.raises(
        ConfigError, match=r"only files that are skipped: 1 dot-named.*1 not images.*--format"
    ):
        S.expand_inputs([str(tmp_path)])


def test_image_file_above_the_limit_is_a_failure_unread(tmp_path):
    (tmp_path / "big.jpg").write_bytes(images.random_bytes(3000))
    got = _read(tmp_path / "big.jpg", "images", max_record_bytes=2000)
    assert not got["records"] and [f.error_type for f in got["failures"]] == ["RecordTooLarge"]


# --- whole runs -------------------------------------------------------------------------------


@pytest.mark.slow
def test_stray_files_in_an_image_folder_are_skipped_and_counted(tmp_path, tiny_savedmodel):
    folder = images.write_folder(tmp_path / "in", 3)
    for name in [".DS_Store", "notes.txt", "._img000.jpg"]:
        (tmp_path / "in" / name).write_bytes(b"junk")
    report = embed_run(
        [
            f"--input={folder}",
            "--format=images",
            f"--output={tmp_path / 'out'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
        ]
    )
    assert report["status"] == "ok" and report["counts"]["failed_total"] == 0
    assert report["counts"]["records"] == 3
    assert report["counts"]["skipped_files"] == {"hidden": 2, "non_image": 1}
    assert report["inputs"]["skipped_examples"]["non_image"] == [f"{folder}/notes.txt"]


def _high_water_rss(pid):
    """The process's peak RSS so far (VmHWM, bytes), or 0 once it is gone.  Not the rusage of
    wait4: Linux carries the peak RSS of the address space an exec replaces into the child's
    ru_maxrss, which is then at least the peak of this (pytest) process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run_embed_on_a_terminal(argv, cwd):
    """Runs `imgindex embed` in a subprocess with stderr on a pseudo-terminal; returns
    (exit status, stdout, stderr text, peak RSS in bytes of that process, polled)."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": ROOT, "COLUMNS": "200"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI's own quieting is what is tested
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgindex.cli", "embed", *argv],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    os.close(slave)
    chunks = []

    def pump():
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 1.0)
                if ready:
                    data = os.read(master, 65536)
                    if not data:
                        return
                    chunks.append(data)
                elif proc.poll() is not None:
                    return
            except OSError:  # the child closed the terminal
                return

    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _high_water_rss(proc.pid))
            time.sleep(0.1)

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=watch, daemon=True)]
    for thread in threads:
        thread.start()
    stdout = proc.stdout.read()
    proc.wait()
    for thread in threads:
        thread.join(timeout=10)
    os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace"), peak[0]


# Peak RSS of `imgindex embed` with the tiny model on this corpus measured 0.77 GB.  Reading
# the 1 GiB member of huge.tar.gz (--max_record_bytes above it) took a run to 3.9 GB.
MAX_RSS = 1_200_000_000


def _check_fuzz_run(tmp_path, tiny_savedmodel, scale):
    corpus = fuzz.corpus(tmp_path / "in", scale=scale, seed=scale)
    out = tmp_path / "out"
    argv = [f"--input={g}" for g in corpus.globs] + [
        f"--output={out}",
        f"--embedder=tiny={tiny_savedmodel},size=32",
        f"--max_record_bytes={fuzz_records.MAX_RECORD_BYTES}",
        "--max_pixels=4000000",
        "--decode_threads=4",
        "--batch_size=16",
    ]
    started = time.monotonic()
    status, stdout, stderr, rss = _run_embed_on_a_terminal(argv, tmp_path)
    seconds = time.monotonic() - started
    assert status == 0, stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["status"] == "ok" and report["embedders"]["tiny"]["reconciled"], report
    table = pq.read_table(out / "embeddings" / "tiny", columns=["source"]).column("source").to_pylist()
    failures = pq.read_table(out / "failures").to_pylist()
    counts = fuzz.reconcile(corpus, {"tiny": set(table)}, failures)
    # Reconciled to the record: every generated record is in the table, has its failure row,
    # or is covered by its broken shard's one row for the rest.
    assert counts["embedded"] + counts["failed"] + counts["lost"] == len(corpus.records)
    assert counts["embedded"] == len(table) == report["embedders"]["tiny"]["rows"]
    c = report["counts"]
    assert c["failed_total"] == len(failures)
    assert c["records"] == len(table) + len(failures)  # the rest rows count once each
    assert c["skipped_files"] == corpus.skipped_files
    assert c["skipped_members"] == corpus.skipped_members
    assert rss < MAX_RSS, f"peak RSS {rss / 1e9:.2f} GB"
    # The terminal saw the progress line and nothing from the libraries.
    assert "records read" in stderr and "\r" in stderr, stderr[-2000:]
    segments = re.split(r"[\r\n]|\x1b\[K", stderr)  # the status line is redrawn with \r ... ESC [K
    noise = [segment for segment in segments if segment.strip() and not segment.startswith("imgindex: ")]
    assert not noise, noise[:10]
    assert "imgindex embed: ok" in stdout and "skipped" in stdout
    return len(corpus.records), seconds, rss


@pytest.mark.slow
def test_fuzz_corpus_one_real_embed_run(tmp_path, tiny_savedmodel):
    """>= 1,000 hostile records across TFRecord, WebDataset and folders in one `imgindex embed`
    run on a terminal: no crash, every record accounted for, bounded RSS, a progress line and
    no library noise."""
    records, seconds, rss = _check_fuzz_run(tmp_path, tiny_savedmodel, scale=1)
    assert records >= 1000
    print(f"fuzz corpus: {records} records in {seconds:.1f}s, peak RSS {rss / 1e9:.2f} GB")


@pytest.mark.stress
def test_fuzz_corpus_at_full_size(tmp_path, tiny_savedmodel):
    records, seconds, rss = _check_fuzz_run(tmp_path, tiny_savedmodel, scale=8)
    assert records >= 5000
    print(f"fuzz corpus: {records} records in {seconds:.1f}s, peak RSS {rss / 1e9:.2f} GB")
