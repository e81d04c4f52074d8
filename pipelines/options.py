"""Options of the embedding pipeline, as a Beam `PipelineOptions` subclass.

Every flag not declared here (`--runner`, `--direct_running_mode`, Dataflow's `--project`,
...) passes through to Beam untouched.
"""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

FORMATS = ("auto", "tfrecord", "webdataset", "images")
DEFAULT_ID_KEYS = ("image/key", "image/id", "image/source_id", "image/filename")


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", action="append", default=None,
                            help="glob of input shards or image files; repeat for several "
                            "(local paths or any Beam filesystem: gs://, s3://, ...)")
        parser.add_argument("--output", default=None,
                            help="output directory: embeddings/<embedder>/, failures/, run_report.json")
        parser.add_argument("--embedder", action="append", default=None,
                            help="NAME=HANDLE[,size=N][,resize=pad|crop|stretch][,normalisation=l2|none]; "
                            "repeat for several embedders in one run "
                            "(default: lite=builtin:efficientnet-lite0)")
        parser.add_argument("--format", default="auto", choices=FORMATS,
                            help="input format; auto detects it from each file's extension")
        parser.add_argument("--image_key", default="image/encoded",
                            help="TFRecord feature holding the encoded image")
        parser.add_argument("--id_key", default=None,
                            help="TFRecord feature holding the id (default: the first present of "
                            f"{', '.join(DEFAULT_ID_KEYS)}, else shard#record)")
        parser.add_argument("--metadata", action="append", default=None,
                            help="NAME[:TYPE] passthrough column (TYPE: string, int64, float64, "
                            "bool; default string): a TFRecord scalar feature, or a WebDataset "
                            "sidecar extension (json, txt, cls, ...); repeatable or comma-separated")
        parser.add_argument("--batch_size", type=int, default=32,
                            help="images per model call")
        parser.add_argument("--max_pixels", type=int, default=100_000_000,
                            help="images declaring more pixels are refused (decompression-bomb guard)")
        parser.add_argument("--decode_threads", type=int, default=2,
                            help="threads decoding images while the model runs (0 = decode inline)")
        parser.add_argument("--num_output_shards", type=int, default=0,
                            help="Parquet files per embedder (0 = let the runner decide)")
        parser.add_argument("--row_group_size", type=int, default=2048,
                            help="rows per Parquet row group (and per write batch)")
        parser.add_argument("--model_cache_dir", default=None,
                            help="where builtin models are materialised (default $IMGINDEX_CACHE_DIR "
                            "or ~/.cache/imgindex)")
        parser.add_argument("--share_model_across_processes", action="store_true",
                            help="load one model per machine instead of one per worker process")
        parser.add_argument("--tf_intra_op_threads", type=int, default=0,
                            help="TensorFlow intra-op threads per worker (0 = TensorFlow's default)")
