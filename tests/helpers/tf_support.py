"""Shared harness: run an optimizer on a fixed problem in one execution mode."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_adam import kernels
from tests.helpers.neutral import (  # noqa: F401  (the vector problem, shared with tests/any/)
    CENTERS,
    STEPS,
    THETA0,
    A,
    numpy_gradient,
    relative_deviation,
)

MODES = ("eager", "function", "xla")
DTYPES = ("float32", "float64")

# Hyperparameters that are exact binary fractions, so float64 runs can be
# compared with Keras (which rounds them through float32) to 1e-10.
BINARY = dict(learning_rate=2.0**-6, beta_1=0.875, beta_2=1 - 2.0**-7, epsilon=2.0**-20)


def make_problem(dtype, seed=0):
    """Variables and a non-convex loss whose gradients depend on the weights."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 8, 5))  # four mini-batches, cycled by step
    y = rng.normal(size=(4, 8, 3))
    w0 = rng.normal(size=(5, 3)) * 0.5
    b0 = rng.normal(size=(3,)) * 0.1
    variables = [
        keras.Variable(w0, dtype=dtype, name="kernel"),
        keras.Variable(b0, dtype=dtype, name="bias"),
    ]
    x_t = tf.constant(x, dtype=dtype)
    y_t = tf.constant(y, dtype=dtype)

    def loss_fn(step):
        batch = step % 4
        w, b = variables[0].value, variables[1].value
        pred = tf.tanh(tf.matmul(tf.gather(x_t, batch), w) + b)
        return tf.reduce_mean((pred - tf.gather(y_t, batch)) ** 2) + 0.01 * tf.reduce_sum(w**4)

    return variables, loss_fn


def make_step(optimizer, variables, loss_fn, mode):
    def step(i):
        with tf.GradientTape() as tape:
            loss = loss_fn(i)
            if optimizer.loss_scale_factor is not None:
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, [v.value for v in variables])
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    if mode == "eager":
        return step
    if mode == "function":
        return tf.function(step)
    if mode == "xla":
        return tf.function(step, jit_compile=True)
    raise ValueError(mode)


def trajectory(optimizer, dtype, mode, steps=40, seed=0):
    """Run `steps` steps; return the weights after each step and the final
    optimizer variables."""
    variables, loss_fn = make_problem(dtype, seed)
    optimizer.build(variables)
    step = make_step(optimizer, variables, loss_fn, mode)
    history = []
    for i in range(steps):
        step(tf.constant(i, dtype="int64"))
        history.append(np.concatenate([np.ravel(v.numpy()) for v in variables]))
    optimizer.finalize_variable_values(variables)
    final_vars = np.concatenate([np.ravel(v.numpy()) for v in variables])
    state = [np.asarray(v.numpy(), dtype=np.float64) for v in optimizer.variables]
    return np.array(history, dtype=np.float64), final_vars, state


def keras_trajectory(optimizer, dtype, mode, steps=STEPS):
    """θ after each of `steps` steps of `optimizer` on the vector problem."""
    theta = keras.Variable(THETA0, dtype=dtype)
    a = tf.constant(A, dtype=dtype)
    centers = tf.constant(CENTERS, dtype=dtype)
    optimizer.build([theta])

    def step(t):
        x = theta.value
        g = tf.linalg.matvec(a, x - tf.gather(centers, t % 3)) + 0.5 * x**3
        optimizer.apply_gradients([(g, theta)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    history = []
    for t in range(1, steps + 1):
        step(tf.constant(t, dtype="int64"))
        history.append(theta.numpy().astype(np.float64))
    return np.array(history)


def run_python(code, *args, env=None, timeout=600):
    """Run `python -c code *args` in a fresh process and return what it printed
    last, parsed as JSON.

    For what must be set before TensorFlow starts (threads, logical devices,
    environment variables). The script only measures; the caller asserts, so
    that a failure shows the numbers in pytest's report.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return json.loads(lines[-1])


def _has_compiler():
    try:
        kernels._compiler()
    except RuntimeError:
        return False
    return True


#: Marks tests of our C++ kernels: skipped only where no compiler exists.
needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler to build kernels")
