"""The PyTorch engine (`keras_adam.backends.torch`): torch's fused Adam kernels.

Run only under `KERAS_BACKEND=torch` (see conftest.py). What is checked:

- parity: every path (the fused kernels, `fused=False`'s `keras.ops` path)
  against `torch.optim` (float64 to 1e-9; the fused path bit for bit against
  `torch.optim.Adam(fused=True)`), against `keras.optimizers.Adam` (Keras's
  torch Adam) and against each other, float32 and float64;
- dispatch: which variables the kernels take (by wrapping
  `torch._fused_adam_` and `torch._fused_adamw_`), and `fused=True`'s errors;
- `skip_nonfinite`: a run with a NaN step equals, bit for bit, the run
  without that step;
- `model.fit` with `jit_compile=True` (torch.compile) and False;
- state moving between `keras.optimizers.Adam` and `keras_adam.Adam`.

Measured maximum relative deviations (θ over 50 steps, every variant of
the row; torch 2.13.0 CPU, Keras 3.15.1):

| peer                                 | path        | float32  | float64  |
|--------------------------------------|-------------|----------|----------|
| torch.optim fused=True, paper ε      | fused       | 0 (bits) | 0 (bits) |
| torch.optim fused=True, paper ε      | fused=False | 1.4e-7   | 2.2e-16  |
| torch.optim foreach, paper ε         | fused       | 1.2e-7   | 5.0e-17  |
| torch.optim.RAdam (3 variants)       | keras.ops   | 7.8e-8   | 3.9e-16  |
| keras.optimizers.Adam, hat ε̂         | fused       | 1.8e-7   | 1.3e-16  |
| keras.optimizers.Adam, hat ε̂         | fused=False | 1.3e-6 * | 1.7e-16  |
| fused=False (40 flag combinations)   | fused       | 2.2e-7   | 3.3e-16  |

(*) AdamW at Keras's default hyperparameters, where Keras's torch optimizer
decays by a float32 `1 - λη`; 9.2e-8 with binary hyperparameters.

`fused=False` is not bit-identical to Keras's torch Adam: Keras's torch
optimizer updates the moments as `m·β1 + g·(1−β1)` with `torch._foreach_`
ops, `update_rule.adam_step` as `m + (g − m)(1−β1)`.
"""

import math

import keras
import numpy as np
import pytest
import torch

import keras_adam
from keras_adam.backends import torch as torch_backend

STEPS = 50
LR, BETAS, EPS, WD = 2.0**-5, (0.875, 1 - 2.0**-7), 2.0**-20, 2.0**-4
#: Exact binary fractions: every side sees the same numbers (Keras's
#: learning-rate variable is float32).
BINARY = dict(learning_rate=LR, beta_1=BETAS[0], beta_2=BETAS[1], epsilon=EPS)
TORCH_BINARY = dict(lr=LR, betas=BETAS, eps=EPS)
#: Keras's defaults with torch's ε; torch gets the learning rate Keras's float32 variable holds.
DEFAULTS = dict(learning_rate=1e-3, epsilon=1e-8)
TORCH_DEFAULTS = dict(lr=float(np.float32(1e-3)), eps=1e-8)

# The problem: a 37-vector (the kernels' vector loop and its scalar tail)
# with gradient A(θ - c_t) + θ³/2, and a 3x4 matrix with gradient
# sin(B + t)/2 + B/4: gradients depend on the weights and on t.
_RNG = np.random.default_rng(3)
N = 37
_Q = _RNG.normal(size=(N, N))
A = _Q @ _Q.T / N + np.eye(N) * 0.1
CENTERS = _RNG.normal(size=(3, N))
INITIAL = {"kernel": _RNG.normal(size=N), "bias": _RNG.normal(size=(3, 4))}
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def gradients(values, t):
    """The gradients at step t for the weights `values` (torch tensors)."""
    theta, b = (x.detach() for x in values)
    dtypes = [x.dtype for x in (theta, b)]
    theta, b = (x if x.dtype == torch.float64 else x.float() for x in (theta, b))
    a = torch.as_tensor(A, dtype=theta.dtype)
    center = torch.as_tensor(CENTERS[t % 3], dtype=theta.dtype)
    g_theta = a @ (theta - center) + 0.5 * theta**3
    g_b = 0.5 * torch.sin(b + t) + 0.25 * b
    return [g.to(dtype) for g, dtype in zip((g_theta, g_b), dtypes, strict=True)]


