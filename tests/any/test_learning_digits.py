"""keras_adam.Adam trains a real model: digits, held-out accuracy >= 0.9."""

import pytest

import keras_adam
from tests.helpers.digits import LOSS, mlp, split
from tests.helpers.neutral import JIT_COMPILE


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_fit_on_digits_reaches_90_percent_held_out(jit_compile):
    (x_train, y_train), (x_test, y_test) = split()
    model = mlp()
    model.compile(
        optimizer=keras_adam.Adam(learning_rate=3e-3),
        loss=LOSS,
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    _, before = model.evaluate(x_test, y_test, verbose=0)
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert before < 0.3
    assert accuracy >= 0.9
