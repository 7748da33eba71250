"""keras_adam.Adam follows keras.optimizers.Adam step for step.

Every base option, in eager mode, in tf.function and under XLA, in float32
and float64. float64 runs use exact binary-fraction hyperparameters (Keras
rounds β through float32, which would otherwise differ by design).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import BINARY, DTYPES, MODES, relative_deviation, trajectory

import keras_adam

OPTIONS = {
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

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def pair(options):
    kwargs = {**BINARY, **options}
    return keras_adam.Adam(**kwargs), keras.optimizers.Adam(**kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_same_trajectory_as_keras(option, mode, dtype):
    ours, theirs = pair(OPTIONS[option])
    our_history, our_final, our_state = trajectory(ours, dtype, mode)
    their_history, their_final, their_state = trajectory(theirs, dtype, mode)

    # The weights moved: a test that compares two frozen runs proves nothing.
    assert relative_deviation(their_history[-1], their_history[0]) > 1e-2
    assert relative_deviation(our_history, their_history) <= TOLERANCE[dtype]
    assert relative_deviation(our_final, their_final) <= TOLERANCE[dtype]
    assert len(our_state) == len(their_state)
    for ours_var, theirs_var in zip(our_state, their_state, strict=True):
        np.testing.assert_allclose(
            ours_var, theirs_var, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 1e-3
        )


@pytest.mark.parametrize("mode", MODES)
def test_default_hyperparameters_float32(mode):
    """Keras's defaults (not binary fractions) in float32: 1e-5 after 40 steps."""
    ours, theirs = keras_adam.Adam(), keras.optimizers.Adam()
    our_history, _, _ = trajectory(ours, "float32", mode)
    their_history, _, _ = trajectory(theirs, "float32", mode)
    assert relative_deviation(their_history[-1], their_history[0]) > 1e-3
    assert relative_deviation(our_history, their_history) <= 1e-5


def embedding_run(optimizer, mode, rows, densify):
    """20 steps on a 20x4 table whose gradient is a tf.IndexedSlices over `rows`."""
    table = keras.Variable(TABLE0, dtype="float32")
    rows = tf.constant(rows, dtype="int64")
    optimizer.build([table])

    def step(i):
        with tf.GradientTape() as tape:
            picked = tf.gather(table.value, rows)
            loss = tf.reduce_sum(tf.sin(picked * tf.cast(i + 1, "float32")))
        (grad,) = tape.gradient(loss, [table.value])
        assert isinstance(grad, tf.IndexedSlices)
        optimizer.apply_gradients([(tf.convert_to_tensor(grad) if densify else grad, table)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for i in range(20):
        step(tf.constant(i, dtype="int64"))
    return table.numpy()


TABLE0 = np.random.default_rng(5).normal(size=(20, 4))
UNIQUE_ROWS, REPEATED_ROWS = [3, 7, 11], [3, 7, 3, 11]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [UNIQUE_ROWS, REPEATED_ROWS], ids=["unique", "repeated"])
def test_sparse_gradients_give_the_dense_result(mode, rows):
    """tf.IndexedSlices gradients (Embedding layers) give exactly what Keras's
    Adam gives for the same gradient densified."""
    ours = embedding_run(keras_adam.Adam(**BINARY), mode, rows, densify=False)
    dense = embedding_run(keras.optimizers.Adam(**BINARY), mode, rows, densify=True)
    untouched = np.setdiff1d(np.arange(20), rows)
    assert relative_deviation(dense[rows], TABLE0[rows]) > 1e-2
    np.testing.assert_array_equal(dense[untouched], TABLE0[untouched].astype("float32"))
    assert relative_deviation(ours, dense) <= 1e-6


def test_keras_adam_mishandles_repeated_sparse_rows():
    """The Keras behaviour we do not copy: with a row repeated in a
    tf.IndexedSlices, keras.optimizers.Adam squares each slice before summing
    (v gets a² + b² instead of (a + b)²), so that row leaves the dense result.
    Rows that are not repeated agree."""
    sparse = embedding_run(keras.optimizers.Adam(**BINARY), "eager", REPEATED_ROWS, False)
    dense = embedding_run(keras.optimizers.Adam(**BINARY), "eager", REPEATED_ROWS, True)
    assert np.max(np.abs(sparse[3] - dense[3])) > 1e-3
    np.testing.assert_array_equal(np.delete(sparse, 3, axis=0), np.delete(dense, 3, axis=0))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit_matches_keras(policy):
    """Under a mixed policy the weights are float32 (fp16 wraps the optimizer
    in a LossScaleOptimizer): on the reference path both optimizers give the
    same model. (Low-precision forward passes amplify the fused kernel's
    round-off, so it is compared in tests/test_fused.py instead.)"""
    keras.config.set_dtype_policy(policy)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(128, 10)).astype("float32")
    y = rng.integers(0, 4, size=128)

    def fit(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((10,)),
                keras.layers.Dense(32, activation="relu"),
                keras.layers.Dense(4, dtype="float32"),
            ]
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
        return model

    ours, theirs = fit(keras_adam.Adam(fused=False)), fit(keras.optimizers.Adam())
    if policy == "mixed_float16":
        assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(ours.optimizer.inner_optimizer, keras_adam.Adam)
    for a, b in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
