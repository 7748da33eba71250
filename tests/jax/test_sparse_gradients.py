"""Sparse gradients on JAX (`jax.experimental.sparse.BCOO`), which Keras's
optimizers accept and Keras's optimizer tests use: every path gives Keras's
numbers (`update_rule.adam_step` combines them with `keras.ops`)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from jax.experimental import sparse

import keras_adam


def _gradient():
    """Rows 0, 2 and 4 of a (5, 2) gradient at 0.5, the others absent."""
    dense = np.zeros((5, 2), "float32")
    dense[[0, 2, 4]] = 0.5
    return sparse.BCOO.fromdense(jnp.asarray(dense))


def _step(make, how, steps=2):
    variable = keras.Variable(np.ones((5, 2), "float32"))
    optimizer = make()
    for _ in range(steps):
        if how == "apply":
            optimizer.apply([_gradient()], [variable])
        elif how == "apply_gradients":
            optimizer.apply_gradients([(_gradient(), variable)])
        else:
            optimizer.build([variable])
            values = [x.value for x in optimizer.variables]
            new_trainable, new_optimizer = jax.jit(optimizer.stateless_apply)(
                values, [_gradient()], [variable.value]
            )
            variable.assign(new_trainable[0])
            for x, value in zip(optimizer.variables, new_optimizer, strict=True):
                x.assign(value)
    return np.asarray(variable.value)


OPTIONS = [
    {},
    {"fused": False},
    {"fused": True},
    {"skip_nonfinite": True},
    {"amsgrad": True, "weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": False, "maximize": True},
    {"rectify": True, "epsilon_mode": "paper"},
]


@pytest.mark.parametrize("how", ["apply", "apply_gradients", "stateless_apply"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_sparse_gradient_matches_the_same_dense_gradient(options, how):
    dense = np.asarray(_gradient().todense())
    ours = _step(lambda: keras_adam.Adam(0.1, **options), how)
    variable = keras.Variable(np.ones((5, 2), "float32"))
    reference = keras_adam.Adam(0.1, **options)
    for _ in range(2):
        reference.apply([jnp.asarray(dense)], [variable])
    np.testing.assert_allclose(ours, np.asarray(variable.value), rtol=0, atol=2e-7)


@pytest.mark.parametrize("how", ["apply", "apply_gradients", "stateless_apply"])
@pytest.mark.parametrize("fused", [None, False])
def test_sparse_gradient_gives_kerass_numbers(fused, how):
    ours = _step(lambda: keras_adam.Adam(0.1, fused=fused), how, steps=1)
    theirs = _step(lambda: keras.optimizers.Adam(0.1), how, steps=1)
    np.testing.assert_array_equal(ours, theirs)
    # Keras's numbers: the touched rows move by about η, the others stay.
    np.testing.assert_allclose(ours[[0, 2, 4]], 0.9000013, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ours[[1, 3]], 1.0)
