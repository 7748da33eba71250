"""Quantized moments on JAX: the XLA custom call, and `keras.distribution` (two CPU devices)."""

import jax
import keras
import numpy as np
import pytest

import keras_adam
from keras_adam.kernels import quantized_xla
from tests.helpers.numpy_quantization import (
    assert_same_but_for_flipped_codes,
    assert_same_state_but_for_flipped_codes,
    fit_classifier,
    stored_state,
)
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
    stored = sharded.optimizer._momentums[0].variable
    assert stored.value.sharding.is_fully_replicated
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    assert_same_but_for_flipped_codes(sharded.get_weights(), single.get_weights(), 0.01)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The variables each step hands to the custom call."""
    assert quantized_xla.available(), quantized_xla._state.get("error")
    calls = []
    step = quantized_xla.step

    def counting(params, *args, **kwargs):
        calls.append(tuple(tuple(param.shape) for param in params))
        return step(params, *args, **kwargs)

    monkeypatch.setattr(quantized_xla, "step", counting)
    return calls


OPTIONS = {
    "plain": {},
    "amsgrad_adamw": {"amsgrad": True, "weight_decay": 0.1},
    "l2_maximize": {"weight_decay": 0.01, "decoupled_weight_decay": False, "maximize": True},
    "paper": {"epsilon_mode": "paper"},
}
SHAPES = [(97, 61), (33, 129), (40,)]


def values_and_grads(steps=5):
    rng = np.random.default_rng(1)
    values = [rng.normal(size=shape).astype("float32") for shape in SHAPES]
    grads = [
        [np.sin(v * (t + 1)).astype("float32") * 10.0 ** (t - 3) for v in values]
        for t in range(steps)
    ]
    return values, grads


def run_apply(moment_dtype, options, **fused):
    values, grads = values_and_grads()
    variables = [keras.Variable(v) for v in values]
    optimizer = keras_adam.Adam(0.01, moment_dtype=moment_dtype, **options, **fused)
    for step_grads in grads:
        optimizer.apply(step_grads, variables)
    return [v.numpy() for v in variables], stored_state(optimizer)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_custom_call_gives_the_keras_ops_step(kernel_calls, moment_dtype, options):
    """Default path (the C++ kernel in XLA) against fused=False (keras.ops), from the same state."""
    weights, state = run_apply(moment_dtype, options)
    # Both large variables in one call; the first step op by op (it builds
    # the optimizer), then traced once into the compiled eager step.
    assert kernel_calls == [(SHAPES[0], SHAPES[1])] * 2
    reference_weights, reference_state = run_apply(moment_dtype, options, fused=False)
    assert len(kernel_calls) == 2
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)


def test_one_call_per_hyperparameters(kernel_calls):
    """A variable excluded from weight decay steps in a call of its own, with its own decay."""
    values, grads = values_and_grads(3)

    def run(**fused):
        variables = [keras.Variable(v, name=f"w{i}") for i, v in enumerate(values)]
        optimizer = keras_adam.Adam(0.01, moment_dtype="int8", weight_decay=0.5, **fused)
        optimizer.exclude_from_weight_decay(var_names=["w1"])
        for step_grads in grads:
            optimizer.apply(step_grads, variables)
        return [v.numpy() for v in variables], stored_state(optimizer)

    weights, state = run()
    assert sorted(kernel_calls[:2]) == sorted([(SHAPES[0],), (SHAPES[1],)])
    reference_weights, reference_state = run(fused=False)
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)
    # The decay reached w0 only: w1 alone would not tell a missing decay.
    undecayed = keras_adam.Adam(0.01, moment_dtype="int8")
    plain = [keras.Variable(v) for v in values]
    for step_grads in grads:
        undecayed.apply(step_grads, plain)
    assert np.abs(weights[0] - plain[0].numpy()).max() > 1e-3
    assert_same_but_for_flipped_codes(weights[1:2], [plain[1].numpy()], 1e-4)


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_jitted_stateless_apply_with_donated_state(kernel_calls, moment_dtype):
    """`jax.jit(stateless_apply)` with the state donated: the eager step's numbers, bit for bit."""
    values, grads = values_and_grads(3)
    variables = [keras.Variable(v) for v in values]
    optimizer = keras_adam.Adam(0.01, moment_dtype=moment_dtype, amsgrad=True)
    optimizer.build(variables)
    step = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
    state = [v.value for v in optimizer.variables]
    params = [v.value for v in variables]
    for step_grads in grads:
        params, state = step(state, [jax.numpy.asarray(g) for g in step_grads], params)
    assert kernel_calls == [(SHAPES[0], SHAPES[1])]  # traced once
    variables = [keras.Variable(v) for v in values]
    eager = keras_adam.Adam(0.01, moment_dtype=moment_dtype, amsgrad=True)
    for step_grads in grads:
        eager.apply(step_grads, variables)
    for actual, expected in zip(params, variables, strict=True):
        np.testing.assert_array_equal(np.asarray(actual), expected.numpy())
    for actual, expected in zip(state, eager.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected.numpy()))


def test_without_the_custom_call_the_keras_ops_step_runs(monkeypatch):
    monkeypatch.setattr(quantized_xla, "available", lambda: False)
    weights, state = run_apply("int8", {})
    reference_weights, reference_state = run_apply("int8", {}, fused=False)
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)


def test_many_variables_step_in_calls_of_a_bounded_size(monkeypatch):
    """40 variables: a call of 32 and one of 8 (XLA compiles a long call slowly), same numbers."""
    calls = []
    call = quantized_xla._call
    monkeypatch.setattr(
        quantized_xla, "_call", lambda params, *a: calls.append(len(params)) or call(params, *a)
    )
    rng = np.random.default_rng(2)
    values = [rng.normal(size=(64, 64)).astype("float32") for _ in range(40)]
    grads = [[rng.normal(size=(64, 64)).astype("float32") for _ in values] for _ in range(3)]

    def run(**fused):
        variables = [keras.Variable(v) for v in values]
        optimizer = keras_adam.Adam(0.01, moment_dtype="int8", **fused)
        for step_grads in grads:
            optimizer.apply(step_grads, variables)
        return [v.numpy() for v in variables], stored_state(optimizer)

    weights, state = run()
    assert quantized_xla.VARIABLES_PER_CALL == 32
    assert calls[:2] == [32, 8]
    reference_weights, reference_state = run(fused=False)
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)
