"""`skip_nonfinite=True` on every backend: a skipped step writes nothing.

A run whose gradient is NaN at one step must be bit-identical to the same
run with that step left out: weights, moments, `iterations`, gradient
accumulators and the weight average. Eagerly and in the backend's compiled
mode (`jax.jit` of `stateless_apply` on JAX, XLA on TensorFlow), and in
`model.fit`.
"""

import warnings

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.neutral import BINARY, JIT_COMPILE, MODES, STEPS, trajectory

VARIANTS = {
    "plain": {},
    "fused_false": {"fused": False},
    "amsgrad": {"amsgrad": True},
    "adamw": {"weight_decay": 0.25},
    "l2": {"weight_decay": 0.25, "decoupled_weight_decay": False},
    "radam": {"rectify": True},
    "paper_epsilon": {"epsilon_mode": "paper"},
    "ema": {"use_ema": True, "ema_momentum": 0.75, "ema_overwrite_frequency": 4},
    "accumulation": {"gradient_accumulation_steps": 3},
    "clipnorm": {"clipnorm": 0.25},
    "moment_dtype": {"moment_dtype": "float32"},
}
BAD_STEP = 7


def steps_taken(optimizer):
    """Calls of `apply` that took effect: Keras's raw step counter (the
    public `iterations` counts updates, a third of it with accumulation)."""
    return int(keras.ops.convert_to_numpy(optimizer._iterations))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_nonfinite_step_is_as_if_it_never_happened(variant, mode):
    kwargs = {**BINARY, **VARIANTS[variant], "skip_nonfinite": True}
    skipping = keras_adam.Adam(**kwargs)
    with_nan, state = trajectory(skipping, "float32", mode, nonfinite_at=BAD_STEP)
    without, expected_state = trajectory(
        keras_adam.Adam(**kwargs), "float32", mode, skip={BAD_STEP}
    )
    # The skipped step leaves θ where it was: drop its row before comparing.
    np.testing.assert_array_equal(with_nan[BAD_STEP - 2], with_nan[BAD_STEP - 1])
    np.testing.assert_array_equal(np.delete(with_nan, BAD_STEP - 1, axis=0), without)
    assert int(skipping.skipped_steps.numpy()) == 1
    assert steps_taken(skipping) == STEPS - 1
    assert len(state) == len(expected_state)
    for a, b in zip(state[:-1], expected_state[:-1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_without_the_flag_a_nan_propagates_as_in_keras():
    ours, _ = trajectory(keras_adam.Adam(**BINARY), "float32", nonfinite_at=BAD_STEP, steps=10)
    theirs, _ = trajectory(
        keras.optimizers.Adam(**BINARY), "float32", nonfinite_at=BAD_STEP, steps=10
    )
    assert np.isnan(ours[BAD_STEP - 1 :]).all() and np.isnan(theirs[BAD_STEP - 1 :]).all()
    assert np.isfinite(ours[: BAD_STEP - 1]).all()
    np.testing.assert_allclose(ours[: BAD_STEP - 1], theirs[: BAD_STEP - 1], rtol=1e-6)


def test_the_counter_is_the_backends_integer():
    """int64 on TensorFlow, int32 elsewhere, as `iterations`: JAX without x64
    would truncate an int64 counter, with a warning."""
    optimizer = keras_adam.Adam(skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.build([keras.Variable(np.zeros(3), dtype="float32")])
    expected = keras.backend.standardize_dtype(optimizer.iterations.dtype)
    assert keras.backend.standardize_dtype(optimizer.skipped_steps.dtype) == expected


def _model(jit_compile, **kwargs):
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=keras_adam.Adam(learning_rate=0.01, skip_nonfinite=True, **kwargs),
        loss="mse",
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
@pytest.mark.parametrize("variant", ["plain", "ema", "accumulation"])
def test_fit_skips_the_batch_with_a_nan(jit_compile, variant):
    """fit on data with a NaN batch == fit on the data without that batch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    bad = x.copy()
    bad[20, 1] = np.nan  # in the third batch of 8
    kwargs = {k: v for k, v in VARIANTS[variant].items()}
    skipping = _model(jit_compile, **kwargs)
    skipping.fit(bad, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    keep = np.r_[0:16, 24:64]
    reference = _model(jit_compile, **kwargs)
    # Two epochs of the seven clean batches, in the same order.
    reference.fit(
        np.concatenate([x[keep]] * 2),
        np.concatenate([y[keep]] * 2),
        batch_size=8,
        epochs=1,
        shuffle=False,
        verbose=0,
    )
    assert int(skipping.optimizer.skipped_steps.numpy()) == 2
    assert steps_taken(skipping.optimizer) == 14
    for a, b in zip(skipping.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(w).all() for w in skipping.get_weights())
