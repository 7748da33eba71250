"""The suite runs on every Keras backend.

Keras reads `KERAS_BACKEND` once per process, so the README's one command
(`python -m pytest -n 2`) runs here on TensorFlow, and
`test_other_backends.py` runs the backend-neutral tests again in one
subprocess per other backend (`KERAS_BACKEND=jax`, `KERAS_BACKEND=torch`).

Which files run where, by name:

- `test_any_*.py`: backend-neutral (only `keras`, `keras.ops`, NumPy); run
  on every backend.
- `test_on_jax_*.py`, `test_on_torch_*.py`: that backend's own engine and
  peers (optax, torch.optim); run only under that backend.
- everything else: TensorFlow (our kernels, tf.distribute, tuning, docs);
  run only under TensorFlow.

`KERAS_BACKEND=jax python -m pytest` runs the JAX part alone.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKEND = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    # Two virtual CPU devices for keras.distribution tests; one Eigen thread
    # (two pytest-xdist workers, or this subprocess beside the TF run, share
    # two cores).
    os.environ["XLA_FLAGS"] = " ".join(
        filter(
            None,
            [
                os.environ.get("XLA_FLAGS", ""),
                "--xla_force_host_platform_device_count=2",
                "--xla_cpu_multi_thread_eigen=false",
            ],
        )
    )

import keras  # noqa: E402
import pytest  # noqa: E402

if BACKEND == "tensorflow":
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
elif BACKEND == "torch":
    import torch

    torch.set_num_threads(1)

_OTHER_BACKENDS = {"tensorflow", "jax", "torch"} - {BACKEND}


def pytest_ignore_collect(collection_path, config):
    """Collect only the files that run on this backend (see the module docstring)."""
    name = collection_path.name
    if not (name.startswith("test_") and name.endswith(".py")):
        return None
    if name.startswith("test_any_"):
        return None
    if any(name.startswith(f"test_on_{other}_") for other in _OTHER_BACKENDS):
        return True
    if name.startswith(f"test_on_{BACKEND}_"):
        return None
    return BACKEND != "tensorflow" or None


def pytest_collection_modifyitems(session, config, items):
    """Start the other backends' runs first: each takes one core for minutes,
    so the pytest-xdist workers share the rest of the suite around them."""
    items.sort(key=lambda item: item.path.name != "test_other_backends.py")


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with the default float policy and a clean name scope."""
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
