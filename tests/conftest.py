import os

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
