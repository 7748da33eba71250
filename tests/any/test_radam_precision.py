"""RAdam's scalars to about one rounding in float32, on every Keras backend.

`torch.optim.RAdam` computes $1-\\beta^t$, $\\rho_t$ and $r_t$ in Python
floats (double) and rounds each once into float32. `keras_adam` computes
them in the step's dtype, float32 for float32 weights (JAX has no float64
by default): these tests check that they are as accurate as torch's, and
that a float32 RAdam trajectory is as close to a float64 oracle as torch's.

Backend-neutral: run with KERAS_BACKEND=tensorflow, jax or torch.
"""

import decimal
import math

import keras
import numpy as np
import pytest

import keras_adam
from keras_adam import radam_scalars

#: float32's unit roundoff, half an ulp of 1: one correct rounding is within it.
U32 = 2.0**-24
U64 = 2.0**-53
T = np.arange(1, 10001)
BETA_2S = (0.9, 0.99, 0.999, 0.9999)
BETAS = (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999)

# Worst relative errors measured over T, BETA_2S and BETAS, eager and
# compiled, on TensorFlow, JAX and PyTorch (CPU), in units of U32: 1 - beta**t
# 2.38, rho_t 3.22, r_t 3.53 (r_t is up to 2.8x as sensitive as rho_t, near
# rho_t = 5). One correct rounding would be 1; the textbook float32 formulas
# (ops.power of float32(beta_2)) are off by up to 5.6e7 in rho_t. The bounds
# leave a margin for other CPUs and library versions.
BOUND = {"one_minus_power": 3.0, "rho": 4.0, "rect": 4.5}
# The same in float64, in units of U64 (measured: 2, 3 and 2).
BOUND_64 = {"one_minus_power": 3.0, "rho": 4.0, "rect": 4.0}


def compiled(fn, mode):
    """`fn` as is, or compiled: XLA on TensorFlow, jax.jit on JAX."""
    if mode == "eager":
        return fn
    name = keras.backend.backend()
    if name == "tensorflow":
        tf = pytest.importorskip("tensorflow")
        return tf.function(fn, jit_compile=True)
    if name == "jax":
        jax = pytest.importorskip("jax")
        return jax.jit(fn)
    pytest.skip(f"no compiled mode tested on {name}")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def reference(beta_2, t):
    """rho_t, r_t and 1 - beta_2**t in NumPy double, from the textbook
    formulas (but 1 - beta**t = -expm1(t log beta), so that the cancellation
    in rho_inf - ... costs at most ~rho_inf * 2**-53 = 1e-12)."""
    t = np.asarray(t, dtype=np.float64)
    log_beta = math.log(beta_2)
    one_minus = -np.expm1(t * log_beta)
    rho_inf = 2 / (1 - beta_2) - 1
    rho = rho_inf - 2 * t * np.exp(t * log_beta) / one_minus
    ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
    return rho, np.sqrt(np.maximum(ratio, 0.0)), one_minus


def precise(beta_2, t):
    """rho_t, r_t and 1 - beta_2**t from the textbook formulas in 60-digit
    decimal arithmetic (beta_2 converted exactly): exact to far below 2**-53."""
    with decimal.localcontext(prec=60):
        beta = decimal.Decimal(beta_2)
        power = beta ** int(t)
        one_minus = 1 - power
        rho_inf = 2 / (1 - beta) - 1
        rho = rho_inf - 2 * int(t) * power / one_minus
        ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        rect = ratio.sqrt() if ratio > 0 else decimal.Decimal(0)
        return float(rho), float(rect), float(one_minus)


def relative_error(actual, expected):
    return np.abs(actual / expected - 1)


