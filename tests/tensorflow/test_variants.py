"""The flags beyond keras.optimizers.Adam: AdamW parity, weight-decay
exclusions, lazy sparse rows, moment dtypes, and refused combinations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from tests.helpers.tf_support import BINARY, DTYPES, MODES, relative_deviation, trajectory

# -- AdamW ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_weight_decay_matches_keras_adamw(mode, dtype):
    ours = keras_adam.Adam(weight_decay=0.25, **BINARY)
    theirs = keras.optimizers.AdamW(weight_decay=0.25, **BINARY)
    ours_history, _, _ = trajectory(ours, dtype, mode)
    theirs_history, _, _ = trajectory(theirs, dtype, mode)
    assert relative_deviation(ours_history, theirs_history) <= 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_constructor_exclusion_matches_keras_method_exclusion(mode):
    ours = keras_adam.Adam(weight_decay=0.25, exclude_from_weight_decay=["bias"], **BINARY)
    theirs = keras.optimizers.AdamW(weight_decay=0.25, **BINARY)
    theirs.exclude_from_weight_decay(var_names=["bias"])
    decayed_everywhere, _, _ = trajectory(
        keras_adam.Adam(weight_decay=0.25, **BINARY), "float32", mode
    )
    ours_history, _, _ = trajectory(ours, "float32", mode)
    theirs_history, _, _ = trajectory(theirs, "float32", mode)
    np.testing.assert_array_equal(ours_history, theirs_history)
    assert relative_deviation(ours_history, decayed_everywhere) > 1e-4


# -- weight-decay exclusions: name, path, config, .keras ---------------------


def two_layer_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="encoder"),
            keras.layers.Dense(2, name="head"),
        ],
        name="net",
    )


def decay_only(optimizer, model, steps=3):
    """Steps with zero gradients: only weight decay moves the weights.

    Keyed by path without the model's scope, which Keras drops on reload."""
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    zeros = [tf.zeros_like(v.value) for v in model.trainable_variables]
    for _ in range(steps):
        optimizer.apply_gradients(zip(zeros, model.trainable_variables, strict=True))
    return {
        v.path.removeprefix("net/"): not np.array_equal(before[v.path], v.numpy())
        for v in model.trainable_variables
    }


def test_exclusion_matches_path_and_name():
    model = two_layer_model()
    optimizer = keras_adam.Adam(
        weight_decay=0.5, exclude_from_weight_decay=["/head/kernel$", "bias"]
    )
    moved = decay_only(optimizer, model)
    assert moved == {
        "encoder/kernel": True,
        "encoder/bias": False,
        "head/kernel": False,
        "head/bias": False,
    }


