"""Every Keras option on every JAX path: bit-identical to keras.optimizers.Adam
(on the `keras.ops` path and under `jax.jit`), round-off from it eagerly."""

from __future__ import annotations

import pytest

import keras_adam
from tests.helpers.jax_engine import (
    KERAS_OPTIONS,
    ROUND_OFF,
    SLOW_EAGERLY,
    _options,
    assert_identical,
    deviation,
    keras_run,
    run,
)

# On the keras.ops path (fused=False eagerly, anything under jax.jit) the
# trajectory is Keras's own, bit for bit. The eager compiled step is the
# program jax.jit makes of Keras's own step: bit-identical to Keras under
# jax.jit, and round-off from Keras eagerly.
PATHS = {
    ("eager", False): "eager",
    ("jit", None): "jit",
    ("jit", False): "jit",
    ("eager", None): "jit",
}


@pytest.mark.parametrize(
    "name, path, fused",
    [
        (name, path, fused)
        for name in KERAS_OPTIONS
        for path, fused in PATHS
        if not (name in SLOW_EAGERLY and (path, fused) == ("eager", False))
    ],
)
def test_keras_options_match_keras_adam(name, path, fused):
    options = _options(name)
    scale = options.get("loss_scale_factor") or 1.0
    ours = run(lambda: keras_adam.Adam(fused=fused, **options), path, scale=scale)
    assert_identical(ours, keras_run(name, PATHS[path, fused]))
    if (path, fused) == ("eager", None) and name not in SLOW_EAGERLY:
        # And round-off from Keras's eager steps.
        assert deviation(ours, keras_run(name, "eager")) <= ROUND_OFF


def test_moment_dtype_of_the_variable_is_keras_adam():
    ours = run(lambda: keras_adam.Adam(learning_rate=0.01, moment_dtype="float32"), "jit")
    assert_identical(ours, keras_run("plain", "jit"))
