"""`skip_nonfinite` on JAX, eagerly and under `jax.jit`: a skipped step is the
same run with that step left out, bit for bit; one verdict for the whole step."""

from __future__ import annotations

import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.jax_engine import (
    ROUND_OFF,
    SHAPES,
    STEPS,
    _initial,
    _state,
    assert_identical,
    deviation,
    run,
)

# -- skip_nonfinite ---------------------------------------------------------------

SKIP_OPTIONS = {
    "plain": {},
    "ema_accumulation_amsgrad_clip": {
        "amsgrad": True,
        "use_ema": True,
        "ema_overwrite_frequency": 3,
        "gradient_accumulation_steps": 2,
        "global_clipnorm": 1.0,
    },
}
BAD = {2: float("nan"), 5: float("inf"), 6: float("-inf")}


@pytest.mark.parametrize(
    "options, path, fused",
    [
        ("plain", "eager", None),
        ("plain", "eager", False),
        ("plain", "jit", None),
        # With Keras's eager accumulation (see SLOW_EAGERLY), compiled paths only.
        ("ema_accumulation_amsgrad_clip", "eager", None),
        ("ema_accumulation_amsgrad_clip", "jit", None),
    ],
)
def test_a_skipped_step_is_a_step_left_out(options, path, fused):
    """Bit-identical to the run without the bad steps: nothing at all was written."""

    def make(skip=True):
        return keras_adam.Adam(
            learning_rate=0.01, skip_nonfinite=skip, fused=fused, **SKIP_OPTIONS[options]
        )

    data = list(range(STEPS))
    with_bad = run(make, path, data=data, poison=BAD)
    good = [index for i, index in enumerate(data) if i not in BAD]
    without = run(make, path, data=good)
    assert_identical(with_bad.without("steps"), without.without("steps"))
    counter = with_bad.optimizer[f"{len(with_bad.optimizer) - 1}:steps"]
    assert counter.dtype == np.int32 and int(counter) == len(BAD)
    iterations = with_bad.optimizer["0:iteration"]
    assert int(iterations) == len(good)
    assert all(np.isfinite(w).all() for w in with_bad.weights)
    # Keras's own steps on the good data: bit for bit on the keras.ops path,
    # where the select is an operation of its own; compiled, the select can
    # change how XLA fuses (and rounds) the rest, e.g. with use_ema and
    # gradient accumulation together.
    keras_path = "eager" if (path, fused) == ("eager", False) else "jit"
    options = dict(learning_rate=0.01, **SKIP_OPTIONS[options])
    reference = run(lambda: keras.optimizers.Adam(**options), keras_path, data=good)
    if keras_path == "eager":
        assert_identical(with_bad.without("steps"), reference)
    else:
        assert deviation(with_bad.without("steps"), reference) <= ROUND_OFF


def test_one_verdict_for_the_whole_step():
    """A NaN in one variable's gradient leaves every variable untouched."""
    variables = [keras.Variable(x, dtype="float32") for x in _initial()]
    optimizer = keras_adam.Adam(skip_nonfinite=True)
    grads = [jnp.ones(shape) for shape in SHAPES]
    optimizer.apply(grads, variables)
    before = _state(variables, optimizer)
    grads[2] = grads[2].at[1].set(jnp.nan)
    optimizer.apply(grads, variables)
    after = _state(variables, optimizer)
    assert_identical(after.without("steps"), before.without("steps"))
    assert int(optimizer.skipped_steps.value) == 1
