"""keras_adam.Adam against a NumPy transcription of Kingma & Ba (2014)."""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers import paper_adam
from tests.helpers.tf_support import (
    STEPS,
    THETA0,
    keras_trajectory,
    numpy_gradient,
    relative_deviation,
)


def paper(**kwargs):
    return np.array(paper_adam.run(THETA0, numpy_gradient, STEPS, **kwargs))


# lr is an exact binary fraction because the learning-rate variable is
# float32 (keras.config.floatx()); β and ε are not.
HYPER = dict(learning_rate=2.0**-5, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
TOLERANCE = {"float32": 2e-5, "float64": 1e-12}


def as_paper(learning_rate, beta_1, beta_2, epsilon):
    return dict(alpha=learning_rate, beta1=beta_1, beta2=beta_2, eps=epsilon)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize(
    "variant",
    [{}, {"amsgrad": True}, {"weight_decay": 0.1}, {"amsgrad": True, "weight_decay": 0.1}],
    ids=["adam", "amsgrad", "weight_decay", "amsgrad+weight_decay"],
)
def test_matches_the_papers_efficient_form(variant, mode, dtype):
    ours = keras_trajectory(keras_adam.Adam(**HYPER, **variant), dtype, mode)
    expected = paper(form="efficient", **as_paper(**HYPER), **variant)
    assert relative_deviation(expected[-1], THETA0) > 0.1  # it moved
    assert relative_deviation(ours, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_zero_epsilon_is_algorithm_1(mode):
    hyper = {**HYPER, "epsilon": 0.0}
    ours = keras_trajectory(keras_adam.Adam(**hyper), "float64", mode)
    expected = paper(form="algorithm_1", **as_paper(**hyper))
    assert relative_deviation(ours, expected) <= 1e-12


def test_epsilon_hat_is_a_step_dependent_paper_epsilon():
    """ε̂ (Keras, ours) equals Algorithm 1's ε only after the conversion
    ε_t = ε̂ / √(1 − β2^t); with the same number the two differ."""
    hyper = {**HYPER, "epsilon": 0.05}
    ours = keras_trajectory(keras_adam.Adam(**hyper), "float64", "eager")
    beta_2 = hyper["beta_2"]
    converted = paper(
        form="algorithm_1",
        **{
            **as_paper(**hyper),
            "eps": lambda t: hyper["epsilon"] / np.sqrt(1 - beta_2**t),
        },
    )
    same_number = paper(form="algorithm_1", **as_paper(**hyper))
    assert relative_deviation(ours, converted) <= 1e-12
    assert relative_deviation(ours, same_number) > 1e-3


def test_float64_hyperparameters_are_not_rounded_through_float32():
    """Keras casts β=0.9 to float32 before using it with float64 variables;
    its trajectory then drifts from the exact float64 one. Ours does not."""
    expected = paper(form="efficient", **as_paper(**HYPER))
    ours = keras_trajectory(keras_adam.Adam(**HYPER), "float64", "eager")
    keras_run = keras_trajectory(keras.optimizers.Adam(**HYPER), "float64", "eager")
    assert relative_deviation(ours, expected) <= 1e-12
    assert relative_deviation(keras_run, expected) > 1e-9


def test_float64_learning_rate_with_float64_floatx():
    """With floatx float64 the learning-rate variable is float64 too, and a
    non-binary learning rate is exact."""
    keras.config.set_floatx("float64")
    hyper = {**HYPER, "learning_rate": 1e-3}
    ours = keras_trajectory(keras_adam.Adam(**hyper), "float64", "eager")
    expected = paper(form="efficient", **as_paper(**hyper))
    assert relative_deviation(ours, expected) <= 1e-12


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_paper_epsilon_mode_is_algorithm_1(mode, amsgrad):
    ours = keras_trajectory(
        keras_adam.Adam(**HYPER, amsgrad=amsgrad, epsilon_mode="paper"), "float64", mode
    )
    expected = paper(form="algorithm_1", amsgrad=amsgrad, **as_paper(**HYPER))
    assert relative_deviation(ours, expected) <= 1e-12
    hat = paper(form="efficient", amsgrad=amsgrad, **as_paper(**HYPER))
    assert relative_deviation(ours, hat) > 1e-9  # the placement matters
