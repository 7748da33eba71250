"""keras_adam.Adam follows keras.optimizers.Adam step for step.

Every base option, in eager mode, in tf.function and under XLA, in float32
and float64. float64 runs use exact binary-fraction hyperparameters (Keras
rounds β through float32, which would otherwise differ by design).
"""

import keras
import numpy as np
import pytest
from support import BINARY, DTYPES, MODES, relative_deviation, trajectory

import keras_adam

OPTIONS = {
    "plain": {},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.ExponentialDecay(
            2.0**-5, decay_steps=8, decay_rate=0.5
        )
    },
    "clipnorm": {"clipnorm": 0.25},
    "clipvalue": {"clipvalue": 0.03125},
    "global_clipnorm": {"global_clipnorm": 0.25},
    "ema": {"use_ema": True, "ema_momentum": 0.75, "ema_overwrite_frequency": 7},
    "gradient_accumulation": {"gradient_accumulation_steps": 3},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.25},
    "loss_scale_factor": {"loss_scale_factor": 128.0},
}

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def pair(options):
    kwargs = {**BINARY, **options}
    return keras_adam.Adam(**kwargs), keras.optimizers.Adam(**kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_same_trajectory_as_keras(option, mode, dtype):
    ours, theirs = pair(OPTIONS[option])
    our_history, our_final, our_state = trajectory(ours, dtype, mode)
    their_history, their_final, their_state = trajectory(theirs, dtype, mode)

    # The weights moved: a test that compares two frozen runs proves nothing.
    assert relative_deviation(their_history[-1], their_history[0]) > 1e-2
    assert relative_deviation(our_history, their_history) <= TOLERANCE[dtype]
    assert relative_deviation(our_final, their_final) <= TOLERANCE[dtype]
    assert len(our_state) == len(their_state)
    for ours_var, theirs_var in zip(our_state, their_state, strict=True):
        np.testing.assert_allclose(
            ours_var, theirs_var, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 1e-3
        )


@pytest.mark.parametrize("mode", MODES)
def test_default_hyperparameters_float32(mode):
    """Keras's defaults (not binary fractions) in float32: 1e-5 after 40 steps."""
    ours, theirs = keras_adam.Adam(), keras.optimizers.Adam()
    our_history, _, _ = trajectory(ours, "float32", mode)
    their_history, _, _ = trajectory(theirs, "float32", mode)
    assert relative_deviation(their_history[-1], their_history[0]) > 1e-3
    assert relative_deviation(our_history, their_history) <= 1e-5
