"""What every method of benchmarks/peer_methods.py implements, and the settings they share."""

from __future__ import annotations

K = 10  # neighbours searched and recall measured at
BUILD_THREADS = 2  # threads a build may use (every search uses one)


class Method:
    """One method.  Each: build(base) in __init__ (timed by the caller), save(directory), points()
    -> list of parameter dicts, single(q, params) -> ids of one query, batch(queries, params)
    -> (q, k) ids.  `single_input` shapes one query as the library's single-query call wants it;
    an optional `_apply(params)` sets a point's parameters before it is timed."""

    single_limit = None  # max queries in the single-query loop (None: all)

    def single_input(self, q):
        return q

    def set_search_threads(self):
        pass

    def config(self) -> dict:
        return {}


def ladder(values, lo: int, hi: int) -> list[int]:
    """The distinct values, rounded and clipped to [lo, hi], sorted."""
    return sorted({min(hi, max(lo, int(round(v)))) for v in values})
