"""The `imgindex` command.  Subcommands import their heavy dependencies only when they run,
so `imgindex --help` and `imgindex <cmd> --help` never import TensorFlow."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from imgindex import root_commands
from retrieval.errors import ConfigError, ImgIndexError
from retrieval.exact import DISTANCES
from retrieval.version import __version__

# Exit statuses besides 0 (success), 2 (an error the user can fix) and 3 (`build`: a gate
# refused the run): what a shell reports for a tool stopped by Ctrl-C (128 + SIGINT) or by a
# reader that closed the pipe, as `head` does (128 + SIGPIPE).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

HelpFormatter = root_commands.HelpFormatter


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the builtin embedders, or materialise one",
        description="List the builtin (offline) embedders. With --export, "
        "materialise one as a TF Hub SavedModel in the cache and print its path.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--export", metavar="NAME", help="builtin to materialise, e.g. efficientnet-lite0")
    p.add_argument("--cache_dir", help="cache root (default: $IMGINDEX_CACHE_DIR, else ~/.cache/imgindex)")
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
        formatter_class=HelpFormatter,
    )
    p.add_argument("--embeddings", required=True, help="a Parquet file or a directory of them")
    p.add_argument("--output", required=True, help="index directory to create")
    p.add_argument("--distance", default="cosine", choices=DISTANCES, help="similarity the index ranks by")
    p.add_argument("--k", type=int, default=10, help="neighbours the recall is measured at")
    p.add_argument(
        "--serve_max_k",
        type=int,
        default=None,
        help="the most neighbours a search may ask (--k to 1000; default max(--k, 100)): the "
        "knobs are tuned and the recall measured at --k, 100 and this k",
    )
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
    import pyarrow as pa

    from retrieval import index, tables

    if not os.path.exists(args.embeddings):
        raise ConfigError(
            f"--embeddings {args.embeddings} does not exist (a Parquet file or a directory of them)"
        )
    try:
        data = tables.read_embeddings(args.embeddings)
    except pa.ArrowInvalid as exc:  # not Parquet, or not an embedding table
        raise ConfigError(f"--embeddings {args.embeddings}: cannot read embedding tables: {exc}") from exc
    queries = None
    if args.tuning_queries:
        queries = tables.load_tuning_queries(args.tuning_queries, data.spec)
    built = index.build_index(
        data.vectors,
        data.ids,
        distance=args.distance,
        embedder=data.spec.to_dict(),
        k=args.k,
        serve_max_k=args.serve_max_k,
        target_recall=args.target_recall,
        tuning_queries=queries,
    )
    built.save(args.output, overwrite=args.overwrite)
    m = built.manifest
    recall = (
        "not measured (fewer than 2 vectors)"
        if m.recall["value"] is None
        else ", ".join(f"recall@{e['k']}={e['value']:.4f}" for e in m.recall["per_k"])
        + f" (target {m.recall['target']})"
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
        formatter_class=HelpFormatter,
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
    parser = argparse.ArgumentParser(
        prog=f"imgindex {command}", description=description + _BEAM_FLAGS, formatter_class=HelpFormatter
    )
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
        root_commands.add_inspect,
        _add_models,
        root_commands.add_query,
        root_commands.add_runs,
        root_commands.add_serve,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ start-up lines (CPU features, a failed CUDA probe on CPU-only
    # machines) alarm users and say nothing actionable; Python errors still raise.
    # Set TF_CPP_MIN_LOG_LEVEL=0 to see them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    command = "imgindex"
    try:
        parser = build_parser()
        # Pass-through subcommands (embed) hand every flag they do not know to Beam.
        args, rest = parser.parse_known_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        command = f"imgindex {args.command}"
        code = _dispatch(parser, args, rest)
        sys.stdout.flush()  # a reader that went away shows here, not in Python's exit
        return code
    except BrokenPipeError:
        # `imgindex query --json | head`: the reader has what it wanted. Python's docs: point
        # stdout at /dev/null so that the flush at exit does not fail again, and exit quietly.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
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
    except BrokenPipeError:
        raise
    except OSError as exc:  # a file missing, unreadable or unwritable: say which, no traceback
        print(f"imgindex {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (captured by a test harness)
        pass


def console_main() -> None:
    """The installed `imgindex` script: main(), then an exit that skips native teardown.

    Once a command has finished, its outputs are written and published; what is left is the
    interpreter's teardown, where a native thread that outlived its Python object can abort
    the process ("terminate called without an active exception"; pyarrow's reader threads
    are a known cause, apache/arrow#34314) and turn a good nightly run into exit status 134.
    So: collect garbage while the native libraries are still whole (it joins such threads
    and closes forgotten files), run the
    Python exit handlers (logging, multiprocessing, temporary directories), flush, and leave
    with os._exit, which skips the C++ static destructors."""
    code = main()
    try:
        gc.collect()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing left to say
                pass
        os._exit(code)


if __name__ == "__main__":
    console_main()
