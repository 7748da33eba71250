"""A NumPy transcription of Kingma & Ba (2014), written independently of the
package, used as an oracle.

`algorithm_1` is the paper's Algorithm 1 line by line. `efficient_form` is the
reordering the paper gives just before Section 2.1, with ε̂ added to √v_t
before bias correction (what Keras computes). Both accept AMSGrad (Reddi et
al. 2018: the denominator uses the running maximum of v_t) and decoupled
weight decay (Loshchilov & Hutter: θ ← θ − ηλθ before the Adam step).
"""

import numpy as np


def run(
    theta0,
    gradient,
    steps,
    *,
    alpha,
    beta1,
    beta2,
    eps,
    form="algorithm_1",
    amsgrad=False,
    weight_decay=0.0,
):
    """Return the list [θ_1, ..., θ_steps]; `gradient(theta, t)` gives g_t.

    `eps` is a number, or a function of t for a step-dependent ε.
    """
    theta = np.array(theta0, dtype=np.float64)
    m = np.zeros_like(theta)  # Initialize 1st moment vector
    v = np.zeros_like(theta)  # Initialize 2nd moment vector
    v_max = np.zeros_like(theta)
    history = []
    for t in range(1, steps + 1):
        g = gradient(theta, t)  # Get gradients w.r.t. stochastic objective at timestep t
        m = beta1 * m + (1 - beta1) * g  # Update biased first moment estimate
        v = beta2 * v + (1 - beta2) * g * g  # Update biased second raw moment estimate
        v_den = v
        if amsgrad:
            v_max = np.maximum(v_max, v)
            v_den = v_max
        theta = theta - alpha * weight_decay * theta
        eps_t = eps(t) if callable(eps) else eps
        if form == "algorithm_1":
            m_hat = m / (1 - beta1**t)  # Compute bias-corrected first moment estimate
            v_hat = v_den / (1 - beta2**t)  # Compute bias-corrected second raw moment estimate
            theta = theta - alpha * m_hat / (np.sqrt(v_hat) + eps_t)  # Update parameters
        elif form == "efficient":
            alpha_t = alpha * np.sqrt(1 - beta2**t) / (1 - beta1**t)
            theta = theta - alpha_t * m / (np.sqrt(v_den) + eps_t)
        else:
            raise ValueError(form)
        history.append(theta.copy())
    return history