@pytest.mark.parametrize("beta_2", BETA_2S)
def test_reference_is_far_more_precise_than_float32(beta_2):
    """The NumPy reference is within 1e-11 of 60-digit arithmetic: far below U32."""
    steps = np.r_[1:41, np.geomspace(41, T[-1], 60).astype(int)]
    rho, rect, one_minus = reference(beta_2, steps)
    for i, t in enumerate(steps):
        rho_precise, rect_precise, one_minus_precise = precise(beta_2, t)
        assert relative_error(rho[i], rho_precise) < 1e-11
        assert relative_error(one_minus[i], one_minus_precise) < 1e-14
        if rho_precise > 5:
            assert relative_error(rect[i], rect_precise) < 1e-11


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_float32_scalars_within_a_few_roundings(mode):
    def scalars(t):
        rhos = [radam_scalars.rho(b, t) for b in BETA_2S]
        rects = [radam_scalars.rectification(b, r) for b, r in zip(BETA_2S, rhos, strict=True)]
        powers = [radam_scalars.one_minus_power(b, t) for b in BETAS]
        return rhos, rects, powers

    t = keras.ops.convert_to_tensor(T.astype(np.float32))
    rhos, rects, powers = compiled(scalars, mode)(t)
    worst = {"rho": 0.0, "rect": 0.0, "one_minus_power": 0.0}
    for beta_2, rho, rect in zip(BETA_2S, rhos, rects, strict=True):
        assert keras.backend.standardize_dtype(rho.dtype) == "float32"
        rho_ref, rect_ref, _ = reference(beta_2, T)
        rho, rect = to_numpy(rho), to_numpy(rect)
        # The same steps take the rectified branch.
        np.testing.assert_array_equal(rho > 5, rho_ref > 5)
        rectified = rho_ref > 5
        worst["rho"] = max(worst["rho"], relative_error(rho, rho_ref).max() / U32)
        errors = relative_error(rect[rectified], rect_ref[rectified])
        worst["rect"] = max(worst["rect"], errors.max() / U32)
    for beta, power in zip(BETAS, powers, strict=True):
        expected = -np.expm1(T * math.log(beta)) if beta else np.ones(T.shape)
        errors = relative_error(to_numpy(power), expected)
        worst["one_minus_power"] = max(worst["one_minus_power"], errors.max() / U32)
    print(f"\n{keras.backend.backend()} {mode}: worst relative errors / 2**-24: {worst}")
    for name, bound in BOUND.items():
        assert worst[name] <= bound, (name, worst[name])


def test_textbook_float32_formula_is_far_worse():
    """What the rearrangement is for: rho_t from ops.power(float32(beta_2), t)."""
    t = keras.ops.convert_to_tensor(T.astype(np.float32))
    worst_textbook = worst_ours = 0.0
    for beta_2 in BETA_2S:
        power = keras.ops.power(keras.ops.convert_to_tensor(beta_2, "float32"), t)
        rho_inf = 2 / (1 - beta_2) - 1
        textbook = to_numpy(rho_inf - 2 * t * power / (1 - power))
        ours = to_numpy(radam_scalars.rho(beta_2, t))
        rho_ref = reference(beta_2, T)[0]
        textbook_error = relative_error(textbook, rho_ref).max() / U32
        ours_error = relative_error(ours, rho_ref).max() / U32
        print(
            f"\nrho_t / 2**-24, beta_2={beta_2}: "
            f"textbook {textbook_error:.3g}, ours {ours_error:.3g}"
        )
        worst_textbook = max(worst_textbook, textbook_error)
        worst_ours = max(worst_ours, ours_error)
    assert worst_textbook > 1e4 * worst_ours


def test_float64_scalars_to_double_precision():
    """In float64 the same formulas are within a few 2**-53 of 60-digit arithmetic."""
    t = keras.ops.convert_to_tensor(T.astype(np.float64), "float64")
    if keras.backend.standardize_dtype(t.dtype) != "float64":
        pytest.skip("no float64 on this backend (JAX without jax_enable_x64)")
    steps = np.r_[1:101, np.geomspace(101, T[-1], 200).astype(int)]
    worst = {"rho": 0.0, "rect": 0.0, "one_minus_power": 0.0}
    for beta_2 in BETA_2S:
        rho = radam_scalars.rho(beta_2, t)
        rect = to_numpy(radam_scalars.rectification(beta_2, rho))
        rho = to_numpy(rho)
        one_minus = to_numpy(radam_scalars.one_minus_power(beta_2, t))
        for step in steps:
            rho_precise, rect_precise, one_minus_precise = precise(beta_2, step)
            i = step - 1
            worst["rho"] = max(worst["rho"], relative_error(rho[i], rho_precise) / U64)
            errors = relative_error(one_minus[i], one_minus_precise) / U64
            worst["one_minus_power"] = max(worst["one_minus_power"], errors)
            if rho_precise > 5:
                worst["rect"] = max(worst["rect"], relative_error(rect[i], rect_precise) / U64)
    print(f"\n{keras.backend.backend()} float64: worst relative errors / 2**-53: {worst}")
    for name, bound in BOUND_64.items():
        assert worst[name] <= bound, (name, worst[name])


# -- a float32 trajectory against a float64 oracle, with torch's beside it -----

N = 32
STEPS = 50
_RNG = np.random.default_rng(2019)
_Q = np.linalg.qr(_RNG.normal(size=(N, N)))[0]
A = _Q @ np.diag(np.linspace(0.5, 2.0, N)) @ _Q.T  # symmetric positive definite
CENTERS = _RNG.normal(size=(3, N))
THETA0 = _RNG.normal(size=N)
LR, BETA_1, BETA_2, EPS, WD = 2.0**-6, 0.9, 0.999, 1e-8, 2.0**-4

