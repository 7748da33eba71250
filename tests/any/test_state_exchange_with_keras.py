"""Optimizer state moves between keras.optimizers.Adam and keras_adam.Adam, on every backend."""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.neutral import BACKEND, BINARY, THETA0, numpy_gradient, relative_deviation

# Keras's torch Adam rounds its moment update differently
# (tests/any/test_against_keras_and_numpy.py).
TOLERANCE = 2e-6 if BACKEND == "torch" else 0.0


def run(optimizer, theta, steps, first=1):
    for t in range(first, first + steps):
        g = keras.ops.convert_to_tensor(numpy_gradient(np.asarray(theta.numpy()), t), "float32")
        optimizer.apply([g], [theta])
    return np.asarray(theta.numpy(), dtype=np.float64)


def make(kind, amsgrad):
    cls = keras_adam.Adam if kind == "ours" else keras.optimizers.Adam
    kwargs = {"fused": False} if kind == "ours" else {}
    return cls(**BINARY, amsgrad=amsgrad, **kwargs)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("direction", [("keras", "ours"), ("ours", "keras")])
def test_state_moves_between_the_two(direction, amsgrad):
    """10 steps in one, state moved, 10 in the other == 20 in the second alone."""
    source, target = direction
    theta = keras.Variable(THETA0, dtype="float32")
    first = make(source, amsgrad)
    run(first, theta, 10)
    store = {}
    first.save_own_variables(store)

    second = make(target, amsgrad)
    second.build([theta])
    second.load_own_variables(store)
    resumed = run(second, theta, 10, first=11)

    alone = keras.Variable(THETA0, dtype="float32")
    expected = run(make(target, amsgrad), alone, 20)
    assert int(keras.ops.convert_to_numpy(second.iterations)) == 20
    assert relative_deviation(resumed, THETA0) > 1e-2
    assert relative_deviation(resumed, expected) <= TOLERANCE


def test_state_of_another_shape_is_refused_and_nothing_changes():
    theta = keras.Variable(THETA0, dtype="float32")
    ours = keras_adam.Adam(**BINARY)
    run(ours, theta, 3)
    before = [np.array(v.numpy()) for v in ours.variables]
    other = keras.optimizers.Adam(**BINARY)
    other.build([keras.Variable(np.zeros(4), dtype="float32")])
    store = {}
    other.save_own_variables(store)
    with pytest.raises(ValueError, match="shape"):
        ours.load_own_variables(store)
    for a, b in zip(before, ours.variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
