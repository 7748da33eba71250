"""`model.fit` on JAX, with `jit_compile` True and False: Keras's options, our
flags, and a skipped batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.jax_engine import (
    ROUND_OFF,
    State,
    _data,
    assert_identical,
    deviation,
    fit,
)

FIT_OPTIONS = {
    "learning_rate": keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    ),
    "amsgrad": True,
    "weight_decay": 0.05,
    "global_clipnorm": 1.0,
    "loss_scale_factor": 8.0,
    "use_ema": True,
    "ema_overwrite_frequency": 2,
    "gradient_accumulation_steps": 2,
}


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_with_every_keras_option_matches_keras_adam(jit_compile):
    expected = fit(lambda: keras.optimizers.Adam(**FIT_OPTIONS), jit_compile)
    default = fit(lambda: keras_adam.Adam(**FIT_OPTIONS), jit_compile)
    if jit_compile:
        assert_identical(default, expected)
    else:
        assert deviation(default, expected) <= ROUND_OFF  # one compiled program per step


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_with_our_flags(jit_compile):
    options = {
        "learning_rate": 0.05,
        "maximize": True,
        "weight_decay": 0.05,
        "decoupled_weight_decay": False,
        "epsilon_mode": "paper",
        "rectify": True,
        "moment_dtype": "bfloat16",
    }
    plain = fit(lambda: keras_adam.Adam(learning_rate=0.05), jit_compile, epochs=2)
    compiled = fit(lambda: keras_adam.Adam(**options), jit_compile, epochs=2)
    reference = fit(lambda: keras_adam.Adam(fused=False, **options), False, epochs=2)
    assert deviation(compiled, reference) <= 1e-5
    assert deviation(State(compiled.weights, {}), State(plain.weights, {})) > 1e-3


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_skips_the_bad_batch(jit_compile):
    def make():
        return keras_adam.Adam(
            learning_rate=0.05, skip_nonfinite=True, use_ema=True, gradient_accumulation_steps=2
        )

    with_bad = fit(make, jit_compile, data=_data(bad_batch=2))
    without = fit(make, jit_compile, data=_data(drop=2))
    assert_identical(with_bad.without("steps"), without.without("steps"))
    counter = with_bad.optimizer[f"{len(with_bad.optimizer) - 1}:steps"]
    assert counter.dtype == np.int32 and int(counter) == 1


#: Keras's options with which our step is Keras's program; with weight decay
#: (applied variable by variable, not all first), AMSGrad and gradient
#: accumulation the program differs and the numbers do not
#: (`test_fit_with_every_keras_option_matches_keras_adam`).
SAME_PROGRAM_OPTIONS = {
    key: FIT_OPTIONS[key]
    for key in ("learning_rate", "global_clipnorm", "loss_scale_factor", "use_ema")
}


@pytest.mark.parametrize(
    "options", [{}, SAME_PROGRAM_OPTIONS], ids=["default", "schedule, clipping, scaling, EMA"]
)
def test_compiled_train_step_is_keras_adams_program(options):
    """Under `jax.jit`, `model.fit`'s train step is Keras's, equation for equation.

    The jaxprs of a convnet's whole `train_step` (forward, gradients,
    optimizer) print the same with either optimizer, so a `fit` time that
    differs between them is the machine's noise, not ours.
    """

    def train_step_jaxpr(make_optimizer):
        import jax

        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((12, 12, 1)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )
        model.compile(optimizer=make_optimizer(), loss="mse")
        x = np.random.default_rng(0).normal(size=(8, 12, 12, 1)).astype("float32")
        y = np.zeros((8, 3), "float32")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds the optimizer
        state = tuple(
            [v.value for v in variables]
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                model.optimizer.variables,
                model.metrics_variables,
            )
        )
        return str(jax.make_jaxpr(model.train_step)(state, (x, y)))

    ours = train_step_jaxpr(lambda: keras_adam.Adam(**options))
    assert ours == train_step_jaxpr(lambda: keras.optimizers.Adam(**options))
    assert ours != train_step_jaxpr(lambda: keras_adam.Adam(**options, epsilon_mode="paper"))
