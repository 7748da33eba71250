"""Fuzzing the constructor and `from_config`: any input either builds a working optimizer or
raises ValueError/TypeError that names the argument; nothing crashes and no state is wrong."""

import math

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_adam

ARGUMENTS = (
    "learning_rate beta_1 beta_2 epsilon amsgrad weight_decay clipnorm clipvalue global_clipnorm "
    "use_ema ema_momentum ema_overwrite_frequency loss_scale_factor gradient_accumulation_steps "
    "name epsilon_mode decoupled_weight_decay exclude_from_weight_decay rectify maximize "
    "lazy_sparse moment_dtype fused skip_nonfinite"
).split()

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
    st.text(max_size=6),
    st.sampled_from(["hat", "paper", "float32", "bfloat16", "bias", "(", "adam"]),
    st.lists(st.sampled_from(["bias", "kernel", "[", "norm"]), max_size=3),
    st.just(np.float32(0.5)),
    st.just(np.int64(2)),
)
keys = st.sampled_from(ARGUMENTS) | st.text(min_size=1, max_size=8)
kwargs = st.dictionaries(keys, anything, max_size=5)
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_error(error, given):
    """The message names one of the arguments given."""
    message = str(error)
    named = [key for key in given if key in message or repr(key) in message]
    assert named, f"{type(error).__name__} names no argument of {given}: {message}"


def representable(arguments):
    """Whether every number among `arguments` is 0 or within [1e-6, 1e6] in magnitude.

    Beyond, a valid argument may give a step that float32 cannot show: a
    learning rate of 2e-16 moves no weight, one of 3e38 overflows to -inf,
    as IEEE arithmetic (and Keras's Adam) would.
    """
    numbers = [
        abs(float(v))
        for v in arguments.values()
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
    ]
    return all(v == 0 or 1e-6 <= v <= 1e6 for v in numbers)


def check_works(optimizer, arguments):
    """One step on a small problem: the step counter moved; with representable
    arguments, the weights moved and stay finite."""
    variable = keras.Variable(np.linspace(-1.0, 1.0, 6).reshape(2, 3), dtype="float32")
    before = variable.numpy().copy()
    gradient = keras.ops.convert_to_tensor(np.arange(1.0, 7.0).reshape(2, 3), "float32")
    optimizer.apply_gradients([(gradient, variable)])
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1
    if representable(arguments):
        assert np.all(np.isfinite(variable.numpy()))
        accumulating = (optimizer.gradient_accumulation_steps or 1) > 1
        assert accumulating or not np.array_equal(variable.numpy(), before)
    return optimizer.get_config()


@FUZZ
@given(kwargs)
def test_any_constructor_input_builds_a_working_optimizer_or_names_the_argument(given_kwargs):
    keras.backend.clear_session()
    try:
        optimizer = keras_adam.Adam(**given_kwargs)
    except (ValueError, TypeError) as error:
        check_error(error, given_kwargs)
        return
    config = check_works(optimizer, given_kwargs)
    # What was accepted is what is kept.
    for key, value in given_kwargs.items():
        if key in ("learning_rate", "name", "exclude_from_weight_decay") or value is None:
            continue
        kept = config[key]
        if isinstance(value, float) and math.isnan(value):
            raise AssertionError(f"NaN accepted for {key}")
        assert kept == value or (isinstance(kept, float) and math.isclose(kept, float(value)))


@FUZZ
@given(kwargs)
def test_any_config_loads_into_a_working_optimizer_or_names_the_argument(changes):
    keras.backend.clear_session()
    config = {**keras_adam.Adam().get_config(), **changes}
    try:
        optimizer = keras_adam.Adam.from_config(config)
    except (ValueError, TypeError) as error:
        check_error(error, changes or config)
        return
    check_works(optimizer, changes)
    again = keras_adam.Adam.from_config(optimizer.get_config()).get_config()
    assert again == optimizer.get_config()


def test_extreme_learning_rates_step_as_ieee_arithmetic_does():
    """The two examples hypothesis found: accepted and one step taken. At
    2.2e-16 no weight moves (as with Keras's Adam); at 3.4e38 every weight
    goes to float32's largest magnitude or beyond, downhill (Keras's torch
    Adam stops at -3.4e38, torch's fused kernels overflow to -inf)."""
    initial = np.linspace(-1.0, 1.0, 6).reshape(2, 3).astype("float32")
    gradient = keras.ops.convert_to_tensor(np.arange(1.0, 7.0).reshape(2, 3), "float32")
    for learning_rate in (2.220446049250313e-16, 3.4028235e38):
        keras.backend.clear_session()
        check_works(keras_adam.Adam(learning_rate=learning_rate), {"learning_rate": learning_rate})
        values = []
        for optimizer in (keras_adam.Adam(learning_rate), keras.optimizers.Adam(learning_rate)):
            variable = keras.Variable(initial)
            optimizer.apply_gradients([(gradient, variable)])
            values.append(variable.numpy())
        if learning_rate < 1:
            np.testing.assert_array_equal(values[0], initial)
            np.testing.assert_array_equal(values[1], initial)
        else:
            assert np.all(values[0] <= -3.4e38) and np.all(values[1] <= -3.4e38)
