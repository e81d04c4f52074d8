"""The `imgindex` command.  Subcommands import their heavy dependencies only when they run,
so `imgindex --help` and `imgindex <cmd> --help` never import TensorFlow."""

from __future__ import annotations

import argparse
import json
import os
import sys

from retrieval.errors import ConfigError, ImgIndexError
from retrieval.version import __version__


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the builtin embedders, or materialise one",
        description="List the builtin (offline) embedders. With --export, "
        "materialise one as a TF Hub SavedModel in the cache and print its path.",
    )
    p.add_argument("--export", metavar="NAME", help="builtin to materialise, e.g. efficientnet-lite0")
    p.add_argument("--cache_dir", help="cache root (default $IMGINDEX_CACHE_DIR or ~/.cache/imgindex)")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from retrieval import builtin

    if args.export:
        model = builtin.materialize(args.export, cache_dir=args.cache_dir)
        print(f"{builtin.BUILTIN_PREFIX}{model.name}\t{model.path}\t{model.fingerprint}")
        return 0
    print(f"{'handle':32} {'input':>5} {'dim':>5}  weights package")
    for name in builtin.builtin_names():
        spec = builtin.BUILTIN_MODELS[name]
        print(
            f"{builtin.BUILTIN_PREFIX + name:32} {spec.input_size:5d} {spec.feature_dim:5d}  {spec.package}"
        )
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build a ScaNN index from embedding tables",
        description="Build a ScaNN index from Parquet embedding tables, measure "
        "its recall against exact search, and save it with a manifest.",
    )
    p.add_argument("--embeddings", required=True, help="a Parquet file or a directory of them")
    p.add_argument("--output", required=True, help="index directory to create")
    p.add_argument("--distance", default="cosine", choices=["cosine", "dot_product", "squared_l2"])
    p.add_argument("--k", type=int, default=10, help="neighbours the recall is measured at")
    p.add_argument(
        "--target_recall",
        type=float,
        default=0.95,
        help="search knobs are tuned to the cheapest setting reaching this recall@k",
    )
    p.add_argument(
        "--tuning_queries",
        default=None,
        help="held-out query vectors (a .npy file, or embedding tables from the same "
        "embedder) that measure recall and tune the search knobs instead of sampled "
        "database rows",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    p.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from retrieval import index, tables

    data = tables.read_embeddings(args.embeddings)
    queries = None
    if args.tuning_queries:
        queries = tables.load_tuning_queries(args.tuning_queries, data.spec)
    built = index.build_index(
        data.vectors,
        data.ids,
        distance=args.distance,
        embedder=data.spec.to_dict(),
        k=args.k,
        target_recall=args.target_recall,
        tuning_queries=queries,
    )
    built.save(args.output, overwrite=args.overwrite)
    m = built.manifest
    recall = (
        "not measured (fewer than 2 vectors)"
        if m.recall["value"] is None
        else (f"recall@{m.recall['k']}={m.recall['value']:.4f} (target {m.recall['target']})")
    )
    print(
        f"index: {args.output}  n={m.n} d={m.d} distance={m.distance} "
        f"method={built.method}  {recall}  build {m.build_seconds:.1f}s"
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="embed bundled demo photos with the builtin model, index, query",
        description="The embedded default job: augmented variants of scikit-image's "
        "sample photographs, embedded with the builtin EfficientNet-Lite0, indexed "
        "with ScaNN and queried with each original photo.",
    )
    p.add_argument("--output", default="runs/demo", help="where the tables, index and contact sheet go")
    p.add_argument("--embedder", default="builtin:efficientnet-lite0", help="embedder handle")
    p.add_argument("--variants", type=int, default=6, help="augmented variants per photo")
    p.add_argument("--k", type=int, default=6, help="hits shown per query")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from imgindex import demo

    return demo.run(args.output, embedder=args.embedder, variants=args.variants, k=args.k)


_BEAM_FLAGS = (
    "Any other flag (--runner, --direct_running_mode, --direct_num_workers, Dataflow, "
    "Flink or Spark options) goes to Beam; without --runner the pipeline runs locally "
    "on Beam's FnApiRunner. A flag neither these nor Beam's pipeline options know is "
    "an error (exit status 2), not ignored."
)


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", add_help=False, help="run the Beam embedding pipeline (shards -> Parquet)")
    p.set_defaults(func=_run_embed, passthrough=True)


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        add_help=False,
        help="the nightly job: embed, build one index per embedder, validate, publish",
    )
    p.set_defaults(func=_run_build, passthrough=True)


def beam_help(command: str) -> str:
    """Help of a pass-through subcommand, from its PipelineOptions class (imports Beam, not TF)."""
    from pipelines.options import EmbedOptions

    if command == "build":
        from pipelines.build_options import BuildOptions as options_class

        description = (
            "The nightly job: run the embedding pipeline into OUTPUT/runs/<run_id>/, build "
            "and validate one ScaNN index per embedder, then point OUTPUT/LATEST at the run. "
            "Refuses to publish (exit status 3, LATEST unchanged) when recall or the failure "
            "rate misses its gate. "
        )
    else:
        options_class = EmbedOptions
        description = (
            "Run the Beam embedding pipeline: image shards in, one Parquet embedding table "
            "per embedder plus a failures table and a run report out. "
        )
    parser = argparse.ArgumentParser(prog=f"imgindex {command}", description=description + _BEAM_FLAGS)
    for cls in reversed(options_class.__mro__):
        if "_add_argparse_args" in vars(cls) and issubclass(cls, EmbedOptions):
            cls._add_argparse_args(parser)
    return parser.format_help()