def test_exclusions_survive_config_and_keras_files(tmp_path):
    model = two_layer_model()
    optimizer = keras_adam.Adam(weight_decay=0.5, exclude_from_weight_decay="(^|/)head/")
    optimizer.exclude_from_weight_decay(
        var_list=[model.layers[0].bias], var_names=["never_matches"]
    )
    config = optimizer.get_config()
    assert config["exclude_from_weight_decay"] == [
        "(^|/)head/",
        "never_matches",
        "^(?:net/)?encoder/bias$",
    ]

    model.compile(optimizer=optimizer, loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert (
        loaded.optimizer.get_config()["exclude_from_weight_decay"]
        == (config["exclude_from_weight_decay"])
    )
    rebuilt = keras_adam.Adam.from_config(config)
    for candidate, candidate_model in ((loaded.optimizer, loaded), (rebuilt, two_layer_model())):
        assert decay_only(candidate, candidate_model) == {
            "encoder/kernel": True,
            "encoder/bias": False,
            "head/kernel": False,
            "head/bias": False,
        }


def test_keras_drops_method_exclusions_from_its_config():
    """What we fix: keras.optimizers.AdamW forgets exclusions on save."""
    theirs = keras.optimizers.AdamW(weight_decay=0.5)
    theirs.exclude_from_weight_decay(var_names=["bias"])
    assert "bias" not in str(theirs.get_config())


# -- lazy sparse rows -----------------------------------------------------------

TABLE0 = np.random.default_rng(4).normal(size=(50, 3)).astype("float32")


def sparse_steps(optimizer, mode, rows_per_step, table0=TABLE0):
    table = keras.Variable(table0)
    optimizer.build([table])

    def step(rows):
        values = tf.cos(tf.gather(table.value, rows)) + 0.5
        optimizer.apply_gradients([(tf.IndexedSlices(values, rows, [50, 3]), table)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for rows in rows_per_step:
        step(tf.constant(rows, getattr(rows, "dtype", "int64")))
    return table.numpy(), [v.numpy() for v in optimizer.variables[2:]]


ROWS = [[4, 9, 4, 30], [9, 12, 12, 12], [4, 30, 31, 2]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", [{}, {"amsgrad": True, "weight_decay": 0.1}, {"rectify": True}])
def test_lazy_sparse_leaves_untouched_rows_bit_identical(mode, variant):
    table, slots = sparse_steps(keras_adam.Adam(lazy_sparse=True, **variant), mode, ROWS)
    touched = sorted({r for rows in ROWS for r in rows})
    untouched = np.setdiff1d(np.arange(50), touched)
    np.testing.assert_array_equal(table[untouched], TABLE0[untouched])
    assert np.all(table[touched] != TABLE0[touched])
    for slot in slots:
        assert not np.any(slot[untouched])


@pytest.mark.parametrize("mode", MODES)
def test_lazy_sparse_equals_dense_when_every_row_is_touched_each_step(mode):
    every_row = [list(range(50)) + [7, 7]] * 3
    lazy, _ = sparse_steps(keras_adam.Adam(lazy_sparse=True), mode, every_row)
    dense, _ = sparse_steps(keras_adam.Adam(lazy_sparse=False), mode, every_row)
    np.testing.assert_allclose(lazy, dense, rtol=1e-6, atol=1e-7)


def test_lazy_sparse_compiles_to_static_shapes_under_xla():
    # One dynamic shape (tf.argsort lowers with set-dimension-size) made XLA
    # inline and recompute every Dropout's random generator: 5.7x slower steps.
    table = keras.Variable(TABLE0)
    optimizer = keras_adam.Adam(lazy_sparse=True)
    optimizer.build([table])

    @tf.function(jit_compile=True)
    def step(rows):
        values = tf.cos(tf.gather(table.value, rows)) + 0.5
        optimizer.apply_gradients([(tf.IndexedSlices(values, rows, [50, 3]), table)])

    hlo = step.experimental_get_compiler_ir(tf.constant(ROWS[1], "int64"))(stage="hlo")
    assert "sort(" in hlo and "scatter(" in hlo  # the lazy rows, not a dense update
    assert "set-dimension-size" not in hlo
    assert "<=" not in hlo  # no bounded dynamic dimension


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_lazy_sparse_under_xla_equals_tf_function(dtype):
    rows = [[4, 9, 4, 30, 4], [49, 12, 12, 0, 12], [4, 30, 31, 2, 2]]
    rows = [np.asarray(r, dtype) for r in rows]
    compiled, compiled_slots = sparse_steps(keras_adam.Adam(lazy_sparse=True), "xla", rows)
    traced, traced_slots = sparse_steps(
        keras_adam.Adam(lazy_sparse=True, fused=False), "function", rows
    )
    np.testing.assert_allclose(compiled, traced, rtol=1e-6, atol=0)
    for ours, reference in zip(compiled_slots, traced_slots, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=0)


def test_lazy_sparse_with_dense_gradients_is_the_dense_update():
    ours, _, _ = trajectory(keras_adam.Adam(lazy_sparse=True, **BINARY), "float32", "function")
    plain, _, _ = trajectory(keras_adam.Adam(**BINARY), "float32", "function")
    np.testing.assert_array_equal(ours, plain)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_lazy_sparse_embedding_model_fit(jit_compile):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(100, 4),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile(
        optimizer=keras_adam.Adam(lazy_sparse=True, learning_rate=0.01),
        loss="mse",
        jit_compile=jit_compile,
    )
    before = model.layers[0].embeddings.numpy().copy()
    x = np.random.default_rng(0).integers(0, 10, size=(64, 2))
    model.fit(x, np.ones((64, 1)), epochs=2, batch_size=16, verbose=0)
    after = model.layers[0].embeddings.numpy()
    np.testing.assert_array_equal(after[10:], before[10:])
    assert np.all(after[:10] != before[:10])


# -- moment dtype -----------------------------------------------------------------


@pytest.mark.parametrize("moment_dtype", ["float32", "float64", "bfloat16", "float16", None])
def test_moment_dtype_sets_slot_dtypes(moment_dtype):
    optimizer = keras_adam.Adam(moment_dtype=moment_dtype, amsgrad=True)
    variables = [keras.Variable(np.ones((2, 2)), dtype="bfloat16", name="w")]
    optimizer.build(variables)
    slots = optimizer.variables[2:]
    assert [v.name for v in slots] == ["w_momentum", "w_velocity", "w_velocity_hat"]
    assert {v.dtype for v in slots} == {moment_dtype or "bfloat16"}


STEPS = 30
W0 = np.random.default_rng(3).uniform(-1, 1, size=(64,))
GRADS = np.random.default_rng(8).normal(size=(STEPS, 64)) * 1e-2 + 5e-3


def bf16_run(optimizer, dtype="bfloat16"):
    w = keras.Variable(W0, dtype=dtype)
    optimizer.build([w])
    step = tf.function(lambda g: optimizer.apply_gradients([(g, w)]), jit_compile=True)
    for g in GRADS:
        step(tf.cast(tf.constant(g, "bfloat16"), dtype))
    return w.numpy().astype(np.float64)


def test_bf16_weights_with_float32_moments_stay_within_bf16_resolution():
    """Small gradients (~1e-2): g² ~ 1e-4 is where bf16 moments lose digits."""
    reference = bf16_run(keras_adam.Adam(learning_rate=0.01), "float64")
    ours = bf16_run(keras_adam.Adam(learning_rate=0.01, moment_dtype="float32"))
    moved = np.abs(reference - W0)
    assert np.min(moved) > 0.01
    # One bf16 rounding per step, at most half a unit in the last place
    # (2**-8 relative): the error stays within that bound.
    magnitude = np.maximum(np.abs(W0), np.abs(reference)) + moved
    assert np.all(np.abs(ours - reference) <= STEPS * 2.0**-8 * magnitude)
    assert np.mean(np.abs(ours - reference)) < 0.1 * np.mean(moved)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_moment_dtype_under_mixed_precision(policy, moment_dtype):
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(1, dtype="float32")]
    )
    model.compile(optimizer=keras_adam.Adam(moment_dtype=moment_dtype), loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    history = model.fit(x, x[:, :1], epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    inner = model.optimizer
    if policy == "mixed_float16":
        assert isinstance(inner, keras.optimizers.LossScaleOptimizer)
        inner = inner.inner_optimizer
    assert {v.dtype for v in inner.variables[2:]} == {moment_dtype}


# -- refused values and combinations ----------------------------------------------

BAD = [
    ({"epsilon_mode": "Paper"}, "epsilon_mode"),
    ({"epsilon_mode": None}, "epsilon_mode"),
    ({"moment_dtype": "int32"}, "moment_dtype"),
    ({"moment_dtype": "float"}, "moment_dtype"),
    ({"decoupled_weight_decay": "yes"}, "decoupled_weight_decay"),
    ({"rectify": 1}, "rectify"),
    ({"maximize": None}, "maximize"),
    ({"lazy_sparse": "True"}, "lazy_sparse"),
    ({"exclude_from_weight_decay": [3]}, "exclude_from_weight_decay"),
    ({"exclude_from_weight_decay": "(unclosed"}, "exclude_from_weight_decay"),
    ({"rectify": True, "amsgrad": True}, "`rectify` and `amsgrad`"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_flags_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")) as info:
        keras_adam.Adam(**kwargs)
    for value in kwargs.values():
        assert repr(value) in str(info.value)
