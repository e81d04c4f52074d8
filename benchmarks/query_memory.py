"""Image queries: what decoding costs in memory, and the server's peak under hostile image load.

decode   For each format and mode, an image of MP megapixels (one colour, so that the file is
         small, like the 50 KB PNG declaring 39.7 MP of issue 14) is decoded the way image
         queries decode it (`retrieval.imaging.decode` with the embedder's input size, then
         `resize`), each in a fresh process: peak RSS above the process's RSS before, per
         megapixel.
server   `imgindex serve` (defaults, builtin efficientnet-lite0 run) on 127.0.0.1: RSS after
         start, after a first image query (the model loaded), then the peak while CLIENTS
         clients each send a PNG declaring just under the pixel limit (RGBA by default,
         --mode I;16 for the costliest) at once, ROUNDS times, plus BODIES maximum-size bodies sent slowly meanwhile;
         then RSS afterwards.  Answers by status.

    python -m benchmarks.query_memory --part decode
    python -m benchmarks.query_memory --part server
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from benchmarks.common import _tree_rss_kb, environment
from benchmarks.pipeline_throughput import OUT

MODULE = "benchmarks.query_memory"
FORMATS = {
    "PNG RGB": ("PNG", "RGB"),
    "PNG RGBA": ("PNG", "RGBA"),
    "PNG L": ("PNG", "L"),
    "PNG I;16": ("PNG", "I;16"),
    "JPEG RGB": ("JPEG", "RGB"),
    "WebP RGB": ("WEBP", "RGB"),
    "GIF P": ("GIF", "P"),
    "BMP RGB": ("BMP", "RGB"),
    "TIFF RGB": ("TIFF", "RGB"),
}


def flat_image(fmt: str, mode: str, pixels: int) -> bytes:
    """A one-colour image of about `pixels` pixels (4:3), encoded as `fmt`."""
    from PIL import Image

    width = int((pixels * 4 / 3) ** 0.5)
    height = pixels // width
    colour = {"RGB": (90, 140, 200), "RGBA": (90, 140, 200, 128), "L": 120, "I;16": 30000, "P": 3}[mode]
    image = Image.new(mode, (width, height), colour)
    buf = io.BytesIO()
    options = {"compress_level": 9} if fmt == "PNG" else {"lossless": True} if fmt == "WEBP" else {}
    if fmt == "TIFF":
        options = {"compression": "tiff_deflate"}
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not carried over from the parent
    that forked it, which generated the image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_decode(path: str, size: int) -> None:
    """Decodes the file at `path` as an image query does; prints the peak RSS above the start."""
    from retrieval import imaging

    data = open(path, "rb").read()
    imaging.decode(flat_image("PNG", "RGB", 64 * 64), min_size=size)  # imports and warms Pillow
    before = _rss_mb()
    decoded = imaging.decode(data, min_size=size, max_pixels=10**9)
    imaging.resize(decoded.image, size, "pad")
    peak = _hwm_mb()
    print(json.dumps({"peak_above_start_mb": peak - before, "decoded": list(decoded.image.size)}))


def part_decode(args: argparse.Namespace) -> None:
    print(f"# {environment()}; decode at input size {args.size}; one process per row")
    workdir = tempfile.mkdtemp(prefix="query-memory-")
    try:
        for mp in args.megapixels:
            for label, (fmt, mode) in FORMATS.items():
                data = flat_image(fmt, mode, int(mp * 1e6))
                path = os.path.join(workdir, "image")
                with open(path, "wb") as f:
                    f.write(data)
                out = subprocess.run(
                    [sys.executable, "-m", MODULE, "--child-decode", path, "--size", str(args.size)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                result = json.loads(out.strip().splitlines()[-1])
                peak = result["peak_above_start_mb"]
                print(
                    json.dumps(
                        {
                            "image": label,
                            "megapixels": mp,
                            "file_kb": round(len(data) / 1024, 1),
                            "decoded_at": result["decoded"],
                            "peak_mb": round(peak),
                            "mb_per_mp": round(peak / mp, 2),
                        }
                    ),
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------ the server


def _build_run(root: str, images: int) -> None:
    """A published run of `images` small JPEGs embedded by builtin efficientnet-lite0."""
    from PIL import Image

    src = os.path.join(root, "..", "query-memory-images")
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(src, f"img{i:03d}.jpg"), quality=85)
    subprocess.run(
        [sys.executable, "-m", "imgindex.cli", "build", f"--input={src}", f"--output={root}"]
        + ["--embedder=lite=builtin:efficientnet-lite0", "--reuse_from=none"],
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 120) -> int:
    request = urllib.request.Request(
        url + "/v1/search", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code
    except OSError:
        return -1


def _slow_body(port: int, size: int, seconds: float, outcomes: collections.Counter) -> None:
    """Sends a `size`-byte JSON body over `seconds` (the budget holds it meanwhile); counts the
    answer's status in `outcomes` ("closed" when the server ended the connection first)."""
    body = b'{"image": "' + b"A" * (size - 14) + b'"}'
    head = (
        f"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        try:
            s.sendall(head)
            step = len(body) // 10
            for i in range(10):
                s.sendall(body[i * step : (i + 1) * step if i < 9 else len(body)])
                time.sleep(seconds / 10)
        except OSError:  # refused early: the answer is still there to read
            pass
        s.settimeout(60)
        try:
            answer = s.recv(1000)
        except OSError:
            pass
    outcomes[answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.") else "closed"] += 1


def part_server(args: argparse.Namespace) -> None:
    from serving.searcher import DEFAULT_MAX_IMAGE_PIXELS

    root = os.path.join(OUT, "query-memory-root")
    if not os.path.exists(os.path.join(root, "LATEST")):
        shutil.rmtree(root, ignore_errors=True)
        _build_run(root, 50)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "imgindex.cli", "serve", root, "--port", str(port), "--refresh_seconds", "0"]
        + args.serve_flags,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/v1/healthz", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        rss = lambda: _tree_rss_kb(server.pid)[0] / 1024  # noqa: E731
        started = rss()
        small = flat_image("JPEG", "RGB", 640 * 480)
        assert _post(url, {"image": base64.b64encode(small).decode()}) == 200
        with_model = rss()
        pixels = args.pixels or DEFAULT_MAX_IMAGE_PIXELS - 1000
        bomb = base64.b64encode(flat_image("PNG", args.mode, pixels)).decode()
        peak = [with_model]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()

        def client() -> None:
            for _ in range(args.rounds):
                status = _post(url, {"image": bomb})
                with lock:
                    statuses[status] += 1

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        bodies: collections.Counter = collections.Counter()
        threads += [
            threading.Thread(target=_slow_body, args=(port, args.body_bytes, 5.0, bodies))
            for _ in range(args.bodies)
        ]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
        time.sleep(1)
        done.set()
        sampler.join()
        print(f"# {environment()}; serve flags {args.serve_flags or 'defaults'}")
        print(
            json.dumps(
                {
                    "pixels_per_query": pixels,
                    "query_png_kb": round(len(bomb) * 3 / 4 / 1024, 1),
                    "clients": args.clients,
                    "rounds": args.rounds,
                    "slow_bodies": args.bodies,
                    "body_bytes": args.body_bytes,
                    "rss_started_mb": round(started),
                    "rss_model_loaded_mb": round(with_model),
                    "rss_peak_mb": round(peak[0]),
                    "rss_after_mb": round(rss()),
                    "image_mode": args.mode,
                    "answers": dict(statuses),
                    "slow_body_answers": dict(bodies),
                    "seconds": round(seconds, 1),
                }
            )
        )
    finally:
        server.terminate()
        server.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["decode", "server"], default="decode")
    parser.add_argument("--megapixels", type=float, nargs="+", default=[10.0, 40.0])
    parser.add_argument("--size", type=int, default=224, help="embedder input size (decode part)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bodies", type=int, default=4, help="slow maximum-size bodies meanwhile")
    parser.add_argument("--body_bytes", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--mode", default="RGBA", help="PNG mode of the query images (RGBA, I;16, RGB)")
    parser.add_argument("--pixels", type=int, help="pixels of each query image (default: just under the cap)")
    parser.add_argument("--serve_flags", nargs="*", default=[], help="extra flags for imgindex serve")
    parser.add_argument("--child-decode", dest="child_decode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_decode:
        return child_decode(args.child_decode, args.size)
    if args.part == "decode":
        return part_decode(args)
    return part_server(args)


if __name__ == "__main__":
    main()
