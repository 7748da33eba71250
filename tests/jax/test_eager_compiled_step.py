"""The fused path on JAX: an eager step is one compiled program, which follows
changed hyperparameters, callable learning rates and subsets of variables."""

from __future__ import annotations

import jax.numpy as jnp
import keras
import numpy as np

import keras_adam
from keras_adam import update_rule
from tests.helpers.jax_engine import (
    ROUND_OFF,
    SHAPES,
    State,
    _gradient,
    _initial,
    _state,
    deviation,
    run,
)

# -- fused on JAX ----------------------------------------------------------------


def test_an_eager_step_is_one_compiled_program(monkeypatch):
    """After its first compiled step, an eager step runs no Python per variable."""
    calls = []
    real = update_rule.adam_step
    monkeypatch.setattr(update_rule, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for fused, per_step in [(None, 0), (True, 0), (False, len(SHAPES))]:
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(fused=fused)
        grads = [jnp.ones(shape) for shape in SHAPES]
        for _ in range(3):  # builds (op by op), then compiles
            optimizer.apply(grads, variables)
        calls.clear()
        for _ in range(3):
            optimizer.apply(grads, variables)
        assert len(calls) == 3 * per_step, fused


def test_fused_true_takes_every_option_and_dtype():
    cases = [
        ({"amsgrad": True, "epsilon_mode": "paper"}, "float32"),
        ({"rectify": True, "maximize": True}, "float32"),
        ({"moment_dtype": "float32", "skip_nonfinite": True, "amsgrad": True}, "bfloat16"),
    ]
    for options, dtype in cases:
        fused = run(lambda o=options: keras_adam.Adam(fused=True, **o), "eager", dtype=dtype)
        plain = run(lambda o=options: keras_adam.Adam(fused=False, **o), "eager", dtype=dtype)
        tolerance = ROUND_OFF if dtype == "float32" else 2**-7
        assert deviation(fused, plain) <= tolerance, (options, dtype)


def test_an_eager_step_follows_changed_hyperparameters(monkeypatch):
    """A new learning rate (a variable) reuses the program; a new `beta_1` compiles one."""
    traced = []
    real = update_rule.adam_step
    monkeypatch.setattr(update_rule, "adam_step", lambda *a, **k: traced.append(1) or real(*a, **k))
    results = {}
    for fused in (None, False):
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=0.01, fused=fused)
        traces = []
        for index in range(8):
            if index == 3:
                optimizer.learning_rate = 0.03
            if index == 5:
                optimizer.beta_1 = 0.5
            if index == 7:
                optimizer.clipvalue = 0.1
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            traced.clear()
            optimizer.apply(grads, variables)
            traces.append(len(traced) // len(SHAPES))
        results[fused] = _state(variables, optimizer)
        if fused is None:
            # Step 0 builds (op by op), step 1 compiles; then only new hyperparameters do.
            assert traces == [1, 1, 0, 0, 0, 1, 0, 1]
    assert deviation(results[None], results[False]) <= ROUND_OFF
    unchanged = run(lambda: keras_adam.Adam(learning_rate=0.01, fused=False), "eager", range(8))
    assert deviation(results[False], unchanged) > 1e-3


def test_eager_step_with_a_callable_learning_rate_and_a_subset_of_variables():
    results = {}
    for fused in (None, False):
        rate = {"value": 0.01}
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=lambda r=rate: r["value"], fused=fused)
        optimizer.build(variables)
        for index in range(5):
            rate["value"] *= 2  # read at each step, never frozen into a program
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            optimizer.apply(grads[:2], variables[:2])  # the third never moves
        results[fused] = _state(variables, optimizer)
        np.testing.assert_array_equal(results[fused].weights[2], _initial()[2].astype("float32"))
    assert deviation(results[None], results[False]) <= ROUND_OFF
    constant = run(lambda: keras_adam.Adam(learning_rate=0.01), "eager", range(5))
    assert deviation(State(results[None].weights[:1], {}), State(constant.weights[:1], {})) > 1e-3
    # A subset under a plain learning rate compiles (its own program per subset).
    for fused in (None, False):
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=0.01, fused=fused)
        optimizer.build(variables)
        for index in range(4):
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            subset = [0, 1] if index % 2 else [1, 2]
            optimizer.apply([grads[i] for i in subset], [variables[i] for i in subset])
        results[fused] = _state(variables, optimizer)
    assert deviation(results[None], results[False]) <= ROUND_OFF
