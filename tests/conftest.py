"""The suite runs on every Keras backend; the folder of a test decides which.

Keras reads `KERAS_BACKEND` once per process, so the README's one command
(`python -m pytest -n 2`) runs on TensorFlow, and `test_other_backends.py`
runs each folder that JAX or PyTorch must run in its own subprocess with
`KERAS_BACKEND=jax` or `KERAS_BACKEND=torch` (one test per backend and
folder, so pytest-xdist spreads them over its workers).

Which folders run where (the innermost folder named `any`, `tensorflow`,
`jax` or `torch` decides; other folders run on TensorFlow):

- `any/`: backend-neutral (only `keras`, `keras.ops`, NumPy); every backend.
- `tensorflow/`, `jax/`, `torch/`: that backend's own engine, kernels and
  peers (tf.distribute, optax, torch.optim); that backend only.
- `tuning/`: the tuning package, on TensorFlow; `tuning/any/` (the search
  and the range test on each backend's data types) on every backend.
- `project/`: docs, README, lint, examples, benchmark scripts; TensorFlow.
- `helpers/`: shared harnesses (`tests.helpers.*`), no tests.

`KERAS_BACKEND=jax python -m pytest` runs the JAX part alone (`any/`,
`jax/`, `tuning/any/`); so does `KERAS_BACKEND=torch` for PyTorch.
"""

import os
from pathlib import Path

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

TESTS = Path(__file__).parent
BACKENDS = ("tensorflow", "jax", "torch")


def backends_of(path: Path) -> tuple[str, ...]:
    """The backends a test file (or folder) under tests/ runs on: see the module docstring."""
    for folder in reversed(path.relative_to(TESTS).parts):
        if folder == "any":
            return BACKENDS
        if folder in BACKENDS:
            return (folder,)
    return ("tensorflow",)


def folders_on(backend: str) -> list[str]:
    """The folders (relative to tests/) whose test files run on `backend`, outermost first."""
    return sorted(
        {
            path.parent.relative_to(TESTS).as_posix()
            for path in TESTS.rglob("test_*.py")
            if backend in backends_of(path.parent)
        }
    )


def pytest_ignore_collect(collection_path, config):
    """Collect only what runs on this backend (see the module docstring)."""
    path = Path(collection_path)
    if TESTS not in path.parents:
        return None
    if path.is_dir():
        # A folder is skipped when none of its test files runs here.
        runs_here = any(BACKEND in backends_of(f.parent) for f in path.rglob("test_*.py"))
        return None if runs_here else True
    if path.name.startswith("test_") and path.suffix == ".py":
        return None if BACKEND in backends_of(path.parent) else True
    return None


def pytest_configure(config):
    """Under pytest-xdist, hand tests to the workers one by one: the other backends'
    subprocess runs take minutes each, and a worker given a batch of them runs
    them in turn while the other worker is idle."""
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", None):
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(session, config, items):
    """Start the other backends' runs first, longest first (see
    test_other_backends.py), then the tests marked `slow`: with tests handed
    out one by one, the pytest-xdist workers then share the rest of the suite
    around them and finish together."""
    items.sort(
        key=lambda item: (
            item.path.name != "test_other_backends.py",
            item.get_closest_marker("slow") is None,
        )
    )


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with the default float policy and a clean name scope.

    Without Keras's full garbage collection (`free_memory`): it took 0.2-0.4 s
    a test, minutes over the suite, and Python's own collector still runs.
    """
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
    keras.backend.clear_session(free_memory=False)
    yield
    keras.config.set_dtype_policy("float32")
    keras.config.set_floatx("float32")
