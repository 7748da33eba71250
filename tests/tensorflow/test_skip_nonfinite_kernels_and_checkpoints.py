"""`skip_nonfinite=True`: a step with a NaN or infinite gradient changes nothing but the count.

The reference for a run with skipped steps is the same optimizer without
`skip_nonfinite`, given the same gradients with the bad steps left out: every
weight and every optimizer variable (moments, step counter, accumulators, the
weight average) must be bit-identical. The default, Keras's behaviour, is
pinned against `keras.optimizers.Adam`. Distributed runs are in
tests/tensorflow/test_distribute.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from keras_adam import kernels
from tests.helpers.tf_support import MODES

RNG = np.random.default_rng(7)
SHAPES = [(3, 4), (4,)]
GRADIENTS = [[RNG.normal(size=s).astype("float32") for s in SHAPES] for _ in range(5)]
BAD_VALUES = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
BAD_STEP = 2  # of the five


def poisoned(bad_value, variable_index=1, where=(0,)):
    """The five gradients, one entry of one variable's gradient at BAD_STEP made non-finite."""
    gradients = [[g.copy() for g in step] for step in GRADIENTS]
    gradients[BAD_STEP][variable_index][where] = bad_value
    return gradients


def make_variables():
    start = np.random.default_rng(1)
    return [keras.Variable(start.normal(size=s).astype("float32")) for s in SHAPES]


