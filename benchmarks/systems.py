"""The systems compared: each turns a workload into a zero-argument `step`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.floor import Floor
from benchmarks.workloads import Workload, gradients, touched_rows

#: Suffix of the systems whose `tf.function` closes over the gradients.
CAPTURED = "gradients captured"


@dataclass(frozen=True)
class System:
    """One implementation on one execution path.

    Attributes:
        name: Label in the tables.
        family: "keras_adam", "keras", "torch", "floor" or "overhead" (the
            cost of calling a `tf.function` with the gradients, no update).
        setup: Builds the state for a workload and returns the step function.
        dense: Runs on dense workloads.
        sparse: Runs on the embedding workload.
    """

    name: str
    family: str
    setup: Callable[[Workload], Callable[[], None]]
    dense: bool = True
    sparse: bool = True


def _tf_setup(
    make_optimizer: Callable,
    mode: str,
    densify: bool = False,
    kernel: bool = True,
    captured: bool = False,
) -> Callable:
    """A Keras optimizer's step on the workload, eager or in a `tf.function`.

    `kernel=False` traces with the multi-tensor kernel disabled
    (KERAS_ADAM_KERNEL=0). By default the gradients are the `tf.function`'s
    arguments; `captured=True` closes over them instead, so the step takes
    no arguments, as `model.fit`'s training step computes its gradients
    inside (and as torch's `step()` finds them in `param.grad`).
    """

    def setup(workload: Workload) -> Callable[[], None]:
        import keras
        import tensorflow as tf

        variables = [keras.Variable(np.zeros(shape, "float32")) for shape in workload.shapes]
        grads = _tf_gradients(workload, densify)
        optimizer = make_optimizer()
        optimizer.build(variables)

        def apply(grads):
            optimizer.apply_gradients(zip(grads, variables, strict=True))

        if mode == "eager":
            return lambda: apply(grads)
        if captured:
            return tf.function(lambda: apply(grads), jit_compile=mode == "xla")
        compiled = tf.function(apply, jit_compile=mode == "xla")
        if not kernel:
            with _kernel_disabled():
                compiled.get_concrete_function(grads)  # later calls reuse this trace
        return lambda: compiled(grads)

    return setup


def _tf_gradients(workload: Workload, densify: bool = False) -> list:
    """The workload's gradients as TensorFlow tensors (`tf.IndexedSlices` if sparse)."""
    import tensorflow as tf

    grads = [tf.constant(g) for g in gradients(workload)]
    if workload.sparse:
        rows = tf.constant(touched_rows(workload), "int64")
        table_shape = tf.constant(workload.shapes[0], "int64")
        grads = [tf.IndexedSlices(grads[0], rows, table_shape)]
        if densify:
            grads = [tf.convert_to_tensor(grads[0])]
    return grads


def _call_overhead_setup(workload: Workload) -> Callable[[], None]:
    """A `tf.function` that takes the gradients and does nothing.

    Every TensorFlow system above pays at least this per step: binding the
    gradient arguments to the traced function and running it. It is a lower
    bound for any optimizer called this way (it captures no variables).
    """
    import tensorflow as tf

    grads = _tf_gradients(workload)

    @tf.function
    def call(grads):
        del grads

    return lambda: call(grads)


@contextlib.contextmanager
def _kernel_disabled():
    from keras_adam import kernels

    previous = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[kernels.ENV_SWITCH]
        else:
            os.environ[kernels.ENV_SWITCH] = previous


def _torch_setup(**options) -> Callable:
    def setup(workload: Workload) -> Callable[[], None]:
        import torch

        params = [torch.zeros(shape, requires_grad=True) for shape in workload.shapes]
        grads = [torch.from_numpy(g) for g in gradients(workload)]
        if workload.sparse:
            rows = torch.from_numpy(touched_rows(workload))
            sparse_grad = torch.sparse_coo_tensor(
                rows[None], grads[0], workload.shapes[0], check_invariants=True
            )  # built once, outside the timing: checking is free
            if options.get("sparse"):
                params[0].grad = sparse_grad.coalesce()
                optimizer = torch.optim.SparseAdam(params, lr=1e-3)
                return optimizer.step
            grads = [sparse_grad.to_dense()]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer = torch.optim.Adam(params, lr=1e-3, **options)
        return optimizer.step

    return setup


def _floor_setup(workload: Workload) -> Callable[[], None]:
    n = workload.rows_touched * workload.shapes[0][1] if workload.sparse else workload.parameters
    return Floor(n).step


def systems() -> list[System]:
    """Every system, in table order."""
    import keras

    import keras_adam

    def ours(**kw):
        return lambda: keras_adam.Adam(**kw)

    def lazy(**kw):
        return lambda: keras_adam.Adam(lazy_sparse=True, **kw)

    return [
        System("keras_adam default, tf.function", "keras_adam", _tf_setup(ours(), "function")),
        System("keras_adam default, XLA", "keras_adam", _tf_setup(ours(), "xla")),
        System(
            "keras_adam fused=True, tf.function",
            "keras_adam",
            _tf_setup(ours(fused=True), "function"),
        ),
        System(
            f"keras_adam default, tf.function, {CAPTURED}",
            "keras_adam",
            _tf_setup(ours(), "function", captured=True),
        ),
        System(
            "keras_adam without our kernels (KERAS_ADAM_KERNEL=0), tf.function",
            "keras_adam",
            _tf_setup(ours(), "function", kernel=False),
        ),
        System(
            "keras_adam fused=False, tf.function",
            "keras_adam",
            _tf_setup(ours(fused=False), "function"),
        ),
        System("keras_adam fused=False, XLA", "keras_adam", _tf_setup(ours(fused=False), "xla")),
        System(
            "keras_adam lazy_sparse, tf.function",
            "keras_adam",
            _tf_setup(lazy(), "function"),
            dense=False,
        ),
        System(
            "keras_adam lazy_sparse fused=False, tf.function",
            "keras_adam",
            _tf_setup(lazy(fused=False), "function"),
            dense=False,
        ),
        System("keras_adam lazy_sparse, XLA", "keras_adam", _tf_setup(lazy(), "xla"), dense=False),
        System(
            "keras_adam dense update of the table, tf.function",
            "keras_adam",
            _tf_setup(ours(), "function", densify=True),
            dense=False,
        ),
        System("keras Adam, eager", "keras", _tf_setup(keras.optimizers.Adam, "eager")),
        System("keras Adam, tf.function", "keras", _tf_setup(keras.optimizers.Adam, "function")),
        System(
            f"keras Adam, tf.function, {CAPTURED}",
            "keras",
            _tf_setup(keras.optimizers.Adam, "function", captured=True),
        ),
        System("keras Adam, XLA", "keras", _tf_setup(keras.optimizers.Adam, "xla")),
        System("torch Adam foreach", "torch", _torch_setup(foreach=True)),
        System("torch Adam fused", "torch", _torch_setup(fused=True)),
        System("torch SparseAdam", "torch", _torch_setup(sparse=True), dense=False),
        System("floor (Adam's memory traffic)", "floor", _floor_setup),
        System("tf.function call, gradients in, no update", "overhead", _call_overhead_setup),
    ]


def torch_available() -> bool:
    """Whether the optional torch extra is installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
