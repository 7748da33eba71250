r"""The Adam update rule: the one place where the math of a step lives.

The `keras.ops` path of `keras_adam.Adam` (dense gradients, and lazy sparse
rows) computes its step with `adam_step`. The fused path implements the same
"hat" formula in C++, in one of three kernels: TensorFlow's
`ResourceApplyAdam`, one call per variable (under XLA, and wherever the
others are unavailable); the multi-tensor kernel of `keras_adam.kernels`
(`KerasAdamMultiTensorApplyAdam`, one call per step and dtype, outside XLA
on CPU); and, for lazy sparse rows, `KerasAdamSparseApplyAdam` (sums
repeated rows, then updates only the touched rows, outside XLA on CPU). The
two kernels of our own share one elementwise step
(`keras_adam/kernels/adam_step.h`) that repeats `ResourceApplyAdam`'s
arithmetic operation for operation. All are tested against `adam_step` to
round-off, and against each other. The tests also check `adam_step` against
independent oracles: a NumPy transcription of Kingma & Ba (2014),
`keras.optimizers.Adam` and `torch.optim`.

## Adam (Kingma & Ba, 2014)

With gradient $g_t$ at step $t \ge 1$, learning rate $\eta$ and decay rates
$\beta_1, \beta_2$:

$$
\begin{aligned}
m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2
\end{aligned}
$$

`epsilon_mode="hat"` (Keras, the default) is the paper's "more efficient"
ordering, given just before its Section 2.1:

$$
\theta_t = \theta_{t-1} - \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
    \cdot \frac{m_t}{\sqrt{v_t} + \hat\epsilon}
$$

`epsilon_mode="paper"` is Algorithm 1 itself (PyTorch, Optax):

$$
\hat m_t = \frac{m_t}{1-\beta_1^t},\quad \hat v_t = \frac{v_t}{1-\beta_2^t},\quad
\theta_t = \theta_{t-1} - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
$$

The two agree exactly when $\epsilon_t = \hat\epsilon / \sqrt{1-\beta_2^t}$:
a fixed $\hat\epsilon$ is a paper $\epsilon$ that starts large
($\hat\epsilon/\sqrt{1-\beta_2}$, about $31.6\,\hat\epsilon$ for
$\beta_2 = 0.999$) and shrinks to $\hat\epsilon$. To port `torch.optim.Adam(eps=1e-8)`
use `epsilon_mode="paper", epsilon=1e-8`.

## Variants

- **AMSGrad** (Reddi et al., 2018; Keras, `torch.optim.Adam(amsgrad=True)`):
  the denominator uses $\hat v^{\max}_t = \max(\hat v^{\max}_{t-1}, v_t)$,
  the running maximum of the raw $v_t$, bias-corrected as $v_t$ is.
- **Decoupled weight decay** (Loshchilov & Hutter; Keras's `weight_decay`,
  `torch.optim.AdamW`): $\theta \leftarrow \theta - \eta\lambda\theta$ before
  the Adam step.
- **L2 weight decay** (`torch.optim.Adam(weight_decay=λ)`):
  $g_t \leftarrow g_t + \lambda\theta_{t-1}$ before the moments.
- **Maximize** (`maximize=True` in torch): $g_t \leftarrow -g_t$ first, so
  the step climbs the objective.
- **Rectification** (RAdam, Liu et al., 2019; `torch.optim.RAdam`): with
  $\rho_\infty = 2/(1-\beta_2) - 1$ and
  $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$,
  $$
  \theta_t = \theta_{t-1} - \eta\,\hat m_t \cdot
  \begin{cases}
  r_t\, \dfrac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
  1 & \text{otherwise}
  \end{cases},
  \qquad
  r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}.
  $$
  torch adds $\epsilon$ to $\sqrt{v_t}$ as written (`epsilon_mode="hat"`);
  `epsilon_mode="paper"` uses $\sqrt{\hat v_t} + \epsilon$ instead.

Moments are updated in the form $m \leftarrow m + (g - m)(1-\beta_1)$, the
same rounding as Keras, so the default trajectory is bit-identical to
`keras.optimizers.Adam` in float32 and float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from keras import ops

#: Accepted values of `epsilon_mode`.
EPSILON_MODES = ("hat", "paper")


def compute_dtype(*dtypes: str) -> str:
    """The dtype in which a step is computed, given the dtypes it touches.

    float64 if any of the variable or its moments is float64, else float32:
    bfloat16 and float16 are widened. Keras instead computes in the
    variable's own dtype, where `beta_2=0.999` rounds to 1.0 in bfloat16 and
    the weights never move.

    Args:
        *dtypes: dtype names of the model variable and its moments.

    Returns:
        "float64" or "float32".
    """
    return "float64" if "float64" in dtypes else "float32"


class AdamState(NamedTuple):
    r"""The values one Adam step produces for one variable (or some of its rows).

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


