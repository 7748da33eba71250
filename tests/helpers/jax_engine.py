"""The harness of tests/jax/ (the JAX engine, `keras_adam.backends.jax`).

Imported only under `KERAS_BACKEND=jax` (tests/conftest.py gives that
process two virtual CPU devices). The paths of a step on JAX:

- "eager": `optimizer.apply` outside any trace. With `fused` None or True
  the whole step is one compiled program; with `fused=False`, `keras.ops`
  op by op.
- "jit": `jax.jit` of `optimizer.stateless_apply` (whatever `fused` says).
- `model.fit` with `jit_compile` True and False.

References are independent: `keras.optimizers.Adam` on the same gradients
(transformed, for maximize and L2 decay), optax, a NumPy transcription, and
for `skip_nonfinite` the same run with the bad step left out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import numpy as np

SHAPES = ((5, 3), (3,), (4,))
STEPS = 8
ROUND_OFF = 2e-6  # float32, relative to the largest |value|


def _initial(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in SHAPES]


@jax.jit
def _gradient(values: list, data: jax.Array) -> list:
    """A gradient that depends on the weights (so errors feed back) and the data index."""
    phase = data.astype(values[0].dtype)
    return [jnp.sin(3 * v + phase) + 0.5 * v**3 for v in values]


class State(NamedTuple):
    """Weights, and the optimizer's variables by position and kind ("3:momentum")."""

    weights: list
    optimizer: dict

    def without(self, kind: str) -> State:
        kept = {k: v for k, v in self.optimizer.items() if not k.endswith(f":{kind}")}
        return State(self.weights, kept)


def _state(variables: list, optimizer: keras.optimizers.Optimizer) -> State:
    """The state, named independently of the variables' and optimizers' names."""
    return State(
        [np.asarray(v.value) for v in variables],
        {
            f"{i}:{v.path.rsplit('/', 1)[-1].rsplit('_', 1)[-1]}": np.asarray(v.value)
            for i, v in enumerate(optimizer.variables)
        },
    )


def run(
    make,
    path: str,
    data=range(STEPS),
    poison: dict | None = None,
    transform=None,
    scale: float = 1.0,
    dtype: str = "float32",
) -> State:
    """Steps of the optimizer `make()` on `_gradient`, on one path.

    Args:
        make: Builds the optimizer.
        path: "eager" (`apply`) or "jit" (`jax.jit` of `stateless_apply`).
        data: The data index of each step.
        poison: Step number -> a value (NaN, inf) written into one element
            of the first variable's gradient at that step.
        transform: `(grads, weights) -> grads` applied before the optimizer.
        scale: Gradients are multiplied by it (loss scaling).
        dtype: The variables' dtype.
    """
    variables = [keras.Variable(x, dtype=dtype) for x in _initial()]
    optimizer = make()
    optimizer.build(variables)
    step = jax.jit(lambda tv, ov, g: optimizer.stateless_apply(ov, g, tv))
    weights = [v.value for v in variables]
    optimizer_values = [v.value for v in optimizer.variables]
    for i, index in enumerate(data):
        if path == "eager":
            weights = [v.value for v in variables]
        grads = _gradient(weights, jnp.asarray(index))
        if poison and i in poison:
            grads[0] = grads[0].at[0, 0].set(poison[i])
        grads = [g * scale for g in grads]
        if transform is not None:
            grads = transform(grads, weights)
        if path == "eager":
            optimizer.apply(grads, variables)
        else:
            weights, optimizer_values = step(weights, optimizer_values, grads)
    if path == "jit":
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
            variable.assign(value)
    for variable in [*variables, *optimizer.variables]:
        assert not isinstance(variable.value, jax.core.Tracer), variable.path
    return _state(variables, optimizer)


def deviation(actual: State, expected: State) -> float:
    """Largest |difference| relative to the largest |expected|, over weights and state."""
    pairs = list(zip(actual.weights, expected.weights, strict=True))
    assert len(actual.optimizer) == len(expected.optimizer)
    pairs += list(zip(actual.optimizer.values(), expected.optimizer.values(), strict=True))
    worst = 0.0
    for a, e in pairs:
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        scale = max(float(np.max(np.abs(e))), 1e-30) if e.size else 1.0
        worst = max(worst, float(np.max(np.abs(a - e), initial=0.0)) / scale)
    return worst


def _bits(x: np.ndarray) -> np.ndarray:
    return np.atleast_1d(x).view(np.uint8)


def assert_identical(actual: State, expected: State) -> None:
    """Bit for bit (NaN and signed zeros included)."""
    for a, e in zip(actual.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(e))
    assert list(actual.optimizer) == list(expected.optimizer)
    for name, a in actual.optimizer.items():
        e = expected.optimizer[name]
        assert a.dtype == e.dtype, name
        np.testing.assert_array_equal(_bits(a), _bits(e), err_msg=name)


KERAS_OPTIONS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.2},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "loss_scale_factor": {"loss_scale_factor": 64.0},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.ExponentialDecay(
            0.01, decay_steps=3, decay_rate=0.5
        )
    },
    "ema": {"use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 5},
    "gradient_accumulation": {"gradient_accumulation_steps": 3},
    "all": {
        "amsgrad": True,
        "weight_decay": 0.05,
        "global_clipnorm": 0.5,
        "loss_scale_factor": 8.0,
        "use_ema": True,
        "ema_overwrite_frequency": 4,
        "gradient_accumulation_steps": 2,
    },
}


def _options(name: str) -> dict:
    options = dict(KERAS_OPTIONS[name])
    options.setdefault("learning_rate", 0.01)
    return options


@functools.cache
def keras_run(name: str, path: str) -> State:
    options = _options(name)
    scale = options.get("loss_scale_factor") or 1.0
    return run(lambda: keras.optimizers.Adam(**options), path, scale=scale)


# Keras's eager gradient accumulation runs `jax.lax.cond` op by op, which
# compiles its branches at every step: these take seconds per eager run, and
# are compared on the compiled paths only.
SLOW_EAGERLY = ("gradient_accumulation", "all")


BATCH = 8


def _data(bad_batch: int | None = None, drop: int | None = None):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5 * BATCH, 3)).astype("float32")
    y = rng.normal(size=(5 * BATCH, 2)).astype("float32")
    if bad_batch is not None:
        x[bad_batch * BATCH + 1, 0] = np.nan
    if drop is not None:
        keep = np.r_[0 : drop * BATCH, (drop + 1) * BATCH : len(x)]
        x, y = x[keep], y[keep]
    return x, y


def fit(make, jit_compile: bool, data=None, epochs: int = 1) -> State:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )
    optimizer = make()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    x, y = data if data is not None else _data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    state = _state(model.trainable_variables, optimizer)
    for variable in [*model.variables, *optimizer.variables]:
        assert not isinstance(variable.value, jax.core.Tracer), variable.path
    return state
