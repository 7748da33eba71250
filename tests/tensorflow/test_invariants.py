"""Invariants of Adam's step, over random shapes, dtypes and hyperparameters (hypothesis).

- rescaling the gradients by c > 0 changes nothing (ε = 0);
- the first step moves every coordinate by exactly η·sign(g);
- every step is within the Cauchy–Schwarz bound η·B_t(β1, β2), and the
  Section 2.1 bound of the paper is only approximate (a constructed
  gradient sequence exceeds it, within B_t);
- with `lazy_sparse=True`, rows not touched stay bit-identical, moments included.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_adam

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
betas_1 = st.floats(0.0, 0.99)
betas_2 = st.floats(0.5, 0.9999)
learning_rates = st.floats(1e-4, 1.0)
modes = st.sampled_from(["hat", "paper"])
#: What the step invariants draw: a shape, β1, β2, η, the ε placement and a seed.
STEP_PROBLEM = dict(
    shape=shapes,
    beta_1=betas_1,
    beta_2=betas_2,
    learning_rate=learning_rates,
    epsilon_mode=modes,
    seed=st.integers(0, 2**16),
)


def without_epsilon(beta_1, beta_2, learning_rate, epsilon_mode, **options):
    """`keras_adam.Adam` with ε = 0, where the invariants are exact."""
    return keras_adam.Adam(
        learning_rate=learning_rate,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=0.0,
        epsilon_mode=epsilon_mode,
        **options,
    )


def nonzero_gradients(shape, steps, seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(steps, *shape))
    return np.where(np.abs(values) < 1e-3, 1e-3, values)  # ε = 0 needs v > 0


def eta(optimizer):
    """η as the optimizer holds it: Keras keeps the learning rate in a float32 variable."""
    return float(optimizer.learning_rate.numpy())


def run(optimizer, theta0, gradients, dtype):
    """Apply `gradients` one step at a time (eager); return θ after each step."""
    variable = keras.Variable(theta0, dtype=dtype)
    optimizer.build([variable])
    history = []
    for g in gradients:
        optimizer.apply_gradients([(tf.constant(g, dtype), variable)])
        history.append(np.array(variable.numpy(), dtype="float64"))
    return np.array(history)


@SETTINGS
@given(**STEP_PROBLEM, scale=st.floats(1e-3, 1e3))
def test_rescaling_the_gradients_changes_nothing(
    shape, scale, beta_1, beta_2, learning_rate, epsilon_mode, seed
):
    gradients = nonzero_gradients(shape, 6, seed)
    theta0 = np.random.default_rng(seed + 1).normal(size=shape)

    def trajectory(factor):
        optimizer = without_epsilon(beta_1, beta_2, learning_rate, epsilon_mode)
        return run(optimizer, theta0, gradients * factor, "float64")

    np.testing.assert_allclose(trajectory(scale), trajectory(1.0), rtol=1e-12, atol=1e-14)


@SETTINGS
@given(
    **STEP_PROBLEM,
    dtype=st.sampled_from(["float32", "float64"]),
    fused=st.sampled_from([None, False]),
)
def test_the_first_step_moves_each_coordinate_by_eta_sign_g(
    shape, dtype, beta_1, beta_2, learning_rate, epsilon_mode, fused, seed
):
    gradient = nonzero_gradients(shape, 1, seed)
    theta0 = np.random.default_rng(seed + 1).normal(size=shape)
    optimizer = without_epsilon(beta_1, beta_2, learning_rate, epsilon_mode, fused=fused)
    theta1 = run(optimizer, theta0, gradient, dtype)[0]
    start = np.array(theta0.astype(dtype), dtype="float64")
    # Exact up to rounding θ1 to the variable's dtype, and up to the
    # cancellation in 1 − β^t computed in that dtype (as Keras does): one
    # rounding of β^t, relative error ulp/(1 − β), e.g. 6e-4 for β2 = 0.9999
    # in float32.
    resolution = float(np.finfo(dtype).eps)
    tolerance = (1e-5 if dtype == "float32" else 1e-12) + resolution * (
        1 / (1 - beta_1) + 1 / (1 - beta_2)
    )
    step = theta1 - start
    expected = -eta(optimizer) * np.sign(gradient[0])
    error = np.abs(step - expected)
    assert np.all(error <= tolerance * (np.abs(start) + learning_rate)), error.max()


def cauchy_schwarz_bound(beta_1, beta_2, t):
    """The largest |m̂_t| / sqrt(v̂_t) any gradient sequence can give.

    |m_t| = (1−β1)|Σ β1^{t−i} g_i| ≤ (1−β1) sqrt(Σ_k (β1²/β2)^k) sqrt(Σ β2^{t−i} g_i²),
    with equality for g_i ∝ (β1/β2)^{t−i}; then bias-correct both moments.
    """
    gamma = beta_1**2 / beta_2
    geometric = sum(gamma**k for k in range(t))
    return (
        (1 - beta_1)
        / (1 - beta_1**t)
        * math.sqrt(geometric)
        * math.sqrt((1 - beta_2**t) / (1 - beta_2))
    )


def paper_bound(beta_1, beta_2):
    """Section 2.1: |Δ| ≤ η(1−β1)/sqrt(1−β2) if (1−β1) > sqrt(1−β2), else |Δ| ≤ η."""
    if 1 - beta_1 > math.sqrt(1 - beta_2):
        return (1 - beta_1) / math.sqrt(1 - beta_2)
    return 1.0


@SETTINGS
@given(**STEP_PROBLEM)
def test_every_step_is_within_the_cauchy_schwarz_bound(
    shape, beta_1, beta_2, learning_rate, epsilon_mode, seed
):
    steps = 12
    gradients = nonzero_gradients(shape, steps, seed)
    theta0 = np.zeros(shape)
    optimizer = without_epsilon(beta_1, beta_2, learning_rate, epsilon_mode)
    history = run(optimizer, theta0, gradients, "float64")
    moves = np.abs(np.diff(np.concatenate([theta0[None], history]), axis=0))
    for t in range(1, steps + 1):
        bound = eta(optimizer) * cauchy_schwarz_bound(beta_1, beta_2, t)
        assert moves[t - 1].max() <= bound * (1 + 1e-9)


def test_the_papers_step_bound_is_approximate():
    """With β1=0.9, β2=0.99 the paper bounds a step by η (case (1−β1) ≤ sqrt(1−β2)).
    Gradients g_i = (β1/β2)^{t−i}, the Cauchy–Schwarz equality case, make step 30
    larger than η: by 1.19×, exactly the bound B_30."""
    beta_1, beta_2, t = 0.9, 0.99, 30
    gradients = np.array([[(beta_1 / beta_2) ** (t - i)] for i in range(1, t + 1)])
    optimizer = keras_adam.Adam(
        learning_rate=1.0, beta_1=beta_1, beta_2=beta_2, epsilon=0.0, epsilon_mode="paper"
    )
    history = run(optimizer, np.zeros(1), gradients, "float64")
    last_step = abs(history[-1, 0] - history[-2, 0])
    assert paper_bound(beta_1, beta_2) == 1.0
    assert last_step > 1.18
    assert math.isclose(last_step, cauchy_schwarz_bound(beta_1, beta_2, t), rel_tol=1e-12)


@SETTINGS
@given(
    rows=st.integers(2, 30),
    width=st.integers(1, 5),
    dtype=st.sampled_from(["float32", "float64", "bfloat16", "float16"]),
    touched=st.lists(st.integers(0, 29), min_size=1, max_size=12),
    amsgrad=st.booleans(),
    weight_decay=st.none() | st.floats(0.0, 0.1),
    seed=st.integers(0, 2**16),
)
def test_lazy_rows_not_touched_stay_bit_identical(
    rows, width, dtype, touched, amsgrad, weight_decay, seed
):
    keras.backend.clear_session()
    rng = np.random.default_rng(seed)
    table = keras.Variable(rng.normal(size=(rows, width)), dtype=dtype)
    optimizer = keras_adam.Adam(lazy_sparse=True, amsgrad=amsgrad, weight_decay=weight_decay)
    optimizer.build([table])
    indices = np.array([i % rows for i in touched])
    # Two dense steps first, so that untouched rows have moments to keep.
    for _ in range(2):
        optimizer.apply_gradients([(tf.constant(rng.normal(size=(rows, width)), dtype), table)])
    before = [np.array(v.numpy()) for v in optimizer.variables[2:]] + [np.array(table.numpy())]
    values = tf.constant(rng.normal(size=(len(indices), width)), dtype)
    gradient = tf.IndexedSlices(values, tf.constant(indices, "int64"), (rows, width))
    optimizer.apply_gradients([(gradient, table)])
    after = [np.array(v.numpy()) for v in optimizer.variables[2:]] + [np.array(table.numpy())]
    untouched = np.setdiff1d(np.arange(rows), indices)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new[untouched], old[untouched])
    if dtype in ("float32", "float64"):  # touched rows did move
        assert np.all(after[-1][indices] != before[-1][indices])