def flat(values):
    return np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])


def keras_run(optimizer, dtype="float32", steps=STEPS, bad=None, skip=(), dtypes=None):
    """Run a Keras optimizer on the problem with `optimizer.apply`.

    Args:
        optimizer: A fresh optimizer.
        dtype: The weights' dtype (`dtypes` gives one per variable instead).
        steps: Steps t = 1..steps.
        bad: `{t: value}`: at step t, one gradient element is `value` (NaN, inf).
        skip: Steps left out altogether.
        dtypes: One dtype per variable.

    Returns:
        `(history, state, variables)`: the weights after each step run (a row
        per step), the optimizer's variables at the end, and the model variables.
    """
    dtypes = dtypes or [dtype] * len(INITIAL)
    variables = [
        keras.Variable(value, dtype=dt, name=name)
        for (name, value), dt in zip(INITIAL.items(), dtypes, strict=True)
    ]
    optimizer.build(variables)
    history = []
    for t in range(1, steps + 1):
        if t in skip:
            continue
        grads = gradients([v.value for v in variables], t)
        if bad and t in bad:
            grads[t % 2] = grads[t % 2].clone()
            grads[t % 2].view(-1)[t % 5] = bad[t]
        optimizer.apply(grads, variables)
        history.append(flat(v.numpy() for v in variables))
    state = [np.array(v.numpy()) for v in optimizer.variables]
    return np.array(history), state, variables


def torch_run(make_optimizer, dtype="float64", steps=STEPS):
    """The same problem with a `torch.optim` optimizer."""
    params = [
        torch.tensor(value, dtype=TORCH_DTYPES[dtype], requires_grad=True)
        for value in INITIAL.values()
    ]
    optimizer = make_optimizer(params)
    history = []
    for t in range(1, steps + 1):
        for param, grad in zip(params, gradients(params, t), strict=True):
            param.grad = grad
        optimizer.step()
        history.append(flat(p.detach().numpy() for p in params))
    return np.array(history)


def relative_deviation(actual, expected):
    """max |actual - expected| / max |expected|, over all steps and elements."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Record every call of torch's fused Adam kernels (and still run them)."""
    calls = []
    for name in ("_fused_adam_", "_fused_adamw_"):
        original = getattr(torch, name)

        def wrapper(params, grads, *tensors, _name=name, _original=original, **kwargs):
            calls.append(
                dict(
                    kernel=_name,
                    count=len(params),
                    shapes=[tuple(p.shape) for p in params],
                    dtype=params[0].dtype,
                    step=float(tensors[3][0]),
                    **{k: v for k, v in kwargs.items() if k != "lr"},
                    lr=float(kwargs["lr"]),
                    threads=torch.get_num_threads(),
                )
            )
            return _original(params, grads, *tensors, **kwargs)

        monkeypatch.setattr(torch, name, wrapper)
    return calls


# -- parity with torch.optim ----------------------------------------------------

