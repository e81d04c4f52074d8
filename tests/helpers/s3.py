"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto's server
(`moto_server`, from the test extra) in a subprocess on a port the OS chooses.

`S3Server.beam_flags()` are Beam's own S3 options, the ones a user passes to `imgindex embed`,
`build` and `serve`; `env()` is the same credentials for clients that read the AWS variables.
Tests that need it take the `s3_server` fixture (tests/conftest.py), which skips with the
reason when moto is not installed or the server does not start, never silently."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen = field(repr=False)

    def beam_flags(self) -> list[str]:
        return [
            f"--s3_endpoint_url={self.endpoint}",
            f"--s3_access_key_id={ACCESS_KEY}",
            f"--s3_secret_access_key={SECRET_KEY}",
            f"--s3_region_name={REGION}",
        ]

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def make_bucket(self, name: str) -> str:
        """Create (or empty) bucket `name`; returns "s3://name"."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        self.empty(name)
        return f"s3://{name}"

    def empty(self, bucket: str) -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        client = self.client()
        out: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(timeout: float = 60.0, env: dict[str, str] | None = None) -> S3Server:
    """Start moto's server (`env`: extra settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 to
    check credentials); raises RuntimeError with its output when it does not come up."""
    port = _free_port()
    # Its output goes to a file: moto logs a line per request, and a pipe nobody reads fills
    # up (64 KiB) and blocks the server mid-request, which hangs the tests.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true", **(env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto_server exited with {proc.returncode}: {log.read()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
            return S3Server(endpoint=endpoint, proc=proc)
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout:.0f} s")
        time.sleep(0.1)


def upload_run(run_dir, root: str, *, skip=(), latest: bool = True) -> str:
    """Publish local run `run_dir` under object-store root `root` (storage configured): every
    file but those in `skip` (paths relative to the run), the run manifest after them, then
    LATEST."""
    from retrieval import runs, storage

    run_id = os.path.basename(str(run_dir).rstrip("/"))
    remote = storage.join(root, runs.RUNS_DIR, run_id)
    files = []
    for dirpath, _dirs, names in os.walk(run_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), run_dir).replace(os.sep, "/")
            if rel not in skip and rel != runs.RUN_MANIFEST:
                files.append(rel)
    for rel in sorted(files) + ([runs.RUN_MANIFEST] if runs.RUN_MANIFEST not in skip else []):
        storage.upload(os.path.join(run_dir, rel), storage.join(remote, rel))
    if latest:
        point_latest(root, run_id)
    return run_id


def point_latest(root: str, run_id: str) -> None:
    from retrieval import runs, storage

    storage.put_bytes(storage.join(root, runs.LATEST), f"runs/{run_id}\n".encode())
