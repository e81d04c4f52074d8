"""Embedding throughput: the Beam pipeline against a plain Python loop and the bare model.

Data: N distinct real JPEGs of 640x480, made from the UKBench photos in ../shared/data by
random crops (75-100% of the area), random horizontal flips and JPEG re-encoding
(quality 85-95), so every file differs.  They are written once under benchmarks/out/.

Methods, each run in its own fresh process, rounds interleaved (A B C D, A B C D, ...):
  bare      the builtin model alone on pre-decoded, pre-resized tensors (batch 32);
            images/s over the model calls only (no start-up, no decode)
  loop      a plain sequential Python loop, as a user would write it: read file, Pillow
            decode at full size, resize, batch 32, model
  pipeline  `imgindex embed` on the DirectRunner engine (FnApiRunner), in_memory
  pipeline-mp  the same with --direct_running_mode=multi_processing --direct_num_workers=2
For loop and pipelines, images/s counts everything from process start to exit (imports,
model load, Beam start-up and shutdown), as a nightly job experiences it.  Peak RSS is the
largest sum of resident memory over the process and all its descendants, sampled every
0.1 s.  Reported figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.common import environment, run_child

HERE = os.path.dirname(os.path.abspath(__file__))
UKBENCH = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "ukbench56", "images"))
OUT = os.path.join(HERE, "out")
METHODS = ("bare", "loop", "pipeline", "pipeline-mp")


def make_data(n: int, seed: int = 0) -> str:
    """Writes n distinct 640x480 JPEGs derived from UKBench; returns the folder."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(OUT, f"ukbench-variants-{n}-seed{seed}")
    if os.path.isdir(folder) and len(os.listdir(folder)) == n:
        return folder
    if not os.path.isdir(UKBENCH):
        sys.exit(f"benchmark data needs the UKBench photos at {UKBENCH}")
    sources = sorted(os.path.join(UKBENCH, f) for f in os.listdir(UKBENCH) if f.endswith(".jpg"))
    photos = [Image.open(p).convert("RGB") for p in sources]
    rng = np.random.default_rng(seed)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = np.sqrt(rng.uniform(0.75, 1.0))
        cw, ch = int(w * scale), int(h * scale)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((left, top, left + cw, top + ch)).resize((640, 480), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(os.path.join(tmp, f"{i:06d}.jpg"), "JPEG", quality=int(rng.integers(85, 96)))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def child_bare(folder: str, batch: int, model_handle: str) -> None:
    import numpy as np

    from retrieval import embedders, imaging

    model, spec = embedders.complete_spec(embedders.parse_embedder_arg(f"lite={model_handle}"))
    files = _files(folder)
    pixels = np.stack(
        [
            imaging.resize(
                imaging.decode(open(p, "rb").read(), min_size=spec.input_size).image,
                spec.input_size,
                spec.resizing(),
            )
            for p in files
        ]
    )
    embedders.embed_batch(model, spec, pixels[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        embedders.embed_batch(model, spec, pixels[i : i + batch])
    print(f"steady {len(pixels) / (time.perf_counter() - start):.2f}")


def child_loop(folder: str, batch: int, model_handle: str) -> None:
    import numpy as np

    from retrieval import embedders, imaging

    model, spec = embedders.complete_spec(embedders.parse_embedder_arg(f"lite={model_handle}"))
    start = time.perf_counter()
    pending, out = [], []
    for path in _files(folder):
        with open(path, "rb") as f:
            image = imaging.decode(f.read())  # full-size decode: no draft
        pending.append(imaging.resize(image.image, spec.input_size, spec.resizing()))
        if len(pending) == batch:
            out.append(embedders.embed_batch(model, spec, np.stack(pending)))
            pending = []
    if pending:
        out.append(embedders.embed_batch(model, spec, np.stack(pending)))
    n = sum(len(o) for o in out)
    print(f"steady {n / (time.perf_counter() - start):.2f}")


def child_pipeline(folder: str, batch: int, model_handle: str, multi: bool) -> None:
    from pipelines import embed

    out = tempfile.mkdtemp(prefix="imgindex-bench-")
    try:
        argv = [
            f"--input={folder}/*.jpg",
            f"--output={out}/run",
            f"--batch_size={batch}",
            f"--embedder=lite={model_handle}",
        ]
        if multi:
            argv += ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
        report = embed.run(argv)
        assert report["status"] == "ok" and report["counts"]["failed_total"] == 0, report
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--model",
        default="builtin:efficientnet-lite0",
        help="embedder handle used by every method (e.g. builtin:efficientnet-lite0-bf16)",
    )
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "bare":
            child_bare(args.data, args.batch_size, args.model)
        elif args.child == "loop":
            child_loop(args.data, args.batch_size, args.model)
        else:
            child_pipeline(args.data, args.batch_size, args.model, multi=args.child == "pipeline-mp")
        return

    methods = args.methods.split(",")
    folder = make_data(args.images)
    results = {m: {"rate": [], "steady": [], "rss": []} for m in methods}
    for round_ in range(args.rounds):
        for method in methods:
            wall, rss, out = run_child(
                "benchmarks.pipeline_throughput",
                [
                    "--child",
                    method,
                    "--data",
                    folder,
                    "--batch_size",
                    str(args.batch_size),
                    "--model",
                    args.model,
                ],
            )
            steady = [float(line.split()[1]) for line in out.splitlines() if line.startswith("steady ")]
            results[method]["rate"].append(args.images / wall)
            results[method]["steady"].extend(steady)
            results[method]["rss"].append(rss)
            print(
                f"# round {round_ + 1} {method}: {args.images / wall:.1f} images/s with start-up"
                + (f", {steady[0]:.1f} steady" if steady else "")
                + f", peak RSS {rss:.0f} MB",
                flush=True,
            )

    med = {m: {k: statistics.median(v) if v else None for k, v in r.items()} for m, r in results.items()}
    loop = med.get("loop", {}).get("rate")
    bare = med.get("bare", {}).get("steady")
    print(
        f"\n# embedding throughput: {args.model}, {args.images} distinct 640x480 JPEGs, batch {args.batch_size}, "
        f"medians of {args.rounds} interleaved rounds, {environment()}"
    )
    print("| method | images/s incl. start-up | steady images/s | vs loop | vs bare model | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in methods:
        m = med[method]
        rate = m["steady"] if method == "bare" else m["rate"]
        steady = f"{m['steady']:.1f}" if m["steady"] else "-"
        # Like for like: start-up-inclusive rates against the loop's.
        vs_loop = f"{rate / loop:.2f}x" if loop and method not in ("loop", "bare") else "-"
        vs_bare = f"{rate / bare:.2f}x" if bare and method != "bare" else "-"
        with_start = "-" if method == "bare" else f"{m['rate']:.1f}"
        print(f"| {method} | {with_start} | {steady} | {vs_loop} | {vs_bare} | {m['rss']:.0f} |")


if __name__ == "__main__":
    main()
