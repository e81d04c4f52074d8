"""Calling the HTTP app: run it under the server `imgindex serve` runs (hypercorn, with the
same listener, timeouts and limits) on a free loopback port; send JSON or multipart; watch
raw sockets; read a process's RSS."""

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid


@contextlib.contextmanager
def running(app, limits=None):
    """Runs `app` in a background thread with `serving.http_server.run_server` on a free
    loopback port (`limits`: a ServerLimits, default ServerLimits()); yields the base URL."""
    from serving.http_server import listen, run_server
    from serving.limits import ServerLimits

    limits = limits or ServerLimits()
    sock = listen("127.0.0.1", 0, limits.max_connections)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure = []

    def run():
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run_server(app, sock, limits, shutdown_trigger=stop.wait))
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/healthz", timeout=2):
                break
        except OSError:
            assert not failure, failure
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        sock.close()
    assert not failure, failure


def call(url, path, payload=None, *, data=None, headers=None, method=None, timeout=30):
    """(status, parsed JSON body); payload is sent as JSON, data as raw bytes."""
    if payload is not None:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def multipart(fields):
    """A multipart/form-data body: {name: str | (filename, bytes)} -> (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, content = value
            head = (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            )
        else:
            head, content = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', value.encode()
        parts.append(f"--{boundary}\r\n".encode() + head.encode() + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def host_port(url):
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_exchange(url, data, *, wait=10.0, then=None, pause=0.0):
    """Sends raw bytes `data` on a new connection (then, after `pause` seconds, `then`), and
    reads until the server closes it or `wait` seconds pass.  Returns (status or None,
    bytes received, seconds until the close or None when still open)."""
    sock = socket.create_connection(host_port(url), timeout=5)
    start = time.monotonic()
    received = b""
    closed_after = None
    try:
        if data:
            sock.sendall(data)
        if then is not None:
            time.sleep(pause)
            with contextlib.suppress(OSError):
                sock.sendall(then)
        sock.settimeout(0.2)
        while time.monotonic() - start < wait:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset by the server
                chunk = b""
            if not chunk:
                closed_after = time.monotonic() - start
                break
            received += chunk
    finally:
        sock.close()
    status = None
    if received.startswith(b"HTTP/1."):
        status = int(received.split(b" ", 2)[1])
    return status, received, closed_after


def rss_mb(pid=None):
    """Resident set size of a process (default: this one), MB, from /proc."""
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