def run(optimizer, gradients, mode):
    """Apply each step's gradients; return the weights and the optimizer's variables."""
    variables = make_variables()
    optimizer.build(variables)

    def step(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for grads in gradients:
        step([tf.constant(g) for g in grads])
    return [v.numpy() for v in variables], optimizer


def state_without_counter(optimizer):
    values = [v.numpy() for v in optimizer.variables]
    if optimizer.skipped_steps is not None:
        assert optimizer.variables[-1] is optimizer.skipped_steps
        values = values[:-1]
    return values


def assert_bit_identical(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


VARIANTS = {
    "default": {},
    "reference path": {"fused": False},
    "amsgrad": {"amsgrad": True},
    "AdamW": {"weight_decay": 0.1},
    "L2": {"weight_decay": 0.1, "decoupled_weight_decay": False},
    "rectify": {"rectify": True},
    "paper epsilon": {"epsilon_mode": "paper"},
    "ema": {"use_ema": True, "ema_overwrite_frequency": 2},
    "clipnorm": {"clipnorm": 0.5},
    "loss scale": {"loss_scale_factor": 4.0},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_skipped_step_is_as_if_it_never_happened(mode, variant):
    options = dict(learning_rate=0.05, **VARIANTS[variant])
    weights, optimizer = run(
        keras_adam.Adam(skip_nonfinite=True, **options), poisoned(np.nan), mode
    )
    clean = [g for i, g in enumerate(GRADIENTS) if i != BAD_STEP]
    expected_weights, expected = run(keras_adam.Adam(**options), clean, mode)
    assert_bit_identical(weights, expected_weights)
    assert_bit_identical(state_without_counter(optimizer), state_without_counter(expected))
    assert int(optimizer.iterations.numpy()) == len(clean)
    assert int(optimizer.skipped_steps.numpy()) == 1


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_nan_and_both_infinities_are_skipped_and_counted(bad, mode):
    gradients = poisoned(BAD_VALUES[bad], variable_index=0, where=(2, 3))
    gradients[4][1][0] = BAD_VALUES[bad]  # a second bad step
    weights, optimizer = run(keras_adam.Adam(skip_nonfinite=True), gradients, mode)
    clean = [g for i, g in enumerate(GRADIENTS) if i not in (BAD_STEP, 4)]
    expected_weights, expected = run(keras_adam.Adam(), clean, mode)
    assert_bit_identical(weights, expected_weights)
    assert_bit_identical(state_without_counter(optimizer), state_without_counter(expected))
    assert int(optimizer.skipped_steps.numpy()) == 2
    assert int(optimizer.iterations.numpy()) == 3


def test_the_bad_step_itself_changes_nothing_but_the_counter():
    variables = make_variables()
    optimizer = keras_adam.Adam(skip_nonfinite=True, amsgrad=True, use_ema=True)
    optimizer.apply_gradients(zip([tf.constant(g) for g in GRADIENTS[0]], variables, strict=True))
    before = [v.numpy().copy() for v in variables + optimizer.variables]
    bad = poisoned(np.inf)[BAD_STEP]
    optimizer.apply_gradients(zip([tf.constant(g) for g in bad], variables, strict=True))
    after = [v.numpy() for v in variables + optimizer.variables]
    counter = len(variables) + len(optimizer.variables) - 1
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if i == counter:
            assert (int(b), int(a)) == (0, 1)
        else:
            np.testing.assert_array_equal(a, b)


def test_default_lets_nonfinite_gradients_through_as_keras_does():
    gradients = poisoned(np.nan)[: BAD_STEP + 1]
    ours, optimizer = run(keras_adam.Adam(fused=False), gradients, "function")
    theirs, keras_optimizer = run(keras.optimizers.Adam(), gradients, "function")
    assert optimizer.skipped_steps is None
    assert int(optimizer.iterations.numpy()) == int(keras_optimizer.iterations.numpy()) == 3
    # The NaN reaches the weight, its moments, and nothing else.
    assert np.isnan(ours[1][0]) and np.isnan(theirs[1][0])
    assert_bit_identical(ours, theirs)
    assert_bit_identical(
        [v.numpy() for v in optimizer.variables], [v.numpy() for v in keras_optimizer.variables]
    )


@pytest.mark.parametrize("mode", MODES)
def test_sparse_row_gradients_are_checked_too(mode):
    table = keras.Variable(np.random.default_rng(2).normal(size=(6, 3)).astype("float32"))
    steps = [([0, 2, 2], 0.5), ([1, 4, 5], np.nan), ([2, 3, 0], -0.25)]

    def train(optimizer, steps):
        optimizer.build([table])
        table.assign(np.random.default_rng(2).normal(size=(6, 3)).astype("float32"))

        def step(indices, values):
            optimizer.apply_gradients([(tf.IndexedSlices(values, indices, (6, 3)), table)])

        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "xla")
        for indices, fill in steps:
            values = np.full((3, 3), 1.0, "float32") * np.float32(fill)
            values[0, 1] = 0.75
            step(tf.constant(indices), tf.constant(values))
        return table.numpy()

    skipping = keras_adam.Adam(lazy_sparse=True, skip_nonfinite=True, learning_rate=0.1)
    result = train(skipping, steps)
    expected = train(keras_adam.Adam(lazy_sparse=True, learning_rate=0.1), [steps[0], steps[2]])
    np.testing.assert_array_equal(result, expected)
    assert int(skipping.skipped_steps.numpy()) == 1


def test_a_skipped_micro_step_leaves_the_gradient_accumulators_alone():
    options = dict(gradient_accumulation_steps=2, learning_rate=0.05)
    gradients = poisoned(np.nan) + GRADIENTS[:1]
    weights, optimizer = run(keras_adam.Adam(skip_nonfinite=True, **options), gradients, "function")
    clean = [g for i, g in enumerate(gradients) if i != BAD_STEP]
    expected_weights, expected = run(keras_adam.Adam(**options), clean, "function")
    assert_bit_identical(weights, expected_weights)
    assert_bit_identical(state_without_counter(optimizer), state_without_counter(expected))
    assert int(optimizer.iterations.numpy()) == 2  # 5 finite micro-steps, 2 updates


def test_the_fused_multi_tensor_kernel_still_runs_inside_the_condition():
    if kernels.load() is None:
        pytest.skip("the multi-tensor kernel is unavailable here")
    variables = make_variables()
    optimizer = keras_adam.Adam(skip_nonfinite=True)
    optimizer.build(variables)

    @tf.function
    def step(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    graph = step.get_concrete_function([tf.constant(g) for g in GRADIENTS[0]]).graph
    assert kernels.OP_NAME in str(graph.as_graph_def())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_skips_a_poisoned_batch(jit_compile):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 5)).astype("float32")
    y = rng.normal(size=(96, 1)).astype("float32")
    x_poisoned = x.copy()
    x_poisoned[40, 1] = np.nan  # in the second batch of 32

    def fit(x, y, **options):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(
            optimizer=keras_adam.Adam(0.01, **options), loss="mse", jit_compile=jit_compile
        )
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return model

    skipping = fit(x_poisoned, y, skip_nonfinite=True)
    clean = fit(np.delete(x, np.s_[32:64], 0), np.delete(y, np.s_[32:64], 0))
    assert_bit_identical(skipping.get_weights(), clean.get_weights())
    assert int(skipping.optimizer.skipped_steps.numpy()) == 3  # once per epoch
    assert int(skipping.optimizer.iterations.numpy()) == 6
    # Without the flag the NaN reaches the weights: the comparison above can fail.
    assert not all(np.isfinite(w).all() for w in fit(x_poisoned, y).get_weights())


# -- state and configuration -----------------------------------------------------


def test_the_counter_is_saved_and_restored(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_adam.Adam(skip_nonfinite=True), loss="mse")
    x = np.array([[1.0, 2.0], [np.nan, 0.0], [0.5, -1.0]], "float32")
    model.fit(x, np.ones((3, 1), "float32"), batch_size=1, epochs=2, shuffle=False, verbose=0)
    assert int(model.optimizer.skipped_steps.numpy()) == 2
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.optimizer.skip_nonfinite is True
    assert int(loaded.optimizer.skipped_steps.numpy()) == 2
    assert int(loaded.optimizer.iterations.numpy()) == 4
    assert_bit_identical(
        [v.numpy() for v in loaded.optimizer.variables],
        [v.numpy() for v in model.optimizer.variables],
    )


def test_keras_state_loads_with_the_counter_at_zero_and_ours_refuses_without_the_flag():
    variables = make_variables()
    theirs = keras.optimizers.Adam()
    theirs.apply_gradients(zip([tf.constant(g) for g in GRADIENTS[0]], variables, strict=True))
    store = {}
    theirs.save_own_variables(store)
    ours = keras_adam.Adam(skip_nonfinite=True)
    ours.build(variables)
    ours.skipped_steps.assign(5)
    ours.load_own_variables(store)
    assert int(ours.skipped_steps.numpy()) == 0
    assert_bit_identical(state_without_counter(ours), [v.numpy() for v in theirs.variables])

    saved = {}
    ours.save_own_variables(saved)
    plain = keras_adam.Adam()
    plain.build(variables)
    with pytest.raises(ValueError, match="skip_nonfinite"):
        plain.load_own_variables(saved)


def test_config_round_trip_and_validation():
    optimizer = keras_adam.Adam(skip_nonfinite=True)
    assert optimizer.get_config()["skip_nonfinite"] is True
    assert keras_adam.Adam.from_config(optimizer.get_config()).skip_nonfinite is True
    assert keras_adam.Adam().get_config()["skip_nonfinite"] is False
    with pytest.raises(ValueError, match=r"skip_nonfinite.*'yes'"):
        keras_adam.Adam(skip_nonfinite="yes")
