"""Configs round-trip, and .keras files load and resume exactly."""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_adam
from tests.helpers.digits import LOSS, mlp, split
from tests.helpers.neutral import JIT_COMPILE

EVERY_ARGUMENT = dict(
    learning_rate=0.0125,
    beta_1=0.8,
    beta_2=0.99,
    epsilon=1e-6,
    amsgrad=True,
    weight_decay=0.004,
    clipnorm=None,
    clipvalue=None,
    global_clipnorm=2.5,
    use_ema=True,
    ema_momentum=0.95,
    ema_overwrite_frequency=5,
    loss_scale_factor=64.0,
    gradient_accumulation_steps=3,
    name="my_adam",
)


def test_config_round_trips_every_argument():
    optimizer = keras_adam.Adam(**EVERY_ARGUMENT)
    config = optimizer.get_config()
    for key, value in EVERY_ARGUMENT.items():
        # The learning rate lives in a float32 variable, as in Keras.
        expected = pytest.approx(value, rel=1e-7) if isinstance(value, float) else value
        assert config[key] == expected, key
    clone = keras_adam.Adam.from_config(config)
    assert clone.get_config() == config


def test_config_round_trips_a_schedule():
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=100, alpha=0.1)
    clone = keras_adam.Adam.from_config(keras_adam.Adam(learning_rate=schedule).get_config())
    assert isinstance(clone._learning_rate, keras.optimizers.schedules.CosineDecay)
    assert clone._learning_rate.get_config() == schedule.get_config()


def test_serialize_uses_the_registered_name():
    config = keras.optimizers.serialize(keras_adam.Adam(beta_1=0.5))
    assert config["registered_name"] == "keras_adam>Adam"
    restored = keras.optimizers.deserialize(config)
    assert type(restored) is keras_adam.Adam
    assert restored.beta_1 == 0.5


def test_unknown_config_key_is_refused():
    config = keras_adam.Adam().get_config()
    config["beta_3"] = 0.5
    with pytest.raises(ValueError, match="beta_3"):
        keras_adam.Adam.from_config(config)


@settings(max_examples=40, deadline=None)
@given(
    learning_rate=st.floats(1e-6, 1.0),
    beta_1=st.floats(0.0, 0.999),
    beta_2=st.floats(0.0, 0.9999),
    epsilon=st.floats(0.0, 1e-2),
    amsgrad=st.booleans(),
    weight_decay=st.none() | st.floats(0.0, 0.1),
    clip=st.sampled_from(["clipnorm", "clipvalue", "global_clipnorm", None]),
    use_ema=st.booleans(),
    accumulation=st.none() | st.integers(2, 8),
)
def test_any_valid_config_round_trips(
    learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay, clip, use_ema, accumulation
):
    kwargs = dict(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        amsgrad=amsgrad,
        weight_decay=weight_decay,
        use_ema=use_ema,
        gradient_accumulation_steps=accumulation,
    )
    if clip:
        kwargs[clip] = 1.0
    config = keras_adam.Adam(**kwargs).get_config()
    assert keras_adam.Adam.from_config(dict(config)).get_config() == config


def compiled(jit_compile):
    model = mlp()
    model.compile(
        optimizer=keras_adam.Adam(learning_rate=0.005, amsgrad=True, weight_decay=0.01),
        loss=LOSS,
        jit_compile=jit_compile,
    )
    return model


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_saved_model_loads_and_resumes_exactly(tmp_path, jit_compile):
    """fit 2 epochs, save, load (no custom_objects), fit 2 more == fit 4."""
    (x, y), _ = split()
    x, y = x[:512], y[:512]
    uninterrupted = compiled(jit_compile)
    uninterrupted.fit(x, y, epochs=4, batch_size=64, shuffle=False, verbose=0)

    first_half = compiled(jit_compile)
    first_half.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0)
    first_half.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    assert type(resumed.optimizer) is keras_adam.Adam
    assert resumed.optimizer.get_config() == first_half.optimizer.get_config()
    assert int(resumed.optimizer.iterations.numpy()) == 16
    resumed.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0)

    for a, b in zip(uninterrupted.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(uninterrupted.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
