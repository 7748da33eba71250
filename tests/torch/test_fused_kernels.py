"""torch's fused Adam kernels: the fused path against the `keras.ops` path, and
dispatch: which variables the kernels take (by wrapping `torch._fused_adam_`
and `torch._fused_adamw_`), fallbacks, and `fused=True`'s errors."""

import math
import threading

import keras
import numpy as np
import pytest
import torch

import keras_adam
from keras_adam.backends import torch as torch_backend
from tests.helpers.torch_engine import (
    BETAS,
    BINARY,
    EPS,
    INITIAL,
    LR,
    STEPS,
    WD,
    N,
    keras_run,
    relative_deviation,
)

# -- the fused path against the keras.ops path -----------------------------------

FLAG_COMBINATIONS = [
    dict(epsilon_mode=mode, amsgrad=amsgrad, maximize=maximize, **decay)
    for mode in ("hat", "paper")
    for amsgrad in (False, True)
    for maximize in (False, True)
    for decay in (
        {},
        dict(weight_decay=WD),
        dict(weight_decay=WD, decoupled_weight_decay=False),
        dict(weight_decay=WD, exclude_from_weight_decay=["bias"]),
        dict(weight_decay=WD, decoupled_weight_decay=False, exclude_from_weight_decay=["bias"]),
    )
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "options", FLAG_COMBINATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_fused_matches_keras_ops_path(options, dtype, kernel_calls):
    reference, reference_state, _ = keras_run(
        keras_adam.Adam(**BINARY, **options, fused=False), dtype
    )
    assert not kernel_calls
    fused, fused_state, _ = keras_run(keras_adam.Adam(**BINARY, **options), dtype)
    assert len(kernel_calls) >= STEPS
    bound = 1e-12 if dtype == "float64" else 1e-6
    assert relative_deviation(fused, reference) <= bound
    for mine, theirs in zip(fused_state, reference_state, strict=True):
        assert relative_deviation(mine, theirs) <= 100 * bound


# -- dispatch ---------------------------------------------------------------------


def test_default_step_is_one_kernel_call(kernel_calls):
    keras_run(keras_adam.Adam(**BINARY), steps=3)
    assert [c["kernel"] for c in kernel_calls] == ["_fused_adam_"] * 3
    assert [c["count"] for c in kernel_calls] == [2] * 3
    assert [c["step"] for c in kernel_calls] == [1.0, 2.0, 3.0]  # iterations + 1
    assert all(c["weight_decay"] == 0 and not c["amsgrad"] for c in kernel_calls)
    # The kernels step by Keras's α, computed in float32 (`update_rule.torch_kernel_scalars`):
    # with β exact in float32, that is the learning rate to float32 round-off.
    assert all(abs(c["lr"] - LR) <= 4 * 2**-24 * LR for c in kernel_calls)


@pytest.mark.parametrize("options", [{}, dict(fused=False), dict(rectify=True)])
def test_no_autograd_graph_outside_no_grad(options):
    """`apply` called outside `torch.no_grad()` (fit calls it inside) builds no graph."""
    _, _, variables = keras_run(keras_adam.Adam(**options), steps=2)
    for variable in variables:
        assert variable.value.requires_grad and variable.value.grad_fn is None
        assert variable.value.is_leaf


def test_hat_epsilon_is_passed_as_the_paper_epsilon_of_the_step(kernel_calls):
    keras_run(keras_adam.Adam(**BINARY), steps=4)
    for t, call in enumerate(kernel_calls, start=1):
        assert call["eps"] == EPS / math.sqrt(1 - BETAS[1] ** t)
    kernel_calls.clear()
    keras_run(keras_adam.Adam(**BINARY, epsilon_mode="paper"), steps=2)
    assert [c["eps"] for c in kernel_calls] == [EPS, EPS]


def test_options_reach_the_kernel(kernel_calls):
    keras_run(keras_adam.Adam(**BINARY, amsgrad=True, maximize=True, weight_decay=WD), steps=1)
    (call,) = kernel_calls
    assert call["kernel"] == "_fused_adamw_" and call["weight_decay"] == WD
    assert call["amsgrad"] and call["maximize"] and call["count"] == 2
    assert (call["beta1"], call["beta2"]) == BETAS
    kernel_calls.clear()
    keras_run(keras_adam.Adam(weight_decay=WD, decoupled_weight_decay=False), steps=1)
    assert [(c["kernel"], c["weight_decay"]) for c in kernel_calls] == [("_fused_adam_", WD)]


@pytest.mark.parametrize("decoupled", [True, False])
def test_excluded_variables_form_their_own_group(decoupled, kernel_calls):
    optimizer = keras_adam.Adam(
        weight_decay=WD, decoupled_weight_decay=decoupled, exclude_from_weight_decay=["bias"]
    )
    keras_run(optimizer, steps=2)
    decayed = "_fused_adamw_" if decoupled else "_fused_adam_"
    per_step = sorted((c["kernel"], c["weight_decay"], c["shapes"][0]) for c in kernel_calls[:2])
    assert per_step == sorted([(decayed, WD, (N,)), ("_fused_adam_", 0.0, (3, 4))])


def test_small_cpu_variables_are_updated_on_one_thread(kernel_calls):
    """torch's CPU kernel opens an OpenMP region per tensor: not worth it for small ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        variables = [
            keras.Variable(np.zeros(torch_backend.SMALL), name="large"),
            keras.Variable(np.zeros(torch_backend.SMALL - 1), name="small"),
            keras.Variable(np.zeros((3, 4)), name="tiny"),
        ]
        optimizer = keras_adam.Adam()
        optimizer.build(variables)
        grads = [torch.linspace(-1.0, 1.0, math.prod(v.shape)).reshape(v.shape) for v in variables]
        optimizer.apply(grads, variables)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    calls = sorted((c["count"], c["threads"]) for c in kernel_calls)
    assert calls == [(1, 2), (2, 1)]


def test_a_large_group_of_small_variables_is_one_call_on_the_calling_thread(kernel_calls):
    """However many small variables: one one-thread call, on the thread that steps.

    No helper threads (`SMALL` says why), and the numbers are
    those of the same step on one torch thread.
    """
    sizes = [torch_backend.SMALL - 1 - k for k in range(12)]
    rng = np.random.default_rng(5)
    grads = [[torch.tensor(rng.normal(size=n).astype("float32")) for n in sizes] for _ in range(3)]

    def train(threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            variables = [keras.Variable(np.linspace(-1, 1, n, dtype="float32")) for n in sizes]
            optimizer = keras_adam.Adam(amsgrad=True)
            optimizer.build(variables)
            for step in grads:
                optimizer.apply(step, variables)
            assert torch.get_num_threads() == threads  # restored
            return [v.numpy() for v in variables + optimizer.variables[2:]]
        finally:
            torch.set_num_threads(previous)

    one = train(1)
    kernel_calls.clear()
    two = train(2)
    assert [(c["count"], c["threads"]) for c in kernel_calls] == [(len(sizes), 1)] * 3
    assert {c["thread"] for c in kernel_calls} == {threading.get_ident()}
    assert len(one) == len(two) == 4 * len(sizes)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_thread_is_this_threads_setting_only():
    """Small groups run on one thread without changing other threads' count.

    Not even a thread's that starts its first torch op meanwhile:
    `torch.set_num_threads(1)` would give it one thread for good.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = {}

    def count(name):
        seen[name] = torch.get_num_threads()

    try:
        assert torch_backend._thread_count_setter() is not torch.set_num_threads
        with torch_backend._one_thread():
            assert torch.get_num_threads() == 1
            started = threading.Thread(target=count, args=("started inside",))
            started.start()
            started.join()
        count("after")
    finally:
        torch.set_num_threads(threads)
    assert seen == {"started inside": 2, "after": 2}


def test_dtypes_form_groups(kernel_calls):
    keras_run(keras_adam.Adam(), steps=1, dtypes=["float32", "float64"])
    assert sorted(str(c["dtype"]) for c in kernel_calls) == ["torch.float32", "torch.float64"]


@pytest.mark.parametrize(
    "options",
    [dict(fused=False), dict(rectify=True), dict(rectify=True, weight_decay=WD)],
    ids=["fused=False", "rectify", "rectify+decay"],
)
def test_no_kernel_where_options_rule_it_out(options, kernel_calls):
    history, _, _ = keras_run(keras_adam.Adam(**options), steps=3)
    assert not kernel_calls
    assert relative_deviation(history[-1], history[0]) > 0  # trained


@pytest.mark.parametrize("half", ["bfloat16", "float16"])
@pytest.mark.parametrize("moment_dtype", [None, "float32"])
def test_half_precision_weights_fall_back_and_train(half, moment_dtype, kernel_calls):
    options = dict(learning_rate=1e-2, moment_dtype=moment_dtype)
    history, _, variables = keras_run(
        keras_adam.Adam(**options), steps=20, dtypes=[half, "float32"]
    )
    # Only the float32 variable is fused (with float32 moments of a float32
    # variable, moment_dtype="float32" keeps it fused).
    assert [c["shapes"] for c in kernel_calls] == [[(3, 4)]] * 20
    kernel_calls.clear()
    reference, _, _ = keras_run(
        keras_adam.Adam(**options, fused=False), steps=20, dtypes=[half, "float32"]
    )
    # The half-precision variable took the keras.ops path: exactly as fused=False.
    np.testing.assert_array_equal(history[:, :N], reference[:, :N])
    assert np.max(np.abs(history[-1, :N] - INITIAL["kernel"])) > 0.05  # it trained
    assert keras.backend.standardize_dtype(variables[0].dtype) == half


def test_non_contiguous_variable_falls_back(kernel_calls):
    """The kernels read raw pointers: a variable made from a transposed array is not fused."""
    variables = [
        keras.Variable(INITIAL["bias"].T, dtype="float32"),
        keras.Variable(np.ascontiguousarray(INITIAL["bias"].T), dtype="float32"),
    ]
    assert not variables[0].value.is_contiguous()
    optimizer = keras_adam.Adam()
    optimizer.build(variables)
    for t in range(1, 4):
        g = torch.cos(torch.arange(12.0).reshape(4, 3) * t)
        optimizer.apply([g, g], variables)
    assert [c["shapes"] for c in kernel_calls] == [[(4, 3)]] * 3
    np.testing.assert_allclose(variables[0].numpy(), variables[1].numpy(), rtol=1e-6)


def test_moment_dtype_other_than_the_variables_falls_back(kernel_calls):
    keras_run(keras_adam.Adam(moment_dtype="float64"), steps=2)  # float32 weights
    assert not kernel_calls
    keras_run(keras_adam.Adam(moment_dtype="float64"), steps=2, dtype="float64")
    assert [c["count"] for c in kernel_calls] == [2, 2]


def test_fused_true_names_the_argument_and_the_reason():
    with pytest.raises(ValueError, match=r"`fused=True`.*rectify=True"):
        keras_adam.Adam(fused=True, rectify=True)
    optimizer = keras_adam.Adam(fused=True)
    variables = [keras.Variable(np.ones(3), dtype="bfloat16", name="half")]
    with pytest.raises(ValueError, match=r"`fused=True`.*'half'.*bfloat16"):
        optimizer.build(variables)
    optimizer = keras_adam.Adam(fused=True, moment_dtype="float32")
    with pytest.raises(ValueError, match=r"`fused=True`.*moment_dtype='float32'"):
        optimizer.build([keras.Variable(np.ones(3), dtype="float64")])


def test_fused_true_takes_every_option_the_kernels_express(kernel_calls):
    optimizer = keras_adam.Adam(
        fused=True, epsilon_mode="paper", amsgrad=True, maximize=True, weight_decay=WD
    )
    keras_run(optimizer, steps=2, dtype="float64")
    assert [c["count"] for c in kernel_calls] == [2, 2]


def test_missing_gradient_leaves_its_variable_alone(kernel_calls):
    variables = [keras.Variable(np.ones(5), dtype="float32"), keras.Variable(np.ones(3))]
    optimizer = keras_adam.Adam()
    optimizer.build(variables)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        optimizer.apply([torch.full((5,), 0.5), None], variables)
    assert [c["count"] for c in kernel_calls] == [1]
    np.testing.assert_array_equal(variables[1].numpy(), np.ones(3))
    assert np.all(variables[0].numpy() < 1)


def test_gradients_of_other_layouts_and_dtypes_are_converted(kernel_calls):
    """Non-contiguous and float64 gradients of float32 variables: as the contiguous float32 ones."""
    results = []
    for convert in (False, True):
        keras.backend.clear_session()
        variables = [keras.Variable(np.ascontiguousarray(INITIAL["bias"].T), dtype="float32")]
        optimizer = keras_adam.Adam()
        optimizer.build(variables)
        for t in range(1, 4):
            g = torch.sin(torch.arange(12.0).reshape(3, 4) * t)
            g = g.T if convert else g.T.contiguous()
            if convert:
                g = g.double().float().double()  # float64, not contiguous
                assert not g.is_contiguous()
            optimizer.apply([g], variables)
        results.append(variables[0].numpy())
    np.testing.assert_array_equal(results[0], results[1])
    assert len(kernel_calls) == 6


def test_stateless_apply_takes_the_keras_ops_path(kernel_calls):
    """In a `StatelessScope` nothing may be written in place: the keras.ops path runs."""
    variables = [keras.Variable(INITIAL["kernel"], dtype="float32")]
    optimizer = keras_adam.Adam()
    optimizer.build(variables)
    grads = [torch.linspace(-1.0, 1.0, N)]
    new_weights, _ = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in variables]
    )
    assert not kernel_calls
    np.testing.assert_array_equal(variables[0].numpy(), INITIAL["kernel"].astype("float32"))
    copies = [keras.Variable(INITIAL["kernel"], dtype="float32")]
    stateful = keras_adam.Adam()
    stateful.build(copies)
    stateful.apply(grads, copies)
    assert kernel_calls
    np.testing.assert_allclose(new_weights[0].numpy(), copies[0].numpy(), rtol=1e-6)
