"""Bad arguments raise ValueError naming the argument and the value."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import keras_adam

BAD = {
    "learning_rate": [0.0, -1e-3, math.nan, math.inf, "0.001", None, True, [0.1]],
    "beta_1": [1.0, -0.1, 1.5, math.nan, "0.9", None, True],
    "beta_2": [1.0, -1e-9, math.inf, "x", None, False],
    "epsilon": [-1e-8, math.nan, -math.inf, "1e-7", None],
    "amsgrad": [1, 0, "True", None],
    "weight_decay": [-0.01, math.nan, "0.1"],
    "clipnorm": [-1.0, math.inf, "1"],
    "clipvalue": [-0.5, math.nan],
    "global_clipnorm": [-2.0, "big"],
    "use_ema": [1, "yes"],
    "ema_momentum": [1.5, -0.1, math.nan],
    "ema_overwrite_frequency": [0, 2.5, "3", True],
    "loss_scale_factor": [0.0, -8.0, math.inf],
    "gradient_accumulation_steps": [1, 0, 2.5, True],
    "name": ["", 3],
}


@pytest.mark.parametrize(
    ("argument", "value"), [(a, v) for a, values in BAD.items() for v in values]
)
def test_bad_argument_names_itself_and_the_value(argument, value):
    with pytest.raises(ValueError) as info:
        keras_adam.Adam(**{argument: value})
    message = str(info.value)
    assert f"`{argument}`" in message
    assert f"{argument}={value!r}" in message or f"{argument}={float(value)!r}" in message


@pytest.mark.parametrize(
    "value", [1, 2.0**-10, np.float32(0.01), np.float64(0.5)], ids=["int", "float", "f32", "f64"]
)
def test_numeric_learning_rates_are_accepted(value):
    optimizer = keras_adam.Adam(learning_rate=value)
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(float(value), rel=1e-7)


def test_schedule_and_callable_learning_rates_are_accepted():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    assert keras_adam.Adam(learning_rate=schedule)._learning_rate is schedule
    assert float(keras_adam.Adam(learning_rate=lambda: 0.25).learning_rate) == 0.25


def test_boundary_values_are_accepted():
    optimizer = keras_adam.Adam(beta_1=0.0, beta_2=0.0, epsilon=0.0, weight_decay=0.0)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.0, 0.0, 0.0)


def test_setting_a_bad_learning_rate_raises_and_keeps_the_old_one():
    optimizer = keras_adam.Adam(learning_rate=0.5)
    with pytest.raises(ValueError, match=r"`learning_rate`.*learning_rate=-2\.0"):
        optimizer.learning_rate = -2.0
    assert float(optimizer.learning_rate.numpy()) == 0.5
    optimizer.learning_rate = 0.25
    assert float(optimizer.learning_rate.numpy()) == 0.25


def test_two_clippings_are_refused():
    with pytest.raises(ValueError, match="clipnorm"):
        keras_adam.Adam(clipnorm=1.0, clipvalue=1.0)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_beta_1_either_works_or_is_refused_by_name(value):
    try:
        optimizer = keras_adam.Adam(beta_1=value)
    except ValueError as error:
        assert "`beta_1`" in str(error)
        assert not 0 <= value < 1
    else:
        assert 0 <= value < 1
        assert optimizer.beta_1 == value


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_epsilon_either_works_or_is_refused_by_name(value):
    try:
        keras_adam.Adam(epsilon=value)
    except ValueError as error:
        assert "`epsilon`" in str(error)
        assert not (value >= 0 and math.isfinite(value))
    else:
        assert value >= 0 and math.isfinite(value)
