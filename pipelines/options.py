"""Options of the embedding pipeline, as a Beam `PipelineOptions` subclass.

Every flag not declared here (`--runner`, `--direct_running_mode`, Dataflow's `--project`,
...) passes through to Beam untouched, provided some Beam options class knows it:
`check_flags` refuses the rest (Beam itself would only log and drop them).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from collections.abc import Sequence

# Beam's parser class: it knows `add_value_provider_argument`, which some option classes use.
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from pipelines.shards import DEFAULT_ID_KEYS, DEFAULT_MAX_RECORD_BYTES
from retrieval.errors import ConfigError

FORMATS = ("auto", "tfrecord", "webdataset", "images")
PROGRESS = ("auto", "on", "off")
# Beam's DirectRunner first tries to download the Prism runner (a network call that fails
# offline, and a worker pool), then falls back to this same FnApiRunner; going straight to
# it keeps local runs offline and quiet.  It honours --direct_running_mode and
# --direct_num_workers.
LOCAL_RUNNER = "FnApiRunner"
# Reused vectors embedded again to check them: this fraction, and at least this many per embedder.
DEFAULT_VERIFY_FRACTION = 0.001
MIN_VERIFY_ROWS = 16


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input",
            action="append",
            default=None,
            help="glob of input shards or image files; repeat for several "
            "(local paths or any Beam filesystem: gs://, s3://, ...)",
        )
        parser.add_argument(
            "--output",
            default=None,
            help="output directory: embeddings/<embedder>/, failures/, run_report.json",
        )
        parser.add_argument(
            "--embedder",
            action="append",
            default=None,
            help="NAME=HANDLE[,size=N][,resize=pad|crop|stretch|fit][,pad=grey|black|white|mean|edge]"
            "[,filter=bilinear|bicubic|lanczos][,normalisation=l2|none]; "
            "repeat for several embedders in one run "
            "(default: lite=builtin:efficientnet-lite0)",
        )
        parser.add_argument(
            "--format",
            default="auto",
            choices=FORMATS,
            help="input format; auto detects it from each file's extension (case-insensitive): "
            "*.tfrecord*, *.tfrec*, *.tar, *.tar.gz, *.tgz, and images by .jpg, .jpeg, .png, .webp, .gif, "
            ".bmp, .tif, .tiff; dot-named and other files are skipped and counted in the run report",
        )
        parser.add_argument(
            "--image_key", default="image/encoded", help="TFRecord feature holding the encoded image"
        )
        parser.add_argument(
            "--id_key",
            default=None,
            help="TFRecord feature holding the id (default: the first present of "
            f"{', '.join(DEFAULT_ID_KEYS)}, else shard#record)",
        )
        parser.add_argument(
            "--metadata",
            action="append",
            default=None,
            help="NAME[:TYPE] passthrough column (TYPE: string, int64, float64, "
            "bool; default string): a TFRecord scalar feature, or a WebDataset "
            "sidecar extension (json, txt, cls, ...); repeatable or comma-separated",
        )
        parser.add_argument("--batch_size", type=int, default=32, help="images per model call")
        parser.add_argument(
            "--max_pixels",
            type=int,
            default=100_000_000,
            help="images declaring more pixels are refused before any pixel is decoded "
            "(decompression-bomb guard)",
        )
        parser.add_argument(
            "--max_record_bytes",
            type=int,
            default=DEFAULT_MAX_RECORD_BYTES,
            help="a record above this size (a TFRecord record, a tar member, an image file) is a "
            "failure and is never read; 64 MiB fits real photos (a 100-megapixel camera JPEG is "
            "20-50 MB) while bounding the memory one record can take",
        )
        parser.add_argument(
            "--decode_threads",
            type=int,
            default=2,
            help="threads decoding images while the model runs (0 = decode inline)",
        )
        parser.add_argument(
            "--progress",
            default="auto",
            choices=PROGRESS,
            help="a status line on stderr (records read, embedded, failed, rate, ETA); auto: when "
            "stderr is a terminal",
        )
        parser.add_argument(
            "--num_output_shards",
            type=int,
            default=0,
            help="Parquet files per embedder (0 = let the runner decide)",
        )
        parser.add_argument(
            "--row_group_size",
            type=int,
            default=2048,
            help="rows per Parquet row group (and per write batch)",
        )
        parser.add_argument(
            "--model_cache_dir",
            default=None,
            help="where builtin models are materialised (default $IMGINDEX_CACHE_DIR or ~/.cache/imgindex)",
        )
        parser.add_argument(
            "--share_model_across_processes",
            action="store_true",
            help="load one model per machine instead of one per worker process",
        )
        parser.add_argument(
            "--tf_intra_op_threads",
            type=int,
            default=0,
            help="TensorFlow intra-op threads per worker (0 = TensorFlow's default)",
        )
        parser.add_argument(
            "--reuse_from",
            default=None,
            help="reuse the vectors of unchanged images (same bytes, same embedder and preprocessing) "
            "from previous embedding tables: latest (the run OUTPUT/LATEST names; the default of "
            "imgindex build), none (the default of imgindex embed), or a run directory or embedding "
            "tables on any Beam filesystem",
        )
        parser.add_argument(
            "--verify_reuse_fraction",
            type=float,
            default=DEFAULT_VERIFY_FRACTION,
            help=f"fraction of the reused vectors embedded again and compared (at least {MIN_VERIFY_ROWS} "
            "per embedder); the run fails when today's model gives another vector than the one reused",
        )


def _option_classes(options_class: type[PipelineOptions]) -> list[type[PipelineOptions]]:
    """Every registered PipelineOptions class whose flags `options_class` accepts: all of Beam's
    (and any other library's) subclasses, found recursively as Beam's `get_all_options` does, but
    of our own classes only `options_class` and its bases (`embed` does not take `build`'s flags)."""
    seen, ordered, stack = set(), [], list(reversed(PipelineOptions.__subclasses__()))
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if not (issubclass(cls, EmbedOptions) and cls not in options_class.__mro__):
            ordered.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return ordered


class _CheckingParser(_BeamArgumentParser):
    # A bad value (--batch_size=x): a one-line error, not SystemExit.
    def error(self, message: str) -> None:  # type: ignore[override]  # returns on ambiguous options
        if not message.startswith("ambiguous option: "):  # ignored, as Beam's parser does
            raise ConfigError(message)


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def check_flags(argv: Sequence[str], options_class: type[PipelineOptions] | None = None) -> list[str]:
    """Refuses flags that no registered PipelineOptions class knows, before any work starts.

    Beam's own parsing drops them with only a log line ("Discarding unparseable args"), so a
    typo such as `--min_recal=0.99` would silently run with the default gate.  The parser is
    built like Beam's (`allow_abbrev=False`, every option class's `_add_argparse_args`), so
    whatever Beam understands (`--runner`, `--direct_num_workers 2`, `--project`,
    `--experiments=...`) still passes, `--flag value` and `--flag=value` alike.  Raises
    ConfigError naming each unknown flag, with the closest known flag when there is one, and
    for values no known option takes (also: bad values of known flags).  Returns argv.
    """
    options_class = options_class or EmbedOptions
    argv = list(argv)
    parser = _CheckingParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    for cls in _option_classes(options_class):
        if "_add_argparse_args" in vars(cls):
            cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(argv)
    if not unknown:
        _CHECKED.update(argv)
        return argv
    known = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    problems, previous_was_unknown_flag = [], False
    for arg in unknown:
        if arg.startswith("-") and arg != "--" and not _NEGATIVE_NUMBER.match(arg):
            name = arg.split("=", 1)[0]
            match = difflib.get_close_matches(name.lstrip("-"), [k[2:] for k in known], n=1)
            problems.append(name + (f" (did you mean --{match[0]}?)" if match else ""))
            previous_was_unknown_flag = "=" not in arg
        elif previous_was_unknown_flag:  # most likely the unknown flag's value
            previous_was_unknown_flag = False
        else:
            problems.append(f"{arg!r} (no flag takes a value here)")
    raise ConfigError(
        "unrecognized arguments: "
        + ", ".join(problems)
        + "; see --help for the flags (any other must be a Beam pipeline option)"
    )


# Every argument `check_flags` has accepted (flags and their values).
_CHECKED: set[str] = set()


class _OwnFlagsFilter(logging.Filter):
    """Drops Beam's "Unparseable argument: --keep_runs=0" warnings for imgindex's own flags,
    and "Unparseable argument: 0.1" for the value of `--max_failure_rate 0.1`.

    Beam collects options only from direct subclasses of PipelineOptions, so the flags of a
    deeper class (BuildOptions extends EmbedOptions) look unknown to it; `check_flags` has
    already refused every flag that really is unknown, before any work."""

    _PREFIX = "Unparseable argument: "

    def filter(self, record: logging.LogRecord) -> bool:
        # The portable runner's job server reparses the options and lists them all at once:
        # "Discarding unparseable args: [...]" and "Discarding invalid overrides: {...}".
        if record.msg == "Discarding unparseable args: %s" and isinstance(record.args, tuple):
            return not all(self._ours(str(a)) for a in record.args[0])
        if record.msg == "Discarding invalid overrides: %s" and isinstance(record.args, dict):
            # (LogRecord unpacks a lone mapping argument into record.args itself.)
            return not all(f"--{key}" in own_flags() for key in record.args)
        message = record.getMessage()
        if not message.startswith(self._PREFIX):
            return True
        argument = message[len(self._PREFIX) :].split(". Did you mean", 1)[0]
        return not self._ours(argument)

    @staticmethod
    def _ours(argument: str) -> bool:
        if argument in _CHECKED:
            return True
        if not argument.startswith("--"):
            return False
        return re.split(r"[=.\s]", argument, maxsplit=1)[0] in own_flags()


def own_flags() -> frozenset[str]:
    """Every flag of EmbedOptions and its subclasses (BuildOptions), as `--name`."""
    flags, stack = set(), [EmbedOptions]
    while stack:
        cls = stack.pop()
        parser = argparse.ArgumentParser(add_help=False)
        if "_add_argparse_args" in vars(cls):
            cls._add_argparse_args(parser)
        flags.update(s for action in parser._actions for s in action.option_strings)
        stack.extend(cls.__subclasses__())
    return frozenset(flags)


class _WorkerStartFilter(logging.Filter):
    """Drops the warning every local Beam worker process sends when it starts (forwarded by
    the driver's job service): it is about staging a main session, which imgindex never does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No semi_persistent_directory found" not in record.getMessage()


logging.getLogger("apache_beam.options.pipeline_options").addFilter(_OwnFlagsFilter())
logging.getLogger("apache_beam.runners.portability.local_job_service").addFilter(_WorkerStartFilter())
