"""Quantized moments on torch: `model.fit` under torch.compile equals eager."""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.numpy_quantization import (
    assert_same_but_for_flipped_codes,
    assert_same_state_but_for_flipped_codes,
    fit_classifier,
    stored_state,
)


def fit(jit_compile, moment_dtype):
    return fit_classifier(
        jit_compile, epochs=2, samples=96, moment_dtype=moment_dtype, amsgrad=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
def test_fit_under_torch_compile_matches_eager(moment_dtype):
    eager, eager_loss = fit(False, moment_dtype)
    compiled, compiled_loss = fit(True, moment_dtype)
    assert compiled.jit_compile
    np.testing.assert_allclose(compiled_loss, eager_loss, rtol=1e-5)
    assert_same_but_for_flipped_codes(compiled.get_weights(), eager.get_weights(), 0.01)
    assert eager_loss[-1] < eager_loss[0]


@pytest.fixture
def kernel_steps(monkeypatch):
    """The variable counts of the quantized kernel's calls."""
    from keras_adam.kernels import quantized

    calls = []
    kernel = quantized.load()
    assert kernel is not None, quantized._state.get("error")
    step = type(kernel).step

    def counting(self, tensors, sizes, *args, **kwargs):
        calls.append(len(sizes))
        return step(self, tensors, sizes, *args, **kwargs)

    monkeypatch.setattr(type(kernel), "step", counting)
    return calls


@pytest.mark.parametrize("moment_dtype", ["int8", "int4"])
@pytest.mark.parametrize(
    "options",
    [{}, {"amsgrad": True, "weight_decay": 0.1}, {"epsilon_mode": "paper", "maximize": True}],
    ids=["plain", "amsgrad_adamw", "paper_maximize"],
)
def test_the_kernel_gives_the_keras_ops_step(kernel_steps, moment_dtype, options):
    """Default path (the C++ kernel) against fused=False (keras.ops), from the same state."""
    rng = np.random.default_rng(1)
    values = [rng.normal(size=shape).astype("float32") for shape in [(97, 61), (33, 129), (40,)]]

    def run(**fused):
        variables = [keras.Variable(v) for v in values]
        optimizer = keras_adam.Adam(0.01, moment_dtype=moment_dtype, **options, **fused)
        for t in range(5):
            grads = [np.sin(v * (t + 1)).astype("float32") * 10.0 ** (t - 3) for v in values]
            optimizer.apply(grads, variables)
        return [v.numpy() for v in variables], stored_state(optimizer)

    weights, state = run()
    assert kernel_steps == [2] * 5  # both large variables in one call per step
    reference_weights, reference_state = run(fused=False)
    assert kernel_steps == [2] * 5
    assert_same_but_for_flipped_codes(weights, reference_weights, 1e-4)
    assert_same_state_but_for_flipped_codes(state, reference_state)


def test_without_the_kernel_the_keras_ops_step_runs(monkeypatch):
    """No compiler (or KERAS_ADAM_KERNEL=0): the same numbers from the reference path."""
    from keras_adam.kernels import quantized

    values = np.random.default_rng(2).normal(size=(70, 90)).astype("float32")

    def run():
        variable = keras.Variable(values)
        optimizer = keras_adam.Adam(0.01, moment_dtype="int8")
        for t in range(3):
            optimizer.apply([keras.ops.convert_to_tensor(np.cos(values * t))], [variable])
        return variable.numpy()

    with_kernel = run()
    monkeypatch.setenv("KERAS_ADAM_KERNEL", "0")
    assert quantized.load() is None
    assert_same_but_for_flipped_codes([run()], [with_kernel], 1e-4)


@pytest.mark.parametrize("moment_dtype", [None, "int8"])
def test_numpy_gradients_take_the_kernels(moment_dtype):
    """`apply` with NumPy gradients (keras.optimizers.Adam raises a TypeError here)."""
    values = np.random.default_rng(3).normal(size=(70, 90)).astype("float32")
    gradient = np.cos(values)

    def run(grad):
        variable = keras.Variable(values)
        keras_adam.Adam(0.01, moment_dtype=moment_dtype).apply([grad], [variable])
        return variable.numpy()

    np.testing.assert_array_equal(run(gradient), run(keras.ops.convert_to_tensor(gradient)))
