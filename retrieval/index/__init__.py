"""The ScaNN vector index: build (with measured recall), search, save and load.

    config.py     IndexConfig, choose_config and the build's constants
    build.py      build_index and its input checks
    recall.py     recall measurement, search-knob tuning at every k of the ladder
    records.py    RecallRecord, RecallAtK (the manifest's recall), SearchLadder (knobs per k)
    store.py      Index (search, save) and load_index
    directory.py  the index directory written whole (save_index) and read whole for load_index
    files.py      the index directory's layout and file I/O

This module re-exports what callers use; the modules import one another directly.
Importing it imports neither ScaNN nor pyarrow nor TensorFlow.
"""

from retrieval.index.build import build_index, prepare_tuning_queries
from retrieval.index.config import (
    BRUTE_FORCE_MAX_ELEMENTS,
    DEFAULT_SERVE_MAX_K,
    MAX_RECALL_QUERIES,
    METHODS,
    RANDOM_INIT_MIN_ROWS,
    SEARCH_KNOBS,
    TUNING_MARGIN_SE,
    IndexConfig,
    choose_config,
    k_ladder,
)
from retrieval.index.files import DATASET_FILE, IDS_FILE, METADATA_FILE, SCANN_DIR, read_metadata
from retrieval.index.records import RecallAtK, RecallRecord
from retrieval.index.store import Index, load_index

__all__ = [
    "BRUTE_FORCE_MAX_ELEMENTS",
    "DATASET_FILE",
    "DEFAULT_SERVE_MAX_K",
    "IDS_FILE",
    "MAX_RECALL_QUERIES",
    "METADATA_FILE",
    "METHODS",
    "RANDOM_INIT_MIN_ROWS",
    "SCANN_DIR",
    "SEARCH_KNOBS",
    "TUNING_MARGIN_SE",
    "Index",
    "IndexConfig",
    "RecallAtK",
    "RecallRecord",
    "build_index",
    "choose_config",
    "k_ladder",
    "load_index",
    "prepare_tuning_queries",
    "read_metadata",
]
