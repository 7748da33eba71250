"""`keras.distribution` on two virtual CPU devices (tests/conftest.py):
data parallel equals one device; model-parallel moments are sharded as their variable."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import pytest

import keras_adam
from tests.helpers.jax_engine import (
    BATCH,
    _data,
    _state,
    deviation,
    fit,
)

# -- keras.distribution on two virtual CPU devices ---------------------------------


@pytest.fixture
def distribution():
    """Sets a `keras.distribution` for the test; unsets it after."""
    from keras import distribution as kd

    assert len(jax.devices()) == 2, "conftest.py sets two virtual CPU devices"
    yield kd.set_distribution
    kd.set_distribution(None)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_data_parallel_gives_the_single_device_result(distribution, jit_compile):
    from keras import distribution as kd

    def make():
        return keras_adam.Adam(learning_rate=0.05, skip_nonfinite=True, amsgrad=True)

    data = _data(bad_batch=4)
    single = fit(make, jit_compile, data=data, epochs=2)
    distribution(kd.DataParallel(devices=kd.list_devices()))
    parallel = fit(make, jit_compile, data=data, epochs=2)
    assert deviation(parallel, single) <= 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "moment_dtype": "bfloat16",
            "amsgrad": True,
            "use_ema": True,
            "gradient_accumulation_steps": 2,
        },
    ],
)
def test_model_parallel_moments_are_sharded_as_their_variable(distribution, options):
    """Every slot of a sharded kernel is sharded as it, and the result is the single device's."""
    from keras import distribution as kd

    def make():
        return keras_adam.Adam(learning_rate=0.05, skip_nonfinite=True, **options)

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, activation="tanh", name="sharded"),
                keras.layers.Dense(2, name="head"),
            ]
        )

    x, y = _data(bad_batch=3)
    single = model()
    single.compile(optimizer=make(), loss="mse")
    single.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    mesh = kd.DeviceMesh((2,), ["model"], kd.list_devices())
    layout_map = kd.LayoutMap(mesh)
    layout_map[".*sharded/kernel"] = (None, "model")
    distribution(kd.ModelParallel(layout_map=layout_map, batch_dim_name=None))
    sharded = model()
    optimizer = make()
    sharded.compile(optimizer=optimizer, loss="mse")
    kernel = sharded.layers[0].kernel

    def check():
        sharding = kernel.value.sharding
        assert sharding.spec == jax.sharding.PartitionSpec(None, "model")
        slots = [v for v in optimizer.variables if "sharded_kernel" in v.path]
        extra = optimizer.amsgrad + optimizer.use_ema + bool(optimizer.gradient_accumulation_steps)
        assert len(slots) == 2 + extra
        for slot in slots:
            assert slot.value.sharding.is_equivalent_to(sharding, 2), slot.path
            if slot.path.endswith(("momentum", "velocity", "velocity_hat")):
                expected = options.get("moment_dtype") or "float32"
                assert keras.backend.standardize_dtype(slot.dtype) == expected

    sharded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    check()
    assert (
        deviation(
            _state(sharded.trainable_variables, optimizer),
            _state(single.trainable_variables, single.optimizer),
        )
        <= 1e-6
    )
    grads = [jnp.ones(v.shape) for v in sharded.trainable_variables]
    optimizer.apply(grads, sharded.trainable_variables)  # the eager compiled step
    check()
