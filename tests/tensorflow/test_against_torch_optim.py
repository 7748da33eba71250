"""Every variant against the torch.optim implementation its users know:
float64, 50 steps, step for step, eager and under XLA, to 1e-9 relative.

Hyperparameters are exact binary fractions so that both sides see the same
numbers; torch 2.13.0 (CPU) is a test-only dependency.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

import keras_adam
from tests.helpers.tf_support import CENTERS, STEPS, THETA0, A, keras_trajectory, relative_deviation

LR, BETAS, EPS, WD = 2.0**-5, (0.875, 1 - 2.0**-7), 2.0**-20, 2.0**-4
COMMON = dict(learning_rate=LR, beta_1=BETAS[0], beta_2=BETAS[1], epsilon=EPS)
TORCH = dict(lr=LR, betas=BETAS, eps=EPS)

PAIRS = {
    "Adam": (dict(epsilon_mode="paper"), lambda p: torch.optim.Adam(p, **TORCH)),
    "AdamW": (
        dict(epsilon_mode="paper", weight_decay=WD),
        lambda p: torch.optim.AdamW(p, weight_decay=WD, **TORCH),
    ),
    "Adam+L2": (
        dict(epsilon_mode="paper", weight_decay=WD, decoupled_weight_decay=False),
        lambda p: torch.optim.Adam(p, weight_decay=WD, **TORCH),
    ),
    "AMSGrad": (
        dict(epsilon_mode="paper", amsgrad=True),
        lambda p: torch.optim.Adam(p, amsgrad=True, **TORCH),
    ),
    "maximize": (
        dict(epsilon_mode="paper", maximize=True),
        lambda p: torch.optim.Adam(p, maximize=True, **TORCH),
    ),
    "RAdam": (dict(rectify=True), lambda p: torch.optim.RAdam(p, **TORCH)),
    "RAdam+L2": (
        dict(rectify=True, weight_decay=WD, decoupled_weight_decay=False),
        lambda p: torch.optim.RAdam(p, weight_decay=WD, **TORCH),
    ),
    "RAdam+decoupled": (
        dict(rectify=True, weight_decay=WD),
        lambda p: torch.optim.RAdam(p, weight_decay=WD, decoupled_weight_decay=True, **TORCH),
    ),
}


def torch_trajectory(make_optimizer):
    theta = torch.tensor(THETA0, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([theta])
    a = torch.tensor(A, dtype=torch.float64)
    centers = torch.tensor(CENTERS, dtype=torch.float64)
    history = []
    for t in range(1, STEPS + 1):
        with torch.no_grad():
            theta.grad = a @ (theta - centers[t % 3]) + 0.5 * theta**3
        optimizer.step()
        history.append(theta.detach().numpy().copy())
    return np.array(history)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("variant", sorted(PAIRS))
def test_matches_torch(variant, mode):
    ours_kwargs, make_torch = PAIRS[variant]
    ours = keras_trajectory(keras_adam.Adam(**COMMON, **ours_kwargs), "float64", mode)
    theirs = torch_trajectory(make_torch)
    assert relative_deviation(theirs[-1], THETA0) > 0.1  # it moved
    assert relative_deviation(ours, theirs) <= 1e-9


def test_radam_runs_both_branches():
    """With β2 = 1 - 2**-7, ρ_t passes 5 after a few steps: the test above
    covers the un-rectified start and the rectified steps."""
    rho_inf = 2 / (1 - BETAS[1]) - 1
    rho = [rho_inf - 2 * t * BETAS[1] ** t / (1 - BETAS[1] ** t) for t in range(1, STEPS + 1)]
    assert rho[0] <= 5 < rho[-1]


# -- SparseAdam ---------------------------------------------------------------

TABLE0 = np.random.default_rng(11).normal(size=(20, 4))


def sparse_rows(t):
    """Rows touched at step t, with a repeat."""
    return np.array([(3 * t) % 20, (5 * t + 1) % 20, (3 * t) % 20, 7])


def torch_sparse_trajectory():
    table = torch.tensor(TABLE0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SparseAdam([table], **TORCH)
    history = []
    for t in range(1, STEPS + 1):
        rows = torch.tensor(sparse_rows(t))
        with torch.no_grad():
            values = torch.sin(table[rows] * t) + 0.25
        table.grad = torch.sparse_coo_tensor(rows[None], values, table.shape, check_invariants=True)
        optimizer.step()
        history.append(table.detach().numpy().copy())
    return np.array(history)


def keras_sparse_trajectory(optimizer, mode, table0=TABLE0):
    table = keras.Variable(table0, dtype="float64")
    optimizer.build([table])

    def step(t, rows):
        values = tf.sin(tf.gather(table.value, rows) * tf.cast(t, "float64")) + 0.25
        gradient = tf.IndexedSlices(values, rows, tf.shape(table.value, out_type="int64"))
        optimizer.apply_gradients([(gradient, table)])

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    history = []
    for t in range(1, STEPS + 1):
        step(tf.constant(t, "int64"), tf.constant(sparse_rows(t), "int64"))
        history.append(table.numpy().copy())
    return np.array(history)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_lazy_sparse_matches_torch_sparse_adam(mode):
    ours = keras_sparse_trajectory(keras_adam.Adam(**COMMON, lazy_sparse=True), mode)
    theirs = torch_sparse_trajectory()
    assert relative_deviation(theirs[-1], TABLE0) > 0.05
    assert relative_deviation(ours, theirs) <= 1e-9
