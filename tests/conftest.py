import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two pytest-xdist workers share two cores: one TF thread pool each.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with the default float policy and a clean name scope."""
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
