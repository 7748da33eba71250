"""Quantized moments under `keras.distribution` (two virtual CPU devices)."""

import jax
import numpy as np
import pytest

from tests.helpers.numpy_quantization import assert_same_but_for_flipped_codes, fit_classifier
from tests.jax.test_distribution import distribution  # noqa: F401 (a fixture)


def fit(jit_compile, moment_dtype):
    return fit_classifier(jit_compile, moment_dtype=moment_dtype, skip_nonfinite=True)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize("jit_compile", [True, False])
def test_data_parallel_gives_the_single_device_result(distribution, jit_compile, moment_dtype):  # noqa: F811
    from keras import distribution as kd

    single, single_loss = fit(jit_compile, moment_dtype)
    distribution(kd.DataParallel(devices=kd.list_devices()))
    parallel, parallel_loss = fit(jit_compile, moment_dtype)
    np.testing.assert_allclose(parallel_loss, single_loss, rtol=1e-5)
    assert_same_but_for_flipped_codes(parallel.get_weights(), single.get_weights(), 0.01)
    assert single_loss[-1] < single_loss[0]


def test_model_parallel_trains_with_replicated_codes(distribution):  # noqa: F811
    from keras import distribution as kd

    single, single_loss = fit(True, "int8")
    mesh = kd.DeviceMesh((2,), ["model"], kd.list_devices())
    layout_map = kd.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    distribution(kd.ModelParallel(layout_map=layout_map, batch_dim_name=None))
    sharded, sharded_loss = fit(True, "int8")
    kernel = sharded.layers[0].kernel
    assert kernel.value.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    codes = sharded.optimizer._momentums[0].codes
    assert codes.value.sharding.is_fully_replicated
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    assert_same_but_for_flipped_codes(sharded.get_weights(), single.get_weights(), 0.01)
