import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_savedmodel(tmp_path_factory):
    """A real (tiny) TF Hub-style image feature-vector SavedModel: [b,h,w,3] -> [b,8]."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self):
            super().__init__()
            rng = tf.random.Generator.from_seed(0)
            self.w = tf.Variable(rng.normal((6, 8)), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            mean = tf.reduce_mean(images, axis=[1, 2])
            std = tf.math.reduce_std(images, axis=[1, 2])
            return tf.matmul(tf.concat([mean, std], axis=1), self.w)

    path = str(tmp_path_factory.mktemp("tiny") / "savedmodel")
    module = Tiny()
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    return path


@pytest.fixture(scope="session")
def vec_run(tmp_path_factory):
    """A published run of two vector embedders, (root, run directory, {name: EmbedderData}):
    "a": cosine brute force (2000 x 32); "b": squared_l2 tree-AH (1500 x 16), searching every
    leaf and reordering 100 candidates exactly, so both answer exactly.  Read-only: copy it
    before changing it."""
    from retrieval.index import IndexConfig
    from tests.helpers import runs_fixture as rf

    tree = IndexConfig(
        method="tree_ah",
        num_leaves=10,
        training_sample_size=1500,
        leaves_to_search=10,
        pre_reorder_num_neighbors=100,
    )
    data = {
        "a": rf.vector_embedder("a", 2000, 32, seed=0),
        "b": rf.vector_embedder("b", 1500, 16, seed=1, distance="squared_l2", config=tree),
    }
    root = tmp_path_factory.mktemp("vec_root")
    run_dir = rf.write_run(root, data, run_id="20260101T000000Z-aaaaaa")
    return root, run_dir, data


@pytest.fixture(scope="session")
def vector_run(tmp_path_factory):
    """The output root of a published run of one vector embedder, "vec" (200 x 8; the CLI
    tests query it).  Read-only."""
    from tests.helpers import runs_fixture as rf

    root = tmp_path_factory.mktemp("query") / "root"
    rf.write_run(root, {"vec": rf.vector_embedder("vec", 200, 8)})
    return root


@pytest.fixture(scope="session")
def sharded_build(tmp_path_factory, tiny_savedmodel):
    """A published `imgindex build` (a BuildResult) of 40 small JPEGs img000.jpg ... with the
    tiny embedder ("tiny", 32 px), its index built as two brute-force shards and tuned on 20
    held-out query vectors (--tuning_queries=PATH, a (20, 8) .npy).  Read-only."""
    from pipelines import build
    from tests.helpers import images

    base = tmp_path_factory.mktemp("sharded_build")
    np.save(base / "queries.npy", np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    return build.run(
        [
            f"--input={images.write_folder(base / 'in', 40)}",
            f"--output={base / 'root'}",
            f"--embedder=tiny={tiny_savedmodel},size=32",
            "--index_shards=2",
            f"--tuning_queries={base / 'queries.npy'}",
        ]
    )


# --- builtin EfficientNet-Lite (tests/test_builtin_*.py) ---------------------------------


@pytest.fixture(scope="session")
def builtin_cache_dir(tmp_path_factory):
    """A model cache of the builtin models' exports, shared by the tests that export them."""
    return str(tmp_path_factory.mktemp("imgindex-cache"))


@pytest.fixture(scope="session")
def lite0(builtin_cache_dir):
    """builtin:efficientnet-lite0 exported into `builtin_cache_dir` (a BuiltinModel).
    Read-only: copy it before changing it."""
    from retrieval.builtin import materialize

    return materialize("builtin:efficientnet-lite0", cache_dir=builtin_cache_dir)


@pytest.fixture(scope="session")
def lite0_hub(lite0):
    """`lite0` loaded with tensorflow_hub.load."""
    import tensorflow_hub as hub

    return hub.load(lite0.path)


# --- index test data (tests/test_index_*.py, tests/test_recall_tuning.py) ------------------


@pytest.fixture(scope="session")
def index_data():
    """20k database vectors, 500 fresh queries and a separate 3k set around 100 cluster centres
    in 64 dimensions, drawn in that order from one seeded generator."""
    from tests.helpers.index_data import clusters

    sample = clusters()
    return sample(20_000), sample(500), sample(3_000)


@pytest.fixture(scope="session")
def large(index_data):
    """20k database vectors (tree-AH by default), their ids, and 500 fresh queries."""
    vectors, queries, _ = index_data
    return vectors, np.array([f"img{i:05d}" for i in range(len(vectors))]), queries


@pytest.fixture(scope="session")
def tree_indexes(large):
    """Default (tuned tree-AH) indexes of `large` for each distance."""
    from retrieval.index import build_index

    vectors, ids, _ = large
    return {
        distance: build_index(vectors, ids.tolist(), distance=distance)
        for distance in ("cosine", "dot_product", "squared_l2")
    }


@pytest.fixture(scope="session")
def small(index_data):
    """3k vectors (brute force by default) and their ids."""
    vectors = index_data[2]
    return vectors, [f"s{i}" for i in range(len(vectors))]


@pytest.fixture(scope="session")
def saved_small(small, tmp_path_factory):
    """A saved brute-force index, copied by tests that damage it."""
    from retrieval.index import build_index

    path = tmp_path_factory.mktemp("saved") / "index"
    build_index(*small, distance="cosine").save(path)
    return path


@pytest.fixture
def damaged(saved_small, tmp_path):
    """A copy of `saved_small` for a test to damage."""
    path = tmp_path / "index"
    shutil.copytree(saved_small, path)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session (tests.helpers.s3); skips, saying why,
    when moto is not installed or the server cannot start."""
    from tests.helpers import s3

    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the S3 tests need the test extra (moto[server], apache-beam[aws]): {exc}")
    try:
        server = s3.start()
    except RuntimeError as exc:
        pytest.skip(f"moto's S3 server could not start on 127.0.0.1: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_auth_server(s3_server):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0: any key
    its IAM did not issue is refused, as AWS refuses a wrong one; `s3_server` accepts any)."""
    from tests.helpers import s3

    try:
        server = s3.start(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    except RuntimeError as exc:
        pytest.skip(f"moto's S3 server with authentication could not start on 127.0.0.1: {exc}")
    yield server
    server.stop()
