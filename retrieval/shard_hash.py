"""Which shard a row belongs to: a stable hash of its id (`shard_of`), the shards' directory
names, and how many shards keep each within a row budget (`shards_for`).  `retrieval.sharded`
re-exports them with the sharded index they partition.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from retrieval.errors import ConfigError

HASH = "blake2b(id as UTF-8, digest_size=8, person=b'imgindex-shard') as little-endian uint64 mod num_shards"
_PERSON = b"imgindex-shard"
# Shard sizes from a hash are binomial around n/N; `shards_for` keeps this many standard
# deviations of headroom so that no shard exceeds the budget in practice (and the build
# checks it anyway).
_SIGMAS = 6.0


def shard_of(ids: Sequence[str], num_shards: int) -> np.ndarray:
    """The shard of each id (an int64 array); stable across runs, machines and Python versions."""
    _check_num_shards(num_shards)
    keys = np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(i.encode("utf-8"), digest_size=8, person=_PERSON).digest(), "little"
            )
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )
    return (keys % np.uint64(num_shards)).astype(np.int64)


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def shards_for(n: int, max_shard_vectors: int) -> int:
    """The fewest shards whose hash-partitioned sizes stay within max_shard_vectors
    (mean n/N plus six standard deviations)."""
    if max_shard_vectors < 1:
        raise ConfigError(f"max_shard_vectors must be >= 1, got {max_shard_vectors}")
    shards = max(1, math.ceil(n / max_shard_vectors))
    while True:
        mean = n / shards
        if mean + _SIGMAS * math.sqrt(mean * (1 - 1 / shards)) <= max_shard_vectors or mean < 1:
            return shards
        shards += 1


def _check_num_shards(num_shards: object) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ConfigError(f"num_shards must be an integer >= 1, got {num_shards!r}")
