r"""The Adam update rule: the one place where the math of a step lives.

Every execution path of `keras_adam.Adam` computes its step through the two
functions below, and the tests check each path against an independent NumPy
transcription of Kingma & Ba (2014), Algorithm 1.

With gradient $g_t$, step $t \ge 1$, learning rate $\eta$ and decay rates
$\beta_1, \beta_2$:

$$
\begin{aligned}
m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
\alpha_t &= \eta\, \sqrt{1-\beta_2^t} \,/\, (1-\beta_1^t) \\
\theta_t &= \theta_{t-1} - \alpha_t\, m_t / (\sqrt{v_t} + \hat\epsilon)
\end{aligned}
$$

This is the paper's own "more efficient" ordering (the formula just before
its Section 2.1) and what `keras.optimizers.Adam` computes. Its
$\hat\epsilon$ is added to $\sqrt{v_t}$ *before* bias correction, whereas
Algorithm 1 (and PyTorch, Optax) add $\epsilon$ to $\sqrt{\hat v_t}$
afterwards. The two agree exactly when
$\hat\epsilon = \epsilon\sqrt{1-\beta_2^t}$, so a fixed $\hat\epsilon$
equals a paper $\epsilon$ that shrinks as $1/\sqrt{1-\beta_2^t}$ grows
towards 1.

Moments are updated in the form $m \leftarrow m + (g - m)(1-\beta_1)$, the
same rounding as Keras, so the trajectories agree to the last bits in
float32 and float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

#: Dtypes whose arithmetic is widened to float32 inside a step.
LOW_PRECISION_DTYPES = frozenset({"bfloat16", "float16"})


def compute_dtype(variable_dtype: str) -> str:
    """The dtype in which a step for a variable of `variable_dtype` is done.

    float64 variables are computed in float64; everything else (float32,
    bfloat16, float16) in float32. Keras instead computes in the variable's
    own dtype, where `beta_2=0.999` rounds to 1.0 in bfloat16 and the
    weights never move.

    Args:
        variable_dtype: The dtype name of the model variable.

    Returns:
        "float64" or "float32".
    """
    return "float64" if variable_dtype == "float64" else "float32"


def step_size(
    learning_rate: Any,
    beta_1: float,
    beta_2: float,
    step: Any,
    dtype: str,
) -> Any:
    r"""The bias-corrected step size $\alpha_t = \eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)$.

    The β's are converted straight from Python floats to `dtype`, never
    through float32, so float64 steps see the exact hyperparameters.

    Args:
        learning_rate: $\eta$, a scalar tensor or number.
        beta_1: $\beta_1$ as a Python float.
        beta_2: $\beta_2$ as a Python float.
        step: $t \ge 1$, a scalar tensor (any numeric dtype).
        dtype: The computation dtype, from `compute_dtype`.

    Returns:
        A scalar tensor of `dtype`.
    """
    lr = ops.cast(learning_rate, dtype)
    t = ops.cast(step, dtype)
    beta_1_power = ops.power(ops.convert_to_tensor(beta_1, dtype=dtype), t)
    beta_2_power = ops.power(ops.convert_to_tensor(beta_2, dtype=dtype), t)
    return lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)


class AdamState(NamedTuple):
    r"""The values one Adam step produces for one variable.

    Attributes:
        param: The new parameter value $\theta_t$.
        m: The new first moment $m_t$.
        v: The new second moment $v_t$.
        v_hat: The new running maximum of $v$ (AMSGrad), or None.
    """

    param: Any
    m: Any
    v: Any
    v_hat: Any = None


def adam_step(
    param: Any,
    grad: Any,
    m: Any,
    v: Any,
    *,
    alpha: Any,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    v_hat: Any = None,
    decay: Any = None,
) -> AdamState:
    r"""One elementwise Adam step, as Keras orders it.

    All tensors must already be in the computation dtype (see
    `compute_dtype`); scalars given as Python floats are converted straight
    to that dtype.

    Args:
        param: $\theta_{t-1}$.
        grad: $g_t$.
        m: $m_{t-1}$.
        v: $v_{t-1}$.
        alpha: The step size from `step_size`.
        beta_1: $\beta_1$.
        beta_2: $\beta_2$.
        epsilon: $\hat\epsilon$, added to $\sqrt{v_t}$ before bias
            correction.
        v_hat: With AMSGrad, the running maximum $\hat v_{t-1}$ of $v$; the
            denominator then uses $\max(\hat v_{t-1}, v_t)$. None without
            AMSGrad.
        decay: Decoupled weight decay as a pair `(weight_decay,
            learning_rate)`: $\theta \leftarrow \theta - \theta\lambda\eta$
            before the Adam update (AdamW, Loshchilov & Hutter). None for no
            decay.

    Returns:
        The new `AdamState`.
    """
    m = m + (grad - m) * (1 - beta_1)
    v = v + (ops.square(grad) - v) * (1 - beta_2)
    denominator_v = v
    if v_hat is not None:
        v_hat = ops.maximum(v_hat, v)
        denominator_v = v_hat
    if decay is not None:
        weight_decay, learning_rate = decay
        param = param - param * weight_decay * learning_rate
    param = param - (m * alpha) / (ops.sqrt(denominator_v) + epsilon)
    return AdamState(param=param, m=m, v=v, v_hat=v_hat)
