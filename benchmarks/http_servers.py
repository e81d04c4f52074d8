"""Which ASGI server runs `imgindex serve`: the same app under uvicorn, hypercorn and granian,
attacked with slow and stalled connections, then timed on vector queries.

Each server runs in its own process on 127.0.0.1 with the app of `serving.http.create_app`
over one published run (N x D clustered synthetic vectors, tree-AH), configured with every
timeout and limit it offers (TIMEOUT seconds for reads and keep-alive):

  uvicorn    timeout_keep_alive, limit_concurrency (its only timeout is the keep-alive one)
  hypercorn  keep_alive_timeout (idle connections, from the connection's start), read_timeout
  granian    http1 header_read_timeout, backpressure (embedded server, one worker)
  imgindex   what `imgindex serve` runs (`serving.http_server.serve`, defaults but TIMEOUT)

Attacks, each on CONNECTIONS connections at once (bounded; loopback only):

  idle           connect and send nothing
  partial_head   send half of a request's headers, then nothing
  partial_body   send the headers and 10 of the 1,000 bytes Content-Length announces
  drip_head      send the headers one byte a second (slowloris)
  drip_body      send the headers, then the body one byte a second

For each: how many connections the server closed (or answered) within CAP seconds, the
median and largest time to close, the server's RSS with the connections open, and whether
a normal vector query on a fresh connection is answered meanwhile (and how fast).  Then
latency: CLIENTS threads x REQUESTS vector queries each (k=10, keep-alive connections).

    python -m benchmarks.http_servers --servers uvicorn,hypercorn,granian,imgindex
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks.common import _tree_rss_kb, clustered, environment
from benchmarks.pipeline_throughput import OUT

MODULE = "benchmarks.http_servers"
SERVERS = ("uvicorn", "hypercorn", "granian", "granian-mp", "imgindex")
ATTACKS = ("idle", "partial_head", "partial_body", "drip_head", "drip_body")


# ------------------------------------------------------------------ the server process


def child_serve(server: str, root: str, port: int, timeout: float, limit: int) -> None:
    """Serves `root` on 127.0.0.1:port with `server` until killed."""
    import asyncio

    from serving import Searcher
    from serving.http import create_app
    from serving.limits import ServerLimits

    if server == "imgindex":
        from serving import http_server

        limits = ServerLimits(keep_alive_timeout=timeout, body_timeout=timeout, max_connections=limit)
        http_server.serve(root, port=port, refresh_seconds=None, limits=limits, log_level="warning")
        return
    if server == "granian-mp":
        return _granian_mp(root, port, timeout, limit)
    # The same app under every server, with its body deadline (`body_timeout`) at TIMEOUT.
    app = create_app(Searcher.open(root), limits=ServerLimits(body_timeout=timeout))
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_keep_alive=int(timeout),
            limit_concurrency=limit,
        )
    elif server == "hypercorn":
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.keep_alive_timeout = timeout
        config.read_timeout = int(timeout)
        config.loglevel = "WARNING"
        config.accesslog = None
        asyncio.run(serve(app, config))
    elif server == "granian":
        from granian.constants import HTTPModes, Interfaces
        from granian.http import HTTP1Settings
        from granian.server.embed import Server

        granian = Server(
            app,
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGI,
            http=HTTPModes.http1,
            backpressure=limit,
            http1_settings=HTTP1Settings(header_read_timeout=int(timeout * 1000)),
            log_enabled=False,
        )
        asyncio.run(granian.serve())
    else:
        raise SystemExit(f"unknown server {server}")


def _granian_mp(root: str, port: int, timeout: float, limit: int) -> None:
    """granian's standard (multi-process) server: the app is made in its worker process."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    os.environ["IMGINDEX_BENCH_ROOT"] = root
    os.environ["IMGINDEX_BENCH_TIMEOUT"] = str(timeout)
    Granian(
        f"{MODULE}:granian_app",
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        workers=1,
        backpressure=limit,
        http1_settings=HTTP1Settings(header_read_timeout=int(timeout * 1000)),
        log_enabled=False,
    ).serve()