def _run_embed(args: argparse.Namespace, rest: list[str]) -> int:
    from pipelines import embed, report  # embed.run refuses unknown flags before any work

    print(report.summary(embed.run(rest)))
    return 0


def _run_build(args: argparse.Namespace, rest: list[str]) -> int:
    from pipelines import build  # build.run refuses unknown flags (a misspelt --min_recall) first

    try:
        result = build.run(rest)
    except build.GateError as exc:
        print(f"imgindex build: refused: {exc}", file=sys.stderr)
        return 3
    print(build.summary(result))
    return 0


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="query a published index by image file, vector or id",
        description="Query the run published under an output root (following LATEST) "
        "or a run directory; prints the hits best first. A .npy --vector of shape (d,) "
        "or (1, d) (what the embedder returns for one image) is one query; a (q, d) "
        "array with q > 1 runs q queries: the table gains a leading 'query' column "
        "(the row, from 0) and --json prints one list of hits per row.",
    )
    p.add_argument("path", help="output root or run directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image file to embed with the index's embedder")
    what.add_argument(
        "--vector",
        help="comma-separated floats, or a .npy file holding one vector (d,) or (1, d), or several (q, d)",
    )
    what.add_argument("--id", help="an indexed id: its own vector is the query")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--embedder", help="which index, when the run has several")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_query)


def _query_vector(text: str):  # -> numpy.ndarray (numpy is imported only when needed)
    """The query vector(s) of --vector: shape (d,) for one query, (q, d) for several."""
    import numpy as np

    if text.endswith(".npy"):
        try:
            array = np.load(text)
        except (OSError, ValueError) as exc:  # missing, unreadable, not a .npy, pickled objects
            raise ConfigError(f"--vector {text}: cannot read it as a .npy array: {exc}") from exc
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


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs under an output root",
        description="List every run under an output root, oldest first: id, creation time "
        "(UTC), status (published, rejected, failed; incomplete: no run_manifest.json, a "
        "build still running or one that was killed; damaged: an unreadable manifest), "
        "records, failed records and each embedder's rows. * marks the run LATEST names.",
    )
    p.add_argument("root", help="output root (holds LATEST and runs/)")
    p.add_argument("--json", action="store_true", help="print a JSON list, oldest first, instead of a table")
    p.set_defaults(func=_run_runs)


def _run_runs(args: argparse.Namespace) -> int:
    from retrieval import output_root

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


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a published index over HTTP (JSON, no gRPC)",
        description="HTTP JSON API: POST /v1/search, GET /v1/healthz, GET /v1/index. "
        "Follows LATEST and swaps in newer runs without dropping queries.",
    )
    p.add_argument("path", help="output root (follows LATEST) or run directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--refresh_seconds",
        type=float,
        default=60.0,
        help="how often LATEST is checked for a newer run (0 = never)",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from serving import http

    http.serve(args.path, host=args.host, port=args.port, refresh_seconds=args.refresh_seconds or None)
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show what a run, an output root or an index directory holds")
    p.add_argument("path", help="output root (follows LATEST), run directory or index directory")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from retrieval import manifest as index_manifest
    from retrieval import runs, sharded

    if sharded.manifest_kind(args.path) == sharded.KIND:
        data = json.loads(open(os.path.join(args.path, index_manifest.MANIFEST_NAME)).read())
        if not args.json:
            print(
                f"sharded index {args.path}: n={data['n']} d={data['d']} distance={data['distance']} "
                f"shards={data['num_shards']} recall@{data['recall'].get('k')}={data['recall'].get('value')} "
                f"(merged; per shard {data['recall'].get('per_shard')})"
            )
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
                f"method={m.index_config.get('method')} recall@{m.recall.get('k')}={m.recall.get('value')} "
                f"search {m.search_defaults} embedder {(m.embedder or {}).get('handle')} files {len(m.files)}"
            )
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
                    f"d={e.d} {e.method} recall@{e.recall['k']}={e.recall['value']} "
                    f"search {e.search_defaults} build {e.build_seconds}s"
                )
            print(f"  timings: {m.timings}")
            if m.error:
                print(f"  error: {m.error}")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgindex",
        description="Offline image-similarity index builder: Beam embedding pipeline, TF Hub "
        "embedders, Parquet embedding tables, ScaNN index, gRPC-free serving.",
    )
    parser.add_argument("--version", action="version", version=f"imgindex {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_build,
        _add_demo,
        _add_embed,
        _add_index,
        _add_inspect,
        _add_models,
        _add_query,
        _add_runs,
        _add_serve,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up lines (CPU features, a failed CUDA probe on CPU-only
    # machines) alarm users and say nothing actionable; Python errors still raise.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    # Pass-through subcommands (embed) hand every flag they do not know to Beam.
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    passthrough = getattr(args, "passthrough", False)
    if passthrough and ("-h" in rest or "--help" in rest):
        print(beam_help(args.command))
        return 0
    if not passthrough and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) if passthrough else args.func(args)
    except ImgIndexError as exc:
        print(f"imgindex {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
