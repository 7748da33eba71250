"""Low-precision weights: bias corrections in float32, elementwise step in
float32, stored back in the weights' dtype."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam

STEPS = 30
RNG = np.random.default_rng(3)
W0 = RNG.uniform(-1, 1, size=(64,))
GRADS = [RNG.normal(size=(64,)) + 0.5 for _ in range(STEPS)]


def run(optimizer, dtype, mode="eager", grad_dtype=None):
    w = keras.Variable(W0, dtype=dtype)
    optimizer.build([w])

    def step(g):
        optimizer.apply_gradients([(g, w)])

    if mode == "xla":
        step = tf.function(step, jit_compile=True)
    for g in GRADS:
        g = tf.constant(g, dtype=grad_dtype or dtype)
        step(tf.cast(g, dtype))
    return w.numpy().astype(np.float64)


def reference(dtype):
    """The same steps in float64 with the gradients rounded as the low-precision
    run sees them: the exact trajectory that low-precision weights approximate."""
    return run(keras_adam.Adam(learning_rate=0.01), "float64", grad_dtype=dtype)


def test_keras_adam_bfloat16_weights_never_move():
    """Keras computes 1 - beta_2**t in bfloat16, where 0.999 rounds to 1.0:
    the bias correction is 0 and so is every step."""
    assert float(tf.cast(tf.constant(0.999), tf.bfloat16)) == 1.0
    final = run(keras.optimizers.Adam(learning_rate=0.01), "bfloat16")
    start = tf.cast(tf.constant(W0, tf.bfloat16), tf.float64).numpy()
    np.testing.assert_array_equal(final, start)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_weights_follow_the_exact_trajectory(dtype, mode):
    final = run(keras_adam.Adam(learning_rate=0.01), dtype, mode)
    expected = reference(dtype)
    moved = np.abs(expected - W0)
    assert np.min(moved) > 0.02  # every weight travels ~ STEPS * lr
    # Each step rounds the weight to the dtype once, an error of at most half a
    # unit in the last place (2**-8 of |w| for bf16, 2**-11 for fp16): the
    # errors add up to at most STEPS half-units, and on average far less.
    half_unit = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    magnitude = np.maximum(np.abs(W0), np.abs(expected)) + moved
    error = np.abs(final - expected)
    assert np.all(error <= STEPS * half_unit * magnitude)
    assert np.mean(error) < 0.1 * np.mean(moved)


def test_float16_keras_moves_but_loses_precision_ours_does_not():
    """In float16, 0.999 survives but the bias corrections are coarse; ours
    track the exact trajectory at least as well as Keras."""
    expected = reference("float16")
    ours = np.max(np.abs(run(keras_adam.Adam(learning_rate=0.01), "float16") - expected))
    theirs = np.max(np.abs(run(keras.optimizers.Adam(learning_rate=0.01), "float16") - expected))
    assert ours <= theirs
