"""Property tests: any valid combination of flags, shapes and dtypes builds,
applies, serializes and reloads, and the reloaded optimizer continues exactly."""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_adam


@st.composite
def configurations(draw):
    rectify = draw(st.booleans())
    return dict(
        learning_rate=draw(st.floats(1e-4, 0.1)),
        beta_1=draw(st.floats(0.0, 0.99)),
        beta_2=draw(st.floats(0.5, 0.9999)),
        epsilon=draw(st.floats(1e-8, 1e-3)),
        amsgrad=False if rectify else draw(st.booleans()),
        rectify=rectify,
        weight_decay=draw(st.none() | st.floats(0.0, 0.1)),
        decoupled_weight_decay=draw(st.booleans()),
        epsilon_mode=draw(st.sampled_from(["hat", "paper"])),
        maximize=draw(st.booleans()),
        lazy_sparse=draw(st.booleans()),
        moment_dtype=draw(st.sampled_from([None, "float32", "float64", "bfloat16", "float16"])),
        exclude_from_weight_decay=draw(st.none() | st.just(["bias"])),
    )


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from(["float32", "float64", "bfloat16", "float16"])


def gradient(variable, step, sparse):
    rng = np.random.default_rng(step)
    values = rng.normal(size=variable.shape)
    if sparse and len(variable.shape) >= 1:
        rows = rng.integers(0, variable.shape[0], size=3)
        slices = tf.constant(rng.normal(size=(3, *variable.shape[1:])), variable.dtype)
        return tf.IndexedSlices(slices, tf.constant(rows, "int64"), variable.shape)
    return tf.constant(values, variable.dtype)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configurations(), shape=shapes, dtype=dtypes, sparse=st.booleans())
def test_any_valid_combination_applies_serializes_and_resumes(config, shape, dtype, sparse):
    keras.backend.clear_session()
    init = np.random.default_rng(0).normal(size=shape)
    variable = keras.Variable(init, dtype=dtype, name="bias")
    optimizer = keras_adam.Adam(**config)
    for step in range(3):
        optimizer.apply_gradients([(gradient(variable, step, sparse), variable)])
    assert np.all(np.isfinite(variable.numpy().astype(np.float64)))
    assert int(optimizer.iterations.numpy()) == 3

    config_out = optimizer.get_config()
    clone = keras_adam.Adam.from_config(dict(config_out))
    assert clone.get_config() == config_out
    twin = keras.Variable(variable.numpy(), dtype=dtype, name="bias")
    clone.build([twin])
    store = {}
    optimizer.save_own_variables(store)
    clone.load_own_variables(store)

    optimizer.apply_gradients([(gradient(variable, 9, sparse), variable)])
    clone.apply_gradients([(gradient(twin, 9, sparse), twin)])
    np.testing.assert_array_equal(variable.numpy(), twin.numpy())
    for a, b in zip(optimizer.variables, clone.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
