"""retrieval.storage against a real S3-compatible server (moto on 127.0.0.1)."""

import hashlib

import pytest

from retrieval import storage
from retrieval.errors import ImgIndexError


@pytest.fixture
def bucket(s3_server):
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    return s3_server.make_bucket("storage-test")


def test_put_read_list_delete_round_trip(bucket, s3_server):
    root = storage.join(bucket, "root")
    assert storage.list_prefix(root) == []
    assert not storage.exists(storage.join(root, "LATEST"))
    storage.put_bytes(storage.join(root, "runs/r1/a.txt"), b"one")
    storage.put_bytes(storage.join(root, "runs/r1/sub/b.bin"), b"\x00" * 10)
    storage.put_bytes(storage.join(root, "LATEST"), b"runs/r1\n")
    assert storage.read_bytes(storage.join(root, "LATEST")) == b"runs/r1\n"
    listed = storage.list_prefix(storage.join(root, "runs"))
    assert [(o.path, o.size) for o in listed] == [
        (f"{root}/runs/r1/a.txt", 3),
        (f"{root}/runs/r1/sub/b.bin", 10),
    ]
    storage.put_bytes(storage.join(root, "LATEST"), b"runs/r2\n")  # overwrite is one put
    assert storage.read_bytes(storage.join(root, "LATEST")) == b"runs/r2\n"
    assert storage.delete_prefix(storage.join(root, "runs")) == 2
    assert s3_server.keys("storage-test") == ["root/LATEST"]


def test_upload_and_download_checksums(bucket, tmp_path):
    data = bytes(range(256)) * 50_000  # 12.8 MB: more than one chunk
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert storage.upload(str(src), storage.join(bucket, "x/src.bin")) == expected
    dst = tmp_path / "out" / "dst.bin"
    assert storage.download(storage.join(bucket, "x/src.bin"), str(dst)) == expected
    assert dst.read_bytes() == data
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temporary left behind


def test_missing_object_is_file_not_found(bucket, tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(bucket, "absent"))
    with pytest.raises(FileNotFoundError):
        storage.download(storage.join(bucket, "absent"), str(tmp_path / "absent"))


def test_missing_bucket_and_wrong_credentials_are_one_clear_error(s3_server):
    storage.configure(storage.options_from_flags(s3_server.beam_flags()))
    with pytest.raises(
        ImgIndexError, match=r"s3://no-such-bucket-xyz/LATEST: cannot write: .*--s3_endpoint_url"
    ):
        storage.put_bytes("s3://no-such-bucket-xyz/LATEST", b"x")
    s3_server.make_bucket("creds-test")
    wrong = [f for f in s3_server.beam_flags() if not f.startswith("--s3_endpoint_url")]
    wrong.append("--s3_endpoint_url=http://127.0.0.1:9")  # nothing listens on port 9
    storage.configure(storage.options_from_flags(wrong))
    try:
        with pytest.raises(ImgIndexError, match=r"cannot"):
            storage.put_bytes("s3://creds-test/LATEST", b"x")
    finally:
        storage.configure(storage.options_from_flags(s3_server.beam_flags()))


def test_beams_s3_wrappers_share_one_boto3_client_per_settings(bucket, s3_server):
    """Beam builds a client per operation; after configure() the boto3 client inside is one
    per process and settings, while each wrapper keeps its own download state."""
    from apache_beam.io.aws.clients.s3 import boto3_client

    options = storage.options_from_flags(s3_server.beam_flags())
    first, second = boto3_client.Client(options), boto3_client.Client(options)
    assert first is not second and first.client is second.client
    assert first._download_stream is None and second._download_stream is None
    other = storage.options_from_flags([*s3_server.beam_flags(), "--s3_region_name=eu-west-1"])
    assert boto3_client.Client(other).client is not first.client
    for i in range(20):  # many operations through the shared client, each with its answer
        storage.put_bytes(storage.join(bucket, f"many/{i}"), str(i).encode())
    assert [storage.read_bytes(storage.join(bucket, f"many/{i}")) for i in range(20)] == [
        str(i).encode() for i in range(20)
    ]
