"""`ServerLimits`: the timeouts and bounds of the HTTP server (`serving.http_server`, `imgindex
serve`), in a module of its own so that the CLI can show their defaults without importing
the HTTP stack.  What they cost and why these defaults: README, Serving; BENCHMARKS.md,
"HTTP server: timeouts and limits" and "Image queries: memory"."""

from __future__ import annotations

import dataclasses
import math

from retrieval.errors import ConfigError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # a 12 MB image, base64-encoded


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Timeouts and bounds of the HTTP server; `imgindex serve` has a flag for each.

    keep_alive_timeout: seconds a connection may stay without complete request headers: a
      new connection that sends nothing or part of its headers, or a kept-alive one idle
      between requests, is closed after it (hypercorn's keep_alive_timeout).
    body_timeout: seconds the whole request body may take after the headers (408 after it);
      also the longest pause in reading a connection (hypercorn's read_timeout).
    max_connections: open connections at most; a new one beyond it is closed at once.  A
      connection counts until the server closes it: one its client closed while idle is
      noticed at keep_alive_timeout (hypercorn), so the default leaves room for ~800 new
      connections a second at the default keep_alive_timeout.  `serve` raises the process's
      open-file limit to fit it where the hard limit allows.
    max_requests: requests answered at once (body read, waiting for or running the query)
      at most; one more gets 503.
    max_body_bytes: one request body at most (413).
    max_buffered_bytes: request-body bytes held at once over all requests at most (503).
    max_image_queries: image queries decoded and embedded at once at most; more wait.
    image_wait_seconds: how long an image query waits for its turn before a 503.
    """

    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    max_connections: int = 4096
    max_requests: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_image_queries: int = 2
    image_wait_seconds: float = 10.0

    def check(self) -> ServerLimits:
        for name in ("keep_alive_timeout", "body_timeout", "image_wait_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {value!r}")
        for name in (
            "max_connections",
            "max_requests",
            "max_body_bytes",
            "max_buffered_bytes",
            "max_image_queries",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ConfigError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                f"({self.max_body_bytes}), or no request of the largest size could be read"
            )
        return self