def effective_gradient(
    grad: Any, param: Any, *, weight_decay: float, decoupled_weight_decay: bool, maximize: bool
) -> Any:
    r"""The gradient the moments see: negated to maximize, plus L2 decay.

    Args:
        grad: $g_t$.
        param: $\theta_{t-1}$.
        weight_decay: $\lambda$; 0 for none.
        decoupled_weight_decay: If True the decay is not added here (see
            `decoupled_decay`).
        maximize: Negate the gradient.

    Returns:
        $\pm g_t$, plus $\lambda\theta_{t-1}$ for L2 decay.
    """
    if maximize:
        grad = -grad
    if weight_decay and not decoupled_weight_decay:
        grad = grad + param * weight_decay
    return grad


def decoupled_decay(
    param: Any, *, weight_decay: float, decoupled_weight_decay: bool, lr: Any
) -> Any:
    r"""AdamW's $\theta \leftarrow \theta - \theta\lambda\eta$ (Keras's rounding).

    Args:
        param: $\theta_{t-1}$.
        weight_decay: $\lambda$; 0 for none.
        decoupled_weight_decay: If False this is the identity (L2 decay is
            in `effective_gradient`).
        lr: $\eta$, in `param`'s dtype.

    Returns:
        The decayed parameter.
    """
    if weight_decay and decoupled_weight_decay:
        param = param - param * weight_decay * lr
    return param


def adam_step(
    param: Any,
    grad: Any,
    m: Any,
    v: Any,
    *,
    step: Any,
    learning_rate: Any,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    v_hat: Any = None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    epsilon_mode: str = "hat",
    rectify: bool = False,
    maximize: bool = False,
) -> AdamState:
    r"""One elementwise step of Adam or a variant (see the module docstring).

    `param`, `grad`, `m`, `v` and `v_hat` must share one floating dtype, the
    computation dtype (see `compute_dtype`). Python-float hyperparameters are
    converted straight to that dtype, never through float32.

    Args:
        param: $\theta_{t-1}$.
        grad: $g_t$.
        m: $m_{t-1}$.
        v: $v_{t-1}$.
        step: $t \ge 1$, a scalar (any numeric dtype).
        learning_rate: $\eta$, a scalar.
        beta_1: $\beta_1 \in [0, 1)$.
        beta_2: $\beta_2 \in [0, 1)$.
        epsilon: $\hat\epsilon$ or $\epsilon$, by `epsilon_mode`.
        v_hat: With AMSGrad, the running maximum of $v$ so far; None without.
        weight_decay: $\lambda \ge 0$; 0 for none.
        decoupled_weight_decay: True for AdamW's
            $\theta \leftarrow \theta - \eta\lambda\theta$, False for L2
            ($g \leftarrow g + \lambda\theta$).
        epsilon_mode: "hat" ($\hat\epsilon$ added to $\sqrt{v_t}$) or "paper"
            ($\epsilon$ added to $\sqrt{\hat v_t}$).
        rectify: RAdam's variance rectification. Not with `v_hat`.
        maximize: Ascend the objective instead of descending it.

    Returns:
        The new `AdamState`.
    """
    dtype = param.dtype
    t = ops.cast(step, dtype)
    lr = ops.cast(learning_rate, dtype)
    grad = effective_gradient(
        grad,
        param,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
    )
    m = m + (grad - m) * (1 - beta_1)
    v = v + (ops.square(grad) - v) * (1 - beta_2)
    denominator_v = v
    if v_hat is not None:
        v_hat = ops.maximum(v_hat, v)
        denominator_v = v_hat
    param = decoupled_decay(
        param, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, lr=lr
    )
    beta_1_power = ops.power(ops.convert_to_tensor(beta_1, dtype=dtype), t)
    beta_2_power = ops.power(ops.convert_to_tensor(beta_2, dtype=dtype), t)

    if rectify:
        param = param - _rectified_update(
            m, denominator_v, t, lr, beta_2, beta_1_power, beta_2_power, epsilon, epsilon_mode
        )
    elif epsilon_mode == "hat":
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        param = param - (m * alpha) / (ops.sqrt(denominator_v) + epsilon)
    else:
        step_size = lr / (1 - beta_1_power)
        denominator = ops.sqrt(denominator_v) / ops.sqrt(1 - beta_2_power) + epsilon
        param = param - step_size * (m / denominator)
    return AdamState(param=param, m=m, v=v, v_hat=v_hat)


def _rectified_update(
    m: Any,
    v: Any,
    t: Any,
    lr: Any,
    beta_2: float,
    beta_1_power: Any,
    beta_2_power: Any,
    epsilon: float,
    epsilon_mode: str,
) -> Any:
    """RAdam's step: SGD with momentum until the variance is tractable."""
    m_hat = m / (1 - beta_1_power)
    rho_inf = 2 / (1 - beta_2) - 1
    if rho_inf <= 5:
        # rho_t < rho_inf <= 5 at every step: the rectified branch never runs.
        return m_hat * lr
    bias_correction_2 = 1 - beta_2_power
    rho_t = rho_inf - 2 * t * beta_2_power / bias_correction_2
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    rect = ops.sqrt(ops.maximum(ratio, 0.0))
    if epsilon_mode == "hat":
        adaptive = ops.sqrt(bias_correction_2) / (ops.sqrt(v) + epsilon)
    else:
        adaptive = 1 / (ops.sqrt(v) / ops.sqrt(bias_correction_2) + epsilon)
    return ops.where(rho_t > 5.0, m_hat * lr * adaptive * rect, m_hat * lr)
