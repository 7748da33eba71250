"""keras_adam.Adam against keras.optimizers.Adam and a NumPy oracle, on every backend.

Every base option of Keras and every flag of ours, on each execution mode
of the backend (`neutral.MODES`), on the default path and on `fused=False`
(the `keras.ops` reference), in float32 and (where the backend has it)
float64.
"""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers import numpy_adam
from tests.helpers.neutral import (
    BACKEND,
    BINARY,
    DTYPES,
    KERAS_OPTIONS,
    MODES,
    STEPS,
    THETA0,
    numpy_gradient,
    relative_deviation,
    trajectory,
)

# keras.optimizers.Adam on torch is Keras's `torch._foreach_` Adam, which
# rounds m·β1 + g·(1−β1) where Keras's generic step (and ours) rounds
# m + (g − m)(1−β1): round-off apart. Elsewhere the reference path is
# Keras's own arithmetic, bit for bit. Fused paths are round-off apart.
EXACT = {"float32": 0.0, "float64": 0.0}
ROUND_OFF = {"float32": 2e-6, "float64": 1e-13}


def keras_tolerance(fused, dtype):
    if fused is False and BACKEND != "torch":
        return EXACT[dtype]
    return ROUND_OFF[dtype]


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", sorted(KERAS_OPTIONS))
def test_same_trajectory_as_keras(option, mode, dtype, fused):
    kwargs = {**BINARY, **KERAS_OPTIONS[option]}
    ours, ours_state = trajectory(keras_adam.Adam(**kwargs, fused=fused), dtype, mode)
    theirs, their_state = trajectory(keras.optimizers.Adam(**kwargs), dtype, mode)
    assert relative_deviation(theirs[-1], THETA0) > 1e-2  # it moved
    tolerance = keras_tolerance(fused, dtype)
    assert relative_deviation(ours, theirs) <= tolerance
    assert len(ours_state) == len(their_state)
    for a, b in zip(ours_state, their_state, strict=True):
        assert relative_deviation(a, b) <= tolerance


@pytest.mark.parametrize("mode", MODES)
def test_keras_default_hyperparameters_float32(mode):
    """Keras's defaults (β, ε not binary fractions) in float32: round-off apart."""
    ours, _ = trajectory(keras_adam.Adam(), "float32", mode)
    theirs, _ = trajectory(keras.optimizers.Adam(), "float32", mode)
    assert relative_deviation(theirs[-1], THETA0) > 1e-3
    assert relative_deviation(ours, theirs) <= 1e-5


FLAGS = {
    "adam": {},
    "paper_epsilon": {"epsilon_mode": "paper"},
    "amsgrad": {"amsgrad": True},
    "amsgrad_paper": {"amsgrad": True, "epsilon_mode": "paper"},
    "adamw": {"weight_decay": 0.125},
    "l2": {"weight_decay": 0.125, "decoupled_weight_decay": False},
    "maximize": {"maximize": True},
    "radam": {"rectify": True},
    "radam_paper": {"rectify": True, "epsilon_mode": "paper"},
    "radam_adamw": {"rectify": True, "weight_decay": 0.125},
    "everything": {
        "amsgrad": True,
        "weight_decay": 0.125,
        "decoupled_weight_decay": False,
        "maximize": True,
    },
}
# β2 = 0.99 gives RAdam ρ∞ = 199, so its rectified branch starts at t = 6.
ORACLE_HYPER = dict(learning_rate=2.0**-6, beta_1=0.9, beta_2=0.99, epsilon=1e-3)
ORACLE_TOLERANCE = {"float32": 2e-5, "float64": 1e-12}


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_every_flag_matches_the_numpy_oracle(flag, mode, dtype, fused):
    kwargs = {**ORACLE_HYPER, **FLAGS[flag]}
    ours, _ = trajectory(keras_adam.Adam(**kwargs, fused=fused), dtype, mode)
    expected = numpy_adam.run(THETA0, numpy_gradient, STEPS, **kwargs)
    assert relative_deviation(expected[-1], THETA0) > 1e-2  # it moved
    assert relative_deviation(ours, expected) <= ORACLE_TOLERANCE[dtype]


@pytest.mark.parametrize("flag", ["paper_epsilon", "amsgrad", "l2", "maximize", "radam"])
def test_each_flag_changes_the_trajectory(flag):
    """The oracle comparison above could not tell a flag that is ignored."""
    plain = numpy_adam.run(THETA0, numpy_gradient, STEPS, **ORACLE_HYPER)
    flagged, _ = trajectory(keras_adam.Adam(**ORACLE_HYPER, **FLAGS[flag]), DTYPES[-1])
    assert relative_deviation(flagged, plain) > 1e-4


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_moment_dtype(moment_dtype):
    """Moments in another dtype: stored in it, and the step tracks the oracle."""
    optimizer = keras_adam.Adam(**ORACLE_HYPER, moment_dtype=moment_dtype)
    ours, _ = trajectory(optimizer, "float32")
    assert all(
        keras.backend.standardize_dtype(v.dtype) == moment_dtype for v in optimizer.variables[2:]
    )
    expected = numpy_adam.run(THETA0, numpy_gradient, STEPS, **ORACLE_HYPER)
    tolerance = 2e-5 if moment_dtype == "float32" else 2e-2
    assert relative_deviation(ours, expected) <= tolerance


def test_bfloat16_weights_move_where_keras_freezes_them():
    """Keras computes bf16 steps in bf16, where β2 = 0.999 rounds to 1; we widen."""
    hyper = dict(learning_rate=2.0**-6)
    ours, _ = trajectory(keras_adam.Adam(**hyper), "bfloat16", steps=10)
    expected = numpy_adam.run(
        THETA0, numpy_gradient, 10, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **hyper
    )
    assert relative_deviation(ours, expected) <= 2e-2
    assert relative_deviation(ours[-1], THETA0) > 1e-2


def test_lazy_sparse_warns_once_where_gradients_are_dense():
    """Accepted everywhere (configs move between backends); said where it does nothing."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lazy, _ = trajectory(keras_adam.Adam(**BINARY, lazy_sparse=True), "float32", steps=5)
    dense, _ = trajectory(keras_adam.Adam(**BINARY), "float32", steps=5)
    messages = [str(w.message) for w in caught if "lazy_sparse" in str(w.message)]
    if BACKEND == "tensorflow":
        assert messages == []
    else:
        assert len(messages) == 1
        assert f"the {BACKEND} backend" in messages[0]
    np.testing.assert_array_equal(lazy, dense)


@pytest.mark.parametrize("mode", MODES)
def test_fused_true_is_accepted_where_the_backend_has_a_fused_path(mode):
    """Every backend has a fused path for Keras's options (TensorFlow's
    kernels, torch's fused Adam, XLA on JAX): `fused=True` takes it."""
    fused, _ = trajectory(keras_adam.Adam(**BINARY, fused=True), "float32", mode)
    reference, _ = trajectory(keras_adam.Adam(**BINARY, fused=False), "float32", mode)
    assert relative_deviation(fused, reference) <= ROUND_OFF["float32"]


def test_fused_true_with_rectify():
    """RAdam has no fused kernel on TensorFlow or PyTorch: refused, naming why.
    XLA compiles every option, so on JAX it is the fused path."""
    if BACKEND == "jax":
        optimizer = keras_adam.Adam(fused=True, rectify=True)
        fused, _ = trajectory(optimizer, "float32", "jit", steps=10)
        assert np.isfinite(fused).all()
        return
    with pytest.raises(ValueError, match=r"fused=True.*rectify=True"):
        keras_adam.Adam(fused=True, rectify=True)
