"""The command-line options of a root on object storage (s3://, gs://) that `imgindex serve`,
`query` and `runs` share: Beam's filesystem flags, and where served runs are copied."""

from __future__ import annotations

import argparse


def add(p: argparse.ArgumentParser, copies: bool = True) -> None:
    """The options of a root on object storage (s3://, gs://): Beam's filesystem flags, and
    with `copies` where its runs are copied for serving."""
    from serving.run_source import STORE_FLAGS

    group = p.add_argument_group(
        "object-store root (s3://..., gs://...; README, Serving from object storage)"
    )
    for flag, text in STORE_FLAGS:
        group.add_argument(f"--{flag}", help=text)
    if not copies:
        return
    group.add_argument(
        "--cache_dir",
        help="where its runs are copied and verified before they are served "
        "(default: $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex; runs/<scheme>/<bucket>/<path> in it)",
    )
    group.add_argument(
        "--store_timeout_seconds",
        type=float,
        help="reading LATEST taking longer is an error (Beam retries an unreachable store for "
        "minutes; default: 30, retrieval.run_cache.DEFAULT_STORE_TIMEOUT_SECONDS)",
    )


def of(args: argparse.Namespace) -> dict:
    """Searcher.open's options for an object-store root."""
    from serving.run_source import STORE_FLAGS

    return {
        "storage_flags": [
            f"--{flag}={getattr(args, flag)}" for flag, _ in STORE_FLAGS if getattr(args, flag) is not None
        ],
        "cache_dir": getattr(args, "cache_dir", None),
        "store_timeout_seconds": getattr(args, "store_timeout_seconds", None),  # None: the default
    }
