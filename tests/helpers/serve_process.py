"""`imgindex serve` in a subprocess on 127.0.0.1 (port chosen by the OS, read from its start
line), its stderr collected line by line, its RSS read from /proc."""

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

from tests.helpers.http import rss_mb

_STARTED = re.compile(r"serving run \S+ of .* on http://([\d.]+):(\d+)")


class ServeProcess:
    def __init__(self, root, *flags, env=None):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgindex.cli", "serve", str(root), "--port", "0", *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None:
            with self._lock:
                for line in self.lines:
                    match = _STARTED.search(line)
                    if match:
                        self.url = f"http://{match.group(1)}:{match.group(2)}"
            if self.url is None:
                assert self.proc.poll() is None, "imgindex serve exited:\n" + "\n".join(self.lines)
                assert time.monotonic() < deadline, "imgindex serve did not start:\n" + "\n".join(self.lines)
                time.sleep(0.05)
        while True:  # the start line comes just before the socket serves
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/v1/healthz", timeout=2):
                break
            assert self.proc.poll() is None and time.monotonic() < deadline, "\n".join(self.lines)
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for_line(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in self.log() if re.search(pattern, line)]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n" + "\n".join(self.log()))

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self, sig=None):
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reader.join(10)
        return self.proc.returncode


@contextlib.contextmanager
def serving(root, *flags, env=None):
    server = ServeProcess(root, *flags, env=env)
    try:
        yield server
    finally:
        server.stop()