def granian_app():  # the factory granian's worker process calls (granian-mp)
    from serving import Searcher
    from serving.http import create_app
    from serving.limits import ServerLimits

    timeout = float(os.environ["IMGINDEX_BENCH_TIMEOUT"])
    return create_app(
        Searcher.open(os.environ["IMGINDEX_BENCH_ROOT"]), limits=ServerLimits(body_timeout=timeout)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server: str, root: str, timeout: float, limit: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", MODULE, "--child", server, "--root", root, "--port", str(port)]
        + ["--timeout", str(timeout), "--limit", str(limit)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            status, _ = _get(port, "/v1/healthz")
            if status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{server} did not start")
        time.sleep(0.2)


def _get(port: int, path: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------ attacks

_HEAD = (
    b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\nUser-Agent: imgindex-benchmark\r\n\r\n"
)


def _attack(port: int, kind: str, connections: int, cap: float, pid: int, d: int) -> dict:
    """Opens `connections` hostile connections of `kind` and watches until the server closes
    them or `cap` seconds pass; returns the figures (see the module docstring)."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    opened_at: dict[int, float] = {}
    closed_at: dict[int, float] = {}
    answered: set[int] = set()
    position: dict[int, int] = {}
    refused = 0
    for _ in range(connections):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            refused += 1
            s.close()
            continue
        s.setblocking(False)
        fd = s.fileno()
        opened_at[fd] = time.monotonic()
        position[fd] = 0
        try:
            if kind == "partial_head":
                s.send(_HEAD[: len(_HEAD) // 2])
            elif kind == "partial_body":
                s.send(_HEAD + b'{"vector": ')
            elif kind == "drip_body":
                s.send(_HEAD)
        except OSError:
            closed_at[fd] = time.monotonic()
        socks.append(s)
        selector.register(s, selectors.EVENT_READ)
    time.sleep(0.5)
    rss_mb = _tree_rss_kb(pid)[0] / 1024
    probe = _probe(port, d)
    next_drip = time.monotonic() + 1.0
    start = time.monotonic()
    while len(closed_at) < len(socks) and time.monotonic() - start < cap:
        for key, _ in selector.select(timeout=0.2):
            s, fd = key.fileobj, key.fd
            try:
                data = s.recv(65536)
            except (ConnectionResetError, OSError):
                data = b""
            if data:
                answered.add(fd)
                continue
            closed_at[fd] = time.monotonic()
            selector.unregister(s)
        if kind.startswith("drip") and time.monotonic() >= next_drip:
            next_drip += 1.0
            payload = _HEAD if kind == "drip_head" else b"0" * 1000
            for s in socks:
                fd = s.fileno()
                if fd in closed_at or position[fd] >= len(payload):
                    continue
                try:
                    s.send(payload[position[fd] : position[fd] + 1])
                    position[fd] += 1
                except OSError:
                    pass
    seconds = sorted(closed_at[fd] - opened_at[fd] for fd in closed_at)
    for s in socks:
        s.close()
    selector.close()
    alive = _get(port, "/v1/healthz")[0] == 200
    return {
        "attack": kind,
        "connections": len(socks),
        "refused": refused,
        "closed": len(closed_at),
        "answered": len(answered),
        "close_s_median": round(statistics.median(seconds), 1) if seconds else None,
        "close_s_max": round(seconds[-1], 1) if seconds else None,
        "rss_mb": round(rss_mb),
        "probe": probe,
        "alive_after": alive,
    }


def _probe(port: int, d: int) -> str:
    """A normal vector query on a fresh connection: 'HTTP status in ms', or the error."""
    vector = clustered(1, d, seed=9)[0].tolist()
    start = time.perf_counter()
    try:
        status, _ = _get(port, "/v1/search", {"vector": vector, "k": 10}, timeout=10)
    except OSError as exc:
        return f"{type(exc).__name__} after {time.perf_counter() - start:.1f} s"
    return f"{status} in {(time.perf_counter() - start) * 1000:.0f} ms"


def _latency(port: int, clients: int, requests: int, d: int) -> dict:
    q = clustered(clients * requests, d, seed=2)
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for v in q[c * requests : (c + 1) * requests]:
            body = json.dumps({"vector": v.tolist(), "k": 10})
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/search", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                ok = False
            mine.append((time.perf_counter() - t) * 1000)
            if not ok:
                with lock:
                    failures[0] += 1
        conn.close()
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "qps": round(len(latencies) / wall),
        "failed": failures[0],
    }


def measure(server: str, root: str, args: argparse.Namespace) -> dict:
    proc, port = _start(server, root, args.timeout, args.limit)
    try:
        base_rss = _tree_rss_kb(proc.pid)[0] / 1024
        _latency(port, 2, 50, args.d)  # warm-up
        latency = _latency(port, args.clients, args.requests, args.d)
        attacks = [
            _attack(port, kind, args.connections, args.cap, proc.pid, args.d)
            for kind in args.attacks.split(",")
            if kind
        ]
        return {"server": server, "base_rss_mb": round(base_rss), "latency": latency, "attacks": attacks}
    finally:
        proc.kill()
        proc.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=5.0, help="read and keep-alive timeout (s)")
    parser.add_argument("--limit", type=int, default=1000, help="connection / request limit where offered")
    parser.add_argument("--connections", type=int, default=300, help="hostile connections per attack")
    parser.add_argument("--cap", type=float, default=40.0, help="seconds an attack is watched")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500, help="vector queries per client")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, servers interleaved")
    parser.add_argument("--child", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_serve(args.child, args.root, args.port, args.timeout, args.limit)

    root = os.path.join(OUT, f"http-servers-{args.n}x{args.d}")
    if not os.path.exists(os.path.join(root, "LATEST")):
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.serving_latency", "--child", "build", "--root", root]
            + ["--n", str(args.n), "--d", str(args.d)],
            check=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
    print(f"# {environment()}; {args.n} x {args.d}, timeout {args.timeout} s, {args.connections} connections")
    for _ in range(args.rounds):
        for server in args.servers.split(","):
            result = measure(server, root, args)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
