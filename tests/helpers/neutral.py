"""Backend-neutral harness for tests/any/ (see tests/conftest.py).

Only `keras`, `keras.ops` and NumPy at import time; each backend's way of
compiling a step is imported where it is used.

- `MODES`: how a step can run on this backend: "eager" everywhere;
  "function" and "xla" (`tf.function`, with `jit_compile`) on TensorFlow;
  "jit" (`jax.jit` of `stateless_apply`) on JAX. torch.compile is tested in
  tests/torch/ (it compiles slowly).
- `DTYPES`: float64 only where the backend has it (JAX: `jax_enable_x64`).
- `trajectory`: θ after every step on a small non-quadratic problem whose
  gradient `A(θ − c_t) + θ³/2` is written with `keras.ops` here and with
  NumPy in `numpy_gradient`, for the NumPy oracles.
"""

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def _has_float64() -> bool:
    if BACKEND != "jax":
        return True
    import jax

    return bool(jax.config.jax_enable_x64)


MODES = {
    "tensorflow": ("eager", "function", "xla"),
    "jax": ("eager", "jit"),
    "torch": ("eager",),
}[BACKEND]
#: The compiled mode of this backend (eager on torch).
COMPILED = MODES[-1]
DTYPES = ("float32", "float64") if _has_float64() else ("float32",)
#: `model.compile(jit_compile=...)` values exercised by neutral fit tests.
JIT_COMPILE = (False,) if BACKEND == "torch" else (False, True)

# Hyperparameters that are exact binary fractions, so float64 runs can be
# compared with Keras (which rounds them through float32) exactly.
BINARY = dict(learning_rate=2.0**-6, beta_1=0.875, beta_2=1 - 2.0**-7, epsilon=2.0**-20)

#: Every base option of `keras.optimizers.Adam` that changes a step.
KERAS_OPTIONS = {
    "plain": {},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.ExponentialDecay(
            2.0**-5, decay_steps=8, decay_rate=0.5
        )
    },
    "clipnorm": {"clipnorm": 0.25},
    "clipvalue": {"clipvalue": 0.03125},
    "global_clipnorm": {"global_clipnorm": 0.25},
    "ema": {"use_ema": True, "ema_momentum": 0.75, "ema_overwrite_frequency": 7},
    "gradient_accumulation": {"gradient_accumulation_steps": 3},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.25},
    "loss_scale_factor": {"loss_scale_factor": 128.0},
}

_RNG = np.random.default_rng(7)
N = 6
_Q = _RNG.normal(size=(N, N))
A = _Q @ _Q.T / N + np.eye(N) * 0.1  # symmetric positive definite
CENTERS = _RNG.normal(size=(3, N))
THETA0 = _RNG.normal(size=N)
STEPS = 50


def numpy_gradient(theta, t):
    """g_t of the vector problem; depends on θ and on t."""
    return A @ (theta - CENTERS[t % 3]) + 0.5 * theta**3


def _gradient(theta, t, dtype, nonfinite_at):
    a = ops.convert_to_tensor(A, dtype=dtype)
    centers = ops.convert_to_tensor(CENTERS, dtype=dtype)
    center = ops.take(centers, ops.mod(t, 3), axis=0)
    # Not ops.matmul: on torch it returns float32 for float64 operands.
    g = ops.sum(a * (theta - center)[None, :], axis=1) + 0.5 * theta**3
    if nonfinite_at is not None:
        bad = ops.equal(t, nonfinite_at)
        g = ops.where(bad, ops.full_like(g, float("nan")), g)
    return g


def relative_deviation(actual, expected):
    """max |actual − expected| / max |expected|, over all steps and elements."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def trajectory(optimizer, dtype="float32", mode="eager", steps=STEPS, nonfinite_at=None, skip=()):
    """Run `optimizer` on the vector problem.

    Args:
        optimizer: A fresh optimizer.
        dtype: The variable's dtype.
        mode: One of `MODES`.
        steps: Steps t = 1..steps.
        nonfinite_at: A step whose gradient is all NaN (None for none).
        skip: Steps to leave out (their gradient is never applied).

    Returns:
        `(history, state)`: θ after each applied step (float64, one row per
        step) and the optimizer's variables at the end (NumPy arrays).
    """
    theta = keras.Variable(THETA0, dtype=dtype)
    optimizer.build([theta])
    ts = [t for t in range(1, steps + 1) if t not in skip]
    if mode == "jit":
        history = _jax_jit_run(optimizer, theta, dtype, ts, nonfinite_at)
    else:
        step = _step_function(optimizer, theta, dtype, mode, nonfinite_at)
        history = []
        for t in ts:
            step(ops.convert_to_tensor(t, dtype="int32"))
            history.append(np.asarray(theta.numpy(), dtype=np.float64))
    optimizer.finalize_variable_values([theta])
    state = [np.asarray(v.numpy()) for v in optimizer.variables]
    return np.array(history), state


def _step_function(optimizer, theta, dtype, mode, nonfinite_at):
    def step(t):
        g = _gradient(theta.value, t, dtype, nonfinite_at)
        optimizer.apply([g], [theta])

    if mode == "eager":
        return step
    import tensorflow as tf

    return tf.function(step, jit_compile=mode == "xla")


def _jax_jit_run(optimizer, theta, dtype, ts, nonfinite_at):
    import jax

    @jax.jit
    def step(optimizer_values, theta_value, t):
        g = _gradient(theta_value, t, dtype, nonfinite_at)
        (new_theta,), new_optimizer = optimizer.stateless_apply(
            optimizer_values, [g], [theta_value]
        )
        return new_optimizer, new_theta

    optimizer_values = [v.value for v in optimizer.variables]
    theta_value = theta.value
    history = []
    for t in ts:
        optimizer_values, theta_value = step(optimizer_values, theta_value, t)
        history.append(np.asarray(theta_value, dtype=np.float64))
    for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
        variable.assign(value)
    theta.assign(theta_value)
    return history
