"""A float64 NumPy oracle for every variant of `keras_adam.Adam`.

Written from the papers and torch.optim's documented algorithms (Adam,
AdamW, AMSGrad, RAdam), independently of `keras_adam.update_rule`.
"""

import numpy as np


def run(theta0, gradient, steps, **hyper):
    """[θ_1, ..., θ_steps] for `gradient(theta, t)`, in float64; `hyper` as `step`'s."""
    theta = np.array(theta0, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    v_max = np.zeros_like(theta)
    history = []
    for t in range(1, steps + 1):
        theta, m, v, v_max = step(theta, gradient(theta, t), m, v, v_max, t, **hyper)
        history.append(theta.copy())
    return np.array(history)


def step(
    theta,
    g,
    m,
    v,
    v_max,
    t,
    *,
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    epsilon_mode="hat",
    amsgrad=False,
    weight_decay=0.0,
    decoupled_weight_decay=True,
    maximize=False,
    rectify=False,
):
    """One step t from state (θ, m, v, v_max) with gradient g: the new (θ, m, v, v_max)."""
    lr, b1, b2, eps = learning_rate, beta_1, beta_2, epsilon
    theta, g = np.asarray(theta, np.float64), np.asarray(g, np.float64)
    if maximize:
        g = -g
    if weight_decay and not decoupled_weight_decay:
        g = g + weight_decay * theta  # L2: torch.optim.Adam(weight_decay=λ)
    if weight_decay and decoupled_weight_decay:
        theta = theta - lr * weight_decay * theta  # AdamW
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_max = np.maximum(v_max, v)
    v_den = v_max if amsgrad else v
    bias_1 = 1 - b1**t
    bias_2 = 1 - b2**t
    if rectify:
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bias_2
        if rho_t > 5:
            r = np.sqrt(
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            )
            if epsilon_mode == "hat":
                adaptive = np.sqrt(bias_2) / (np.sqrt(v) + eps)
            else:
                adaptive = 1 / (np.sqrt(v / bias_2) + eps)
            theta = theta - lr * (m / bias_1) * r * adaptive
        else:
            theta = theta - lr * m / bias_1
    elif epsilon_mode == "hat":
        theta = theta - lr * np.sqrt(bias_2) / bias_1 * m / (np.sqrt(v_den) + eps)
    else:
        theta = theta - lr * (m / bias_1) / (np.sqrt(v_den / bias_2) + eps)
    return theta, m, v, v_max
