"""The `imgindex` commands that read a published output root, a run or an index directory:
`query`, `runs`, `serve` and `inspect` (the parser and the job commands are in
`imgindex.cli`).  Like those, each imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import json
import os

from imgindex import store_options
from retrieval.errors import ConfigError, ImgIndexError

NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, unless it has none to show (None, an off
    switch) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _check_path(path: str, what: str) -> None:
    """ConfigError unless `path` is an existing directory: a typo fails in one line."""
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist (expected {what})")
    if not os.path.isdir(path):
        raise ConfigError(f"{path} is not a directory (expected {what})")


def add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="query a published index by image file, vector or id",
        description="Query the run published under an output root (following LATEST) "
        "or a run directory; prints the hits best first. A .npy --vector of shape (d,) "
        "or (1, d) (what the embedder returns for one image) is one query; a (q, d) "
        "array with q > 1 runs q queries: the table gains a leading 'query' column "
        "(the row, from 0) and --json prints one list of hits per row.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", help="output root or run directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image file to embed with the index's embedder")
    what.add_argument(
        "--vector",
        help="comma-separated floats, or a .npy file holding one vector (d,) or (1, d), or several (q, d)",
    )
    what.add_argument("--id", help="an indexed id: its own vector is the query")
    p.add_argument("--k", type=int, default=10, help="hits per query")
    p.add_argument("--embedder", help="which index, when the run has several (default: the only one)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    store_options.add(p)
    p.set_defaults(func=_run_query)


def _query_vector(text: str):  # -> numpy.ndarray (numpy is imported only when needed)
    """The query vector(s) of --vector: shape (d,) for one query, (q, d) for several."""
    import numpy as np

    if text.endswith(".npy"):
        try:
            with open(text, "rb") as f:
                magic = f.read(len(NPY_MAGIC))
                f.seek(0)
                array = np.load(f) if magic == NPY_MAGIC else None  # np.load would try a pickle
        except OSError as exc:  # missing, unreadable, a directory
            raise ConfigError(f"--vector {text}: cannot read it: {exc.strerror or exc}") from exc
        except ValueError as exc:  # truncated, pickled objects
            raise ConfigError(f"--vector {text}: cannot read it as a .npy array: {exc}") from exc
        if array is None:
            raise ConfigError(f"--vector {text} is not a .npy file (numpy.save writes them)")
        if array.ndim not in (1, 2) or 0 in array.shape:
            raise ConfigError(
                f"--vector {text} holds an array of shape {array.shape}; expected one "
                "vector (d,) or (1, d), or one query per row (q, d)"
            )
        return array[0] if array.ndim == 2 and len(array) == 1 else array
    try:
        return np.array([float(v) for v in text.split(",")], np.float32)
    except ValueError as exc:
        raise ConfigError(f"--vector must be comma-separated numbers or a .npy file: {exc}") from exc


def _read_image(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"--image {path}: cannot read it: {exc.strerror or exc}") from exc


def _run_query(args: argparse.Namespace) -> int:
    from serving import Searcher

    # Read the query before opening (and checksumming) the index: a typo fails at once.
    image = _read_image(args.image) if args.image else None
    vector = _query_vector(args.vector) if args.vector is not None else None
    if "://" in args.path:
        searcher = Searcher.open(args.path, embedder=args.embedder, **store_options.of(args))
    else:
        _check_path(args.path, "an output root or a run directory")
        searcher = Searcher.open(args.path, embedder=args.embedder)
    if image is not None:
        results = [searcher.search_image(image, k=args.k, embedder=args.embedder)]
    elif args.id is not None:
        results = [searcher.search_id(args.id, k=args.k, embedder=args.embedder)]
    else:
        found = searcher.search_vector(vector, k=args.k, embedder=args.embedder)
        results = [found] if vector.ndim == 1 else found
    several = vector is not None and vector.ndim == 2  # (1, d) became (d,) above
    if args.json:
        lists = [[hit.to_dict() for hit in hits] for hits in results]
        print(json.dumps(lists if several else lists[0], indent=2))
        return 0
    print(f"{'query':>5}  " * several + f"{'rank':>4}  {'score':>8}  {'id':40} source")
    for row, hits in enumerate(results):
        for hit in hits:
            print(
                f"{row:5d}  " * several
                + f"{hit.rank:4d}  {hit.score:8.4f}  {hit.id:40} {hit.metadata.get('source', '')}"
            )
    return 0


def add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs under an output root",
        description="List every run under an output root, oldest first: id, creation time "
        "(UTC), status (published, rejected, failed; incomplete: no run_manifest.json, a "
        "build still running or one that was killed; damaged: an unreadable manifest), "
        "records, failed records and each embedder's rows. * marks the run LATEST names.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("root", help="output root (holds LATEST and runs/)")
    p.add_argument("--json", action="store_true", help="print a JSON list, oldest first, instead of a table")
    store_options.add(p, copies=False)
    p.set_defaults(func=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from retrieval import output_root, storage

    if storage.is_remote(args.root):
        storage.configure(storage.options_from_flags(store_options.of(args)["storage_flags"]))
        storage.check_bucket(args.root)

    found = output_root.list_runs(args.root)
    if args.json:
        print(json.dumps([run.to_dict() for run in found], indent=2))
        return 0
    if not found:
        print(f"no runs under {args.root}")
        return 0
    print(f"  {'run id':24} {'created (UTC)':19}  {'status':10} {'records':>9} {'failed':>7}  embedders")
    for run in found:
        embedders = " ".join(f"{e.name}={'?' if e.n is None else e.n}" for e in run.embedders)
        note = run.reason or run.error
        print(
            f"{'*' if run.is_latest else ' '} {run.run_id:24} {run.created_at:%Y-%m-%d %H:%M:%S}  "
            f"{run.status:10} {'-' if run.records is None else run.records:>9} "
            f"{'-' if run.failed_total is None else run.failed_total:>7}  {embedders or '-'}"
            + (f"  ({note})" if note else "")
        )
    try:
        latest = output_root.latest_run_id(args.root)
    except ImgIndexError as exc:
        print(f"LATEST is unreadable: {exc}")
        return 0
    if latest is None:
        print("* none: LATEST names no run (nothing published)")
    elif not any(run.is_latest for run in found):
        print(f"* none: LATEST names runs/{latest}, which is missing")
    return 0


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a published index over HTTP (JSON, no gRPC)",
        description="HTTP JSON API: POST /v1/search, GET /v1/healthz, GET /v1/index, "
        "GET /v1/openapi.json. Follows LATEST and swaps in newer runs without dropping "
        "queries. Logs to stderr (INFO, one line per event). The limits below bound what "
        "slow, stalled or hostile clients can hold (README, Serving).",
        formatter_class=HelpFormatter,
    )
    from serving.searcher import DEFAULT_MAX_IMAGE_PIXELS

    defaults = _serve_defaults()
    p.add_argument("path", help="output root (follows LATEST) or run directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only by default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--refresh_seconds",
        type=float,
        default=60.0,
        help="how often LATEST is checked for a newer run (0 = never)",
    )
    p.add_argument(
        "--expose_source",
        action="store_true",
        help="include hits' 'source' metadata (input shard paths on this machine) in answers",
    )
    p.add_argument(
        "--keep_alive_timeout",
        type=float,
        default=defaults.keep_alive_timeout,
        help="seconds a connection may stay without complete request headers (new or idle)",
    )
    p.add_argument(
        "--body_timeout",
        type=float,
        default=defaults.body_timeout,
        help="seconds a request body may take to arrive (408 after it)",
    )
    p.add_argument(
        "--max_connections",
        type=int,
        default=defaults.max_connections,
        help="open connections at most; one more is closed at once",
    )
    p.add_argument(
        "--max_requests",
        type=int,
        default=defaults.max_requests,
        help="requests answered at once (body read) at most; one more gets 503 overloaded",
    )
    p.add_argument(
        "--max_body_bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="largest request body (413 above it)",
    )
    p.add_argument(
        "--max_buffered_bytes",
        type=int,
        default=defaults.max_buffered_bytes,
        help="request-body bytes held at once over all requests (503 overloaded above it)",
    )
    p.add_argument(
        "--max_image_queries",
        type=int,
        default=defaults.max_image_queries,
        help="image queries decoded and embedded at once; more wait for a turn",
    )
    p.add_argument(
        "--image_wait_seconds",
        type=float,
        default=defaults.image_wait_seconds,
        help="how long an image query waits for its turn (503 overloaded after it)",
    )
    p.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="image queries declaring more pixels are refused (422) before decoding",
    )
    store_options.add(p)
    p.set_defaults(func=_run_serve)


def _serve_defaults():  # -> serving.limits.ServerLimits (no HTTP stack imported)
    from serving.limits import ServerLimits

    return ServerLimits()


def _run_serve(args: argparse.Namespace) -> int:
    from serving import http_server
    from serving.limits import ServerLimits

    limits = ServerLimits(
        keep_alive_timeout=args.keep_alive_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_requests=args.max_requests,
        max_body_bytes=args.max_body_bytes,
        max_buffered_bytes=args.max_buffered_bytes,
        max_image_queries=args.max_image_queries,
        image_wait_seconds=args.image_wait_seconds,
    )
    http_server.serve(
        args.path,
        host=args.host,
        port=args.port,
        refresh_seconds=args.refresh_seconds or None,
        limits=limits,
        expose_source=args.expose_source,
        max_image_pixels=args.max_image_pixels,
        **(store_options.of(args) if "://" in args.path else {}),
    )
    return 0


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what a run, an output root or an index directory holds",
        description="Show what a run, an output root (the run LATEST names) or an index "
        "directory holds: counts, gates, each embedder's index, recall and timings.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", help="output root (follows LATEST), run directory or index directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from retrieval import dba, runs, sharded
    from retrieval import manifest as index_manifest

    if "://" in args.path:
        raise ConfigError(
            f"{args.path}: `imgindex inspect` reads local paths; for a root on object storage "
            "use `imgindex runs ROOT` (with the store flags), or inspect the copy that "
            "`imgindex query`/`serve` keep under --cache_dir"
        )
    _check_path(args.path, "an output root, a run directory or an index directory")
    if sharded.manifest_kind(args.path) == sharded.KIND:
        data = json.loads(open(os.path.join(args.path, index_manifest.MANIFEST_NAME)).read())
        if not args.json:
            print(
                f"sharded index {args.path}: n={data['n']} d={data['d']} distance={data['distance']} "
                f"shards={data['num_shards']} recall@{data['recall'].get('k')}={data['recall'].get('value')} "
                f"(merged; per shard {data['recall'].get('per_shard')})"
            )
            _print_recall_per_k(data["recall"], "  merged ")
            for shard in data["shards"]:
                print(
                    f"  {shard['dir']}: n={shard['n']} {shard.get('method')} search {shard.get('search_defaults')}"
                )
    elif os.path.isfile(os.path.join(args.path, index_manifest.MANIFEST_NAME)):
        m = index_manifest.read_manifest(args.path)
        data = m.to_dict()
        if not args.json:
            print(
                f"index {args.path}: n={m.n} d={m.d} distance={m.distance} "
                f"method={m.index_config.get('method')}{dba.describe(m.dba)} "
                f"recall@{m.recall.get('k')}={m.recall.get('value')} "
                f"search {m.search_defaults} embedder {(m.embedder or {}).get('handle')} files {len(m.files)}"
            )
            _print_recall_per_k(m.recall, "  ")
    else:
        run_dir = runs.resolve_run(args.path)
        m = runs.read_run_manifest(run_dir)
        data = m.to_dict()
        if not args.json:
            print(
                f"run {m.run_id} ({run_dir}): {m.status}, created {m.created_at}, imgindex {m.producer_version}"
            )
            print(f"  inputs: {m.inputs.get('globs')} ({m.inputs.get('files')} files)")
            print(
                f"  records: {m.counts.get('records')}, failed {m.counts.get('failed_total')}; gates: "
                f"{'passed' if m.gates.get('passed') else m.gates.get('reasons')}"
            )
            for name, e in m.embedders.items():
                print(
                    f"  {name}: {e.spec['handle']} ({e.spec['fingerprint'][:23]}...) n={e.n} "
                    f"d={e.d} {e.method}{dba.describe(e.dba)} recall@{e.recall['k']}={e.recall['value']} "
                    f"search {e.search_defaults} build {e.build_seconds}s"
                )
                spec = e.spec
                # Legacy specs (no pad/filter recorded) were made with a grey pad and bilinear.
                print(
                    f"    preprocessing: size={spec.get('input_size')} resize={spec.get('resize')} "
                    f"pad={spec.get('pad', 'grey')} filter={spec.get('filter', 'bilinear')} "
                    f"normalisation={spec.get('normalisation')}"
                )
                _print_recall_per_k(e.recall, "    ")
            print(f"  timings: {m.timings}")
            if m.error:
                print(f"  error: {m.error}")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def _print_recall_per_k(recall: dict, indent: str) -> None:
    """A line per k of the index's ladder: its recall and the knobs searches for it use (none
    for an index built before recall was measured per k)."""
    for entry in recall.get("per_k") or []:
        knobs = ", ".join(
            f"{name}={entry[name]}"
            for name in ("leaves_to_search", "pre_reorder_num_neighbors")
            if entry.get(name) is not None
        )
        print(
            f"{indent}recall@{entry['k']}={entry['value']} ({entry['n_queries']} queries{'; ' + knobs if knobs else ''})"
        )