PEERS = {
    "Adam": (dict(epsilon_mode="paper"), lambda p, **kw: torch.optim.Adam(p, **kw)),
    "AdamW": (
        dict(epsilon_mode="paper", weight_decay=WD),
        lambda p, **kw: torch.optim.AdamW(p, weight_decay=WD, **kw),
    ),
    "Adam+L2": (
        dict(epsilon_mode="paper", weight_decay=WD, decoupled_weight_decay=False),
        lambda p, **kw: torch.optim.Adam(p, weight_decay=WD, **kw),
    ),
    "AMSGrad": (
        dict(epsilon_mode="paper", amsgrad=True),
        lambda p, **kw: torch.optim.Adam(p, amsgrad=True, **kw),
    ),
    "maximize": (
        dict(epsilon_mode="paper", maximize=True),
        lambda p, **kw: torch.optim.Adam(p, maximize=True, **kw),
    ),
    "AdamW+AMSGrad+maximize": (
        dict(epsilon_mode="paper", weight_decay=WD, amsgrad=True, maximize=True),
        lambda p, **kw: torch.optim.AdamW(p, weight_decay=WD, amsgrad=True, maximize=True, **kw),
    ),
}
RADAM_PEERS = {
    "RAdam": (dict(rectify=True), lambda p, **kw: torch.optim.RAdam(p, **kw)),
    "RAdam+L2": (
        dict(rectify=True, weight_decay=WD, decoupled_weight_decay=False),
        lambda p, **kw: torch.optim.RAdam(p, weight_decay=WD, **kw),
    ),
    "RAdam+decoupled": (
        dict(rectify=True, weight_decay=WD),
        lambda p, **kw: torch.optim.RAdam(p, weight_decay=WD, decoupled_weight_decay=True, **kw),
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("variant", sorted({**PEERS, **RADAM_PEERS}))
def test_matches_torch_optim(variant, fused, dtype):
    ours, make = {**PEERS, **RADAM_PEERS}[variant]
    history, _, _ = keras_run(keras_adam.Adam(**BINARY, **ours, fused=fused), dtype)
    theirs = torch_run(lambda p: make(p, **TORCH_BINARY), dtype)
    assert relative_deviation(theirs[-1], theirs[0]) > 0.05  # it moved
    bound = 1e-9 if dtype == "float64" else 1e-6
    assert relative_deviation(history, theirs) <= bound


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hyper", ["binary", "defaults"])
@pytest.mark.parametrize("variant", sorted(PEERS))
def test_fused_path_is_torch_fused_adam_bit_for_bit(variant, hyper, dtype):
    """With torch's ε, the default path is `torch.optim`'s fused step: same kernel, same scalars."""
    ours, make = PEERS[variant]
    ours_hyper, torch_hyper = (
        (BINARY, TORCH_BINARY) if hyper == "binary" else (DEFAULTS, TORCH_DEFAULTS)
    )
    history, _, _ = keras_run(keras_adam.Adam(**ours_hyper, **ours), dtype)
    theirs = torch_run(lambda p: make(p, fused=True, **torch_hyper), dtype)
    np.testing.assert_array_equal(history, theirs)


def test_radam_runs_both_branches():
    """With β2 = 1 - 2**-7, ρ_t passes 5 within the 50 steps."""
    rho_inf = 2 / (1 - BETAS[1]) - 1
    rho = [rho_inf - 2 * t * BETAS[1] ** t / (1 - BETAS[1] ** t) for t in range(1, STEPS + 1)]
    assert rho[0] <= 5 < rho[-1]


# -- parity with keras.optimizers.Adam (Keras's torch Adam) ----------------------

KERAS_VARIANTS = {
    "Adam": {},
    "AMSGrad": dict(amsgrad=True),
    "AdamW": dict(weight_decay=WD),
    "AdamW+AMSGrad": dict(weight_decay=WD, amsgrad=True),
}


def test_keras_adam_on_torch_is_kerass_torch_adam():
    from keras.src.backend.torch.optimizers import torch_adam

    assert isinstance(keras.optimizers.Adam(), torch_adam.Adam)


#: With Keras's default hyperparameters and weight decay, Keras's torch
#: optimizer multiplies float64 weights by a float32 `1 - λη`
#: (`TorchOptimizer._apply_weight_decay`): those run in float32 only.
KERAS_CASES = [
    (variant, hyper, dtype)
    for variant in sorted(KERAS_VARIANTS)
    for hyper in ("binary", "defaults")
    for dtype in ("float32", "float64")
    if not (
        hyper == "defaults" and "weight_decay" in KERAS_VARIANTS[variant] and dtype == "float64"
    )
]


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(("variant", "hyper", "dtype"), KERAS_CASES)
def test_matches_keras_adam(variant, hyper, dtype, fused):
    """Round-off against `keras.optimizers.Adam` in Keras's ε̂ form."""
    options = KERAS_VARIANTS[variant]
    hyperparameters = BINARY if hyper == "binary" else {}
    ours, our_state, _ = keras_run(
        keras_adam.Adam(**hyperparameters, **options, fused=fused), dtype
    )
    theirs, their_state, _ = keras_run(keras.optimizers.Adam(**hyperparameters, **options), dtype)
    assert relative_deviation(theirs[-1], theirs[0]) > 1e-3  # it moved
    bound = 1e-12 if dtype == "float64" else (1e-6 if fused is None else 3e-6)
    assert relative_deviation(ours, theirs) <= bound
    for mine, keras_value in zip(our_state[2:], their_state[2:], strict=True):
        assert relative_deviation(mine, keras_value) <= 100 * bound  # moments
    assert [int(our_state[0])] == [int(their_state[0])] == [STEPS]


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
    assert all(c["lr"] == LR for c in kernel_calls)


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


# -- skip_nonfinite -----------------------------------------------------------------

SKIP_CONFIGS = {
    "fused": {},
    "fused=False": dict(fused=False),
    "rectify": dict(rectify=True),
    "fused, accumulation, EMA": dict(gradient_accumulation_steps=2, use_ema=True),
    "fused=False, accumulation, EMA": dict(
        fused=False, gradient_accumulation_steps=2, use_ema=True
    ),
    "fused, AMSGrad, decay, clipnorm": dict(amsgrad=True, weight_decay=WD, clipnorm=1.0),
}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("config", sorted(SKIP_CONFIGS))
def test_skipped_step_is_a_step_never_taken(config, bad_value, kernel_calls):
    options = dict(**BINARY, skip_nonfinite=True, **SKIP_CONFIGS[config])
    bad = {7: bad_value, 10: bad_value}  # an accumulation call and an update call
    history, state, _ = keras_run(keras_adam.Adam(**options), steps=20, bad=bad)
    fused_calls = len(kernel_calls)
    without, without_state, _ = keras_run(keras_adam.Adam(**options), steps=20, skip=set(bad))
    kept = [i for i in range(20) if i + 1 not in bad]
    np.testing.assert_array_equal(history[kept], without)
    assert int(state[-1]) == 2 and int(without_state[-1]) == 0  # skipped_steps
    for mine, theirs in zip(state[:-1], without_state[:-1], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert np.all(np.isfinite(history))
    if "fused=False" not in config and "rectify" not in config:
        assert fused_calls == len(kernel_calls) - fused_calls > 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_all_finite(dtype):
    big = torch.zeros(4099, dtype=TORCH_DTYPES[dtype])
    assert torch_backend.all_finite([big, None, torch.zeros(0)])
    for position in (0, 1, 7, 8, 15, 500, 4095, 4096, 4098):
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = big.clone()
            bad[position] = value
            assert not torch_backend.all_finite([torch.ones(3), bad])
    # Finite values whose sum of squares overflows are finite.
    largest = torch.finfo(TORCH_DTYPES[dtype]).max
    huge = torch.full((4,), largest, dtype=TORCH_DTYPES[dtype])
    assert torch_backend.all_finite([huge, torch.ones(5)])
    huge[2] = float("nan")
    assert not torch_backend.all_finite([huge, torch.ones(5)])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_all_finite_mixed_dtypes_and_sparse():
    huge = torch.full((3,), 1e300, dtype=torch.float64)
    assert torch_backend.all_finite([huge, torch.ones(2, dtype=torch.bfloat16)])
    nan16 = torch.tensor([float("nan")], dtype=torch.float16)
    assert not torch_backend.all_finite([huge, nan16])
    rows = torch.tensor([[0, 0]])
    repeated = torch.sparse_coo_tensor(rows, torch.tensor([3e38, 3e38]), (3,))
    assert torch_backend.all_finite([repeated])  # a sum of the rows would overflow
    with_nan = torch.sparse_coo_tensor(rows, torch.tensor([1.0, float("nan")]), (3,))
    assert not torch_backend.all_finite([with_nan])


# -- model.fit ------------------------------------------------------------------------

X = np.random.default_rng(5).normal(size=(96, 5)).astype("float32")
Y = np.tanh(X @ np.random.default_rng(6).normal(size=(5, 2))).astype("float32")


def fit(optimizer, jit_compile, x=X, y=Y, epochs=3):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return flat(model.get_weights()), history.history["loss"], model


#: float32 training, 18 steps at η = 0.01: the kernels' round-off (measured
#: up to 1.5e-6), amplified by the model.
FIT_BOUND = 1e-5
FIT_FEATURES = dict(
    learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 4, 0.9),
    gradient_accumulation_steps=2,
    use_ema=True,
    ema_overwrite_frequency=5,
    clipnorm=0.5,
    loss_scale_factor=64.0,
    weight_decay=WD,
    amsgrad=True,
)


def test_fit_eager_trains_and_matches_fused_false(kernel_calls):
    weights, losses, _ = fit(keras_adam.Adam(learning_rate=0.01), jit_compile=False)
    assert len(kernel_calls) == 18  # 6 batches x 3 epochs, one call each
    reference, reference_losses, _ = fit(keras_adam.Adam(learning_rate=0.01, fused=False), False)
    assert losses[-1] < 0.8 * losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND


def test_fit_eager_with_every_keras_feature_matches_fused_false(kernel_calls):
    weights, losses, _ = fit(keras_adam.Adam(**FIT_FEATURES), jit_compile=False)
    assert len(kernel_calls) == 9  # one update per two batches
    reference, _, _ = fit(keras_adam.Adam(**FIT_FEATURES, fused=False), jit_compile=False)
    assert losses[-1] < losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND


def test_fit_compiled_matches_fused_false(kernel_calls):
    """torch.compile: the kernel calls run outside the graph, once per step."""
    weights, losses, model = fit(keras_adam.Adam(learning_rate=0.01), jit_compile=True)
    assert model.jit_compile and len(kernel_calls) == 18
    reference, reference_losses, _ = fit(keras_adam.Adam(learning_rate=0.01, fused=False), False)
    assert losses[-1] < 0.8 * losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def test_fit_compiled_with_every_keras_feature_and_a_skipped_batch(kernel_calls):
    """Under torch.compile, a NaN batch is skipped exactly as the batch never seen."""
    x_bad = X.copy()
    x_bad[32:48] = np.nan  # the third batch of each epoch
    optimizer = keras_adam.Adam(**FIT_FEATURES, skip_nonfinite=True)
    weights, _, model = fit(optimizer, jit_compile=True, x=x_bad)
    assert model.jit_compile and int(optimizer.skipped_steps.numpy()) == 3
    assert len(kernel_calls) == 7  # 15 good batches, one update per two
    keep = np.r_[0:32, 48:96]
    reference_optimizer = keras_adam.Adam(**FIT_FEATURES, skip_nonfinite=True, fused=False)
    reference, _, _ = fit(reference_optimizer, jit_compile=False, x=X[keep], y=Y[keep])
    assert int(reference_optimizer.skipped_steps.numpy()) == 0
    # Calls counted (15 good batches); `iterations` counts updates (7).
    assert int(optimizer._iterations.numpy()) == int(reference_optimizer._iterations.numpy()) == 15
    assert relative_deviation(weights, reference) <= FIT_BOUND


# -- state moves between keras.optimizers.Adam and keras_adam.Adam -------------------


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("direction", ["keras to ours", "ours to keras"])
def test_state_moves_between_keras_and_ours(direction, amsgrad, kernel_calls):
    def make(kind):
        if kind == "keras":
            return keras.optimizers.Adam(**BINARY, amsgrad=amsgrad)
        return keras_adam.Adam(**BINARY, amsgrad=amsgrad)

    first, second = ("keras", "ours") if direction == "keras to ours" else ("ours", "keras")
    # 10 steps with the first optimizer, then 10 with the second from its state ...
    source = make(first)
    weights = [keras.Variable(value, dtype="float64", name=name) for name, value in INITIAL.items()]
    source.build(weights)
    for t in range(1, 11):
        source.apply(gradients([w.value for w in weights], t), weights)
    store = {}
    source.save_own_variables(store)
    target = make(second)
    target.build(weights)
    target.load_own_variables(store)
    assert int(target.iterations.numpy()) == 10
    # ... equals 20 steps with the first alone.
    for t in range(11, 21):
        target.apply(gradients([w.value for w in weights], t), weights)
    alone, _, _ = keras_run(make(first), dtype="float64", steps=20)
    assert relative_deviation(flat(w.numpy() for w in weights), alone[-1]) <= 1e-12
    assert kernel_calls  # ours ran fused