VARIANTS = {
    "plain": dict(weight_decay=0.0, decoupled_weight_decay=False),
    "decoupled": dict(weight_decay=WD, decoupled_weight_decay=True),
    "L2": dict(weight_decay=WD, decoupled_weight_decay=False),
}


def gradient(theta, t):
    """A non-quadratic problem whose minimum moves with t (in float64)."""
    theta = np.asarray(theta, dtype=np.float64)
    return A @ (theta - CENTERS[t % 3]) + 0.5 * theta**3


def oracle(weight_decay, decoupled_weight_decay):
    """torch.optim.RAdam's algorithm (single-tensor), transcribed in float64."""
    theta, m, v = THETA0.copy(), np.zeros(N), np.zeros(N)
    rho_inf = 2 / (1 - BETA_2) - 1
    history = []
    for t in range(1, STEPS + 1):
        g = gradient(theta, t)
        if weight_decay and decoupled_weight_decay:
            theta = theta * (1 - LR * weight_decay)
        elif weight_decay:
            g = g + weight_decay * theta
        m = BETA_1 * m + (1 - BETA_1) * g
        v = BETA_2 * v + (1 - BETA_2) * g * g
        bias_correction_1 = 1 - BETA_1**t
        bias_correction_2 = 1 - BETA_2**t
        m_hat = m / bias_correction_1
        rho_t = rho_inf - 2 * t * BETA_2**t / bias_correction_2
        if rho_t > 5:
            rect = math.sqrt(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
            adaptive = math.sqrt(bias_correction_2) / (np.sqrt(v) + EPS)
            theta = theta - m_hat * LR * adaptive * rect
        else:
            theta = theta - m_hat * LR
        history.append(theta)
    return np.array(history)


def ours(weight_decay, decoupled_weight_decay, mode):
    variable = keras.Variable(THETA0.astype(np.float32), dtype="float32")
    optimizer = keras_adam.Adam(
        learning_rate=LR,
        beta_1=BETA_1,
        beta_2=BETA_2,
        epsilon=EPS,
        rectify=True,
        weight_decay=weight_decay or None,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    optimizer.build([variable])
    if mode == "compiled" and keras.backend.backend() == "jax":
        jax = pytest.importorskip("jax")
        apply = jax.jit(optimizer.stateless_apply)
        state = [v.value for v in optimizer.variables]
        theta = variable.value
        history = []
        for t in range(1, STEPS + 1):
            g = gradient(to_numpy(theta), t).astype(np.float32)
            (theta,), state = apply(state, [keras.ops.convert_to_tensor(g, "float32")], [theta])
            history.append(to_numpy(theta))
        return np.array(history)

    def step(g):
        optimizer.apply([g], [variable])

    step = compiled(step, mode)
    history = []
    for t in range(1, STEPS + 1):
        g = gradient(to_numpy(variable), t).astype(np.float32)
        step(keras.ops.convert_to_tensor(g, "float32"))
        history.append(to_numpy(variable))
    return np.array(history)


def torch_radam(weight_decay, decoupled_weight_decay):
    torch = pytest.importorskip("torch")
    theta = torch.tensor(THETA0, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.RAdam(
        [theta],
        lr=LR,
        betas=(BETA_1, BETA_2),
        eps=EPS,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
    )
    history = []
    for t in range(1, STEPS + 1):
        g = gradient(theta.detach().numpy(), t).astype(np.float32)
        theta.grad = torch.from_numpy(g)
        optimizer.step()
        history.append(theta.detach().numpy().astype(np.float64))
    return np.array(history)


def deviation(actual, expected):
    """max over steps of max |actual - expected| / max |expected|."""
    return float(
        np.max(np.max(np.abs(actual - expected), axis=1) / np.max(np.abs(expected), axis=1))
    )


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float32_trajectory_as_accurate_as_torch(variant, mode):
    kwargs = VARIANTS[variant]
    expected = oracle(**kwargs)
    assert deviation(expected[-1:], THETA0[None]) > 0.1  # it moved
    ours_error = deviation(ours(**kwargs, mode=mode), expected)
    torch_error = deviation(torch_radam(**kwargs), expected)
    print(
        f"\n{keras.backend.backend()} {mode} RAdam {variant}, float32 vs float64 oracle, "
        f"{STEPS} steps: ours {ours_error:.2e}, torch {torch_error:.2e}"
    )
    assert ours_error <= 1.1 * torch_error
