"""The HTTP server `imgindex serve` runs: hypercorn on a listener that caps open connections,
with the timeouts and limits of `ServerLimits`, around the app of `serving.http.create_app`.

Why hypercorn and not uvicorn: uvicorn has no read timeout (a connection that sends nothing,
or half its headers, stays open for ever); hypercorn closes a connection whose request headers
do not arrive within `keep_alive_timeout`, and was measured against uvicorn and granian
(BENCHMARKS.md, "HTTP server: timeouts and limits").

The server's part of the limits: a connection whose request headers do not arrive within
keep_alive_timeout (a new connection, or one idle between requests) is closed, connections
beyond max_connections are refused (closed at once), and the process's open-file limit is
raised to fit them.  `serve` also configures logging (one line per event) and caps glibc's
malloc arenas.  The rest of the limits are the app's (`serving.http`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serving.http import create_app
from serving.limits import ServerLimits
from serving.searcher import Searcher

__all__ = ["configure_logging", "listen", "run_server", "serve"]

# The server logs under the app's name: one logger for everything `imgindex serve` says.
log = logging.getLogger("serving.http")


class _OneLineFormatter(logging.Formatter):
    """One line per event: a traceback is folded onto the line of its message."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def configure_logging(level: str = "info") -> None:
    """INFO (or `level`) and above to stderr, one line per event: time, level, logger,
    message.  Replaces the root logger's handlers (`imgindex serve` owns its process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # hypercorn's own "Running on ..." duplicates the start line; its warnings and errors stay.
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, root.level))


class _Connection(socket.socket):
    """An accepted connection that tells its listener when it is closed."""

    listener: _Listener | None = None

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.open -= 1
        super().close()


class _Listener(socket.socket):
    """A listening socket that keeps at most `max_connections` accepted connections open:
    one accepted beyond that is closed at once (the client sees the connection end before
    any answer).  asyncio calls accept() on this object and close() on what it returns."""

    def __init__(self, family: int, max_connections: int):
        super().__init__(family, socket.SOCK_STREAM)
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self._refusing_since: float | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        while True:
            fd, address = self._accept()  # type: ignore[attr-defined]  # BlockingIOError: none waiting
            if self.open < self.max_connections:
                break
            os.close(fd)
            self.refused += 1
            if self._refusing_since is None:
                self._refusing_since = time.monotonic()
                log.warning(
                    "%d connections are open (max_connections); closing new connections until one ends",
                    self.open,
                )
        if self._refusing_since is not None:
            log.info("accepting connections again (%d refused meanwhile)", self.refused)
            self._refusing_since, self.refused = None, 0
        conn = _Connection(self.family, self.type, self.proto, fileno=fd)
        conn.listener = self
        self.open += 1
        return conn, address


# glibc malloc arenas of the serving process (unless MALLOC_ARENA_MAX says otherwise).  With
# glibc's default (8 per core) the query threads' arenas kept freed runs: RSS grew by ~6 runs'
# size over 40 swaps under 8 query clients, ~2 with 2 arenas (BENCHMARKS.md, "Hot swaps").
MALLOC_ARENAS = 2


def _limit_malloc_arenas() -> None:
    """Caps glibc's malloc arenas at MALLOC_ARENAS (mallopt M_ARENA_MAX) before the server
    starts its threads; nothing on other C libraries or when MALLOC_ARENA_MAX is set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_arena_max = -8
    if not mallopt(m_arena_max, MALLOC_ARENAS):
        log.warning("could not limit malloc arenas to %d", MALLOC_ARENAS)


# Files the process keeps open besides its connections (index files, pipes, the listener).
_OTHER_FILES = 256


def _fit_open_files(max_connections: int) -> int:
    """Raise the soft open-file limit so that max_connections connections fit (up to the
    hard limit); returns the connections that fit, with a warning when fewer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _OTHER_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitting = max(1, soft - _OTHER_FILES)
        log.warning(
            "the open-file limit (%d, hard %s) fits %d connections, not max_connections=%d: "
            "serving at most %d; raise it (ulimit -n) or lower --max_connections",
            soft,
            hard,
            fitting,
            max_connections,
            fitting,
        )
        return fitting
    return max_connections


def listen(host: str, port: int, max_connections: int, backlog: int = 128) -> socket.socket:
    """A bound, listening, non-blocking socket that caps open connections (see `_Listener`)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = _Listener(family, max_connections)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without, a response written in two parts waits for
        # the client's delayed ACK (~40 ms a request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def run_server(
    app: Any,
    sock: socket.socket,
    limits: ServerLimits,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Serves `app` on the listening `sock` (see `listen`) with hypercorn until
    shutdown_trigger returns (None: until SIGINT or SIGTERM)."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config, Sockets

    class _Config(Config):
        def create_sockets(self) -> Sockets:
            return Sockets(secure_sockets=[], insecure_sockets=[sock], quic_sockets=[])

    config = _Config()
    config.keep_alive_timeout = limits.keep_alive_timeout
    config.read_timeout = max(1, math.ceil(limits.body_timeout))
    config.graceful_timeout = 5.0
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger, mode="asgi")


def serve(
    path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    refresh_seconds: float | None = 60,
    *,
    embedder: str | None = None,
    verify: bool = True,
    limits: ServerLimits | None = None,
    expose_source: bool = False,
    log_level: str = "info",
    **open_options: Any,
) -> None:
    """Open `path` (output root or run directory) and serve it over HTTP until SIGINT/SIGTERM.

    Binds 127.0.0.1 unless `host` says otherwise.  refresh_seconds: how often LATEST is
    re-checked (None: never; ignored for a run directory).  limits: `ServerLimits` (defaults
    when None).  expose_source: show hits' "source" metadata.  Logging is configured (INFO,
    one line per event, stderr).  open_options go to Searcher.open (handles,
    model_cache_dir, allow_unpublished, max_image_pixels, and for an object-store root
    storage_flags and cache_dir).
    """
    configure_logging(log_level)
    limits = (limits or ServerLimits()).check()
    _limit_malloc_arenas()
    searcher = Searcher.open(path, embedder=embedder, verify=verify, **open_options)
    if refresh_seconds and not searcher.info()["refresh"]["follows_latest"]:
        log.info("%s is a run directory: it is served as is, LATEST is not followed", path)
        refresh_seconds = None
    app = create_app(searcher, refresh_seconds=refresh_seconds, limits=limits, expose_source=expose_source)
    limits = dataclasses.replace(limits, max_connections=_fit_open_files(limits.max_connections))
    sock = listen(host, port, limits.max_connections)
    bound = sock.getsockname()
    log.info(
        "serving run %s of %s (embedders: %s) on http://%s:%d; refresh every %s; limits: %s",
        searcher.run_id,
        path if "://" in path else os.path.abspath(path),
        ", ".join(searcher.embedders),
        host,
        bound[1],
        f"{refresh_seconds:g} s" if refresh_seconds else "never",
        ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(limits).items()),
    )
    try:
        asyncio.run(run_server(app, sock, limits))
    finally:
        sock.close()
        log.info("stopped serving run %s", searcher.run_id)
