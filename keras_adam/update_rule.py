r"""The Adam update rule: the one place where the math of a step lives.

Two things live here, and nowhere else:

- `step_scalars`: a step's scalars (η, β, 1 − β as Keras computes them, the
  bias-corrected step size α, ε, RAdam's ρ_t and r_t) in one frozen
  `StepScalars`, built once per step and compute dtype by the backend's
  engine (`keras_adam.backends`).
- `adam_step`: the elementwise step of one variable, given those scalars,
  in `keras.ops` (the reference path, on every backend, compiled by XLA on
  JAX and under `jit_compile=True`).

The fused paths (our TensorFlow kernels, torch's fused Adam kernels) take
the same `StepScalars` and are tested against `adam_step`, which is tested
against independent oracles: a NumPy transcription of Kingma & Ba (2014),
`keras.optimizers.Adam`, `torch.optim` and `optax`. See the Architecture
page of the documentation for how a step reaches them.

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

  Its scalars are computed to about one rounding in the computation
  dtype (`keras_adam.radam_scalars`), as torch gets them in Python floats.

Moments are updated in the form $m \leftarrow m + (g - m)(1-\beta_1)$, the
same rounding as Keras, so the default trajectory is bit-identical to
`keras.optimizers.Adam` in float32 and float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from keras_adam import radam_scalars

#: Accepted values of `epsilon_mode`.
EPSILON_MODES = ("hat", "paper")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    r"""The Python-number hyperparameters and flags of Adam's update rule.

    Built by `keras_adam.Adam` from its arguments for each step; the engine
    turns it into a step's `StepScalars` (`step_scalars`).

    Attributes:
        beta_1: $\beta_1 \in [0, 1)$.
        beta_2: $\beta_2 \in [0, 1)$.
        epsilon: $\hat\epsilon$ or $\epsilon$, by `epsilon_mode`.
        weight_decay: $\lambda \ge 0$; 0 for none.
        decoupled_weight_decay: AdamW's $\theta \leftarrow \theta - \eta\lambda\theta$
            (True) or L2, $g \leftarrow g + \lambda\theta$ (False).
        epsilon_mode: "hat" ($\hat\epsilon$ added to $\sqrt{v_t}$) or "paper"
            ($\epsilon$ added to $\sqrt{\hat v_t}$).
        amsgrad: Keep the running maximum of $v$ (AMSGrad).
        rectify: RAdam's variance rectification.
        maximize: Ascend the objective instead of descending it.
    """

    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = True
    epsilon_mode: str = "hat"
    amsgrad: bool = False
    rectify: bool = False
    maximize: bool = False

    def without_weight_decay(self) -> Hyperparameters:
        r"""The same with $\lambda = 0$ (for a variable excluded from decay)."""
        return dataclasses.replace(self, weight_decay=0.0) if self.weight_decay else self


@dataclasses.dataclass(frozen=True)
class StepScalars:
    r"""Everything scalar about one step, in one compute dtype.

    Built once per step and dtype by `step_scalars`, and taken by every
    execution path: `adam_step` (the `keras.ops` path), our TensorFlow
    kernels and torch's fused kernels. Tensors are scalars of `dtype`;
    floats are Python floats, rounded once where a path converts them.

    Attributes:
        hyper: The hyperparameters and flags.
        dtype: The compute dtype ("float32" or "float64").
        step: $t \ge 1$, a tensor.
        learning_rate: $\eta$, a tensor.
        one_minus_beta_1: $1 - \beta_1$, computed as Keras computes it (in
            Python, so rounded once into `dtype`).
        one_minus_beta_2: $1 - \beta_2$, likewise.
        beta_1_power: $\beta_1^t$, a tensor (`ops.power` of $\beta_1$ rounded
            to `dtype`, as Keras).
        beta_2_power: $\beta_2^t$, likewise.
        alpha: The bias-corrected step size, a tensor:
            $\eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)$ with `epsilon_mode="hat"`,
            $\eta/(1-\beta_1^t)$ with "paper".
        bias_correction_2_sqrt: $\sqrt{1-\beta_2^t}$, a tensor.
        radam: With `rectify`, RAdam's scalars; else None.
    """

    hyper: Hyperparameters
    dtype: str
    step: Any
    learning_rate: Any
    one_minus_beta_1: float
    one_minus_beta_2: float
    beta_1_power: Any
    beta_2_power: Any
    alpha: Any
    bias_correction_2_sqrt: Any
    radam: RAdamScalars | None = None

    @property
    def epsilon(self) -> float:
        r"""$\hat\epsilon$ or $\epsilon$, by `hyper.epsilon_mode`."""
        return self.hyper.epsilon

    def with_hyper(self, hyper: Hyperparameters) -> StepScalars:
        """The same scalars for other flags or decay (same β, ε and mode)."""
        return dataclasses.replace(self, hyper=hyper) if hyper != self.hyper else self


class RAdamScalars(NamedTuple):
    r"""RAdam's scalars of one step (`keras_adam.radam_scalars`).

    Attributes:
        bias_correction_1: $1 - \beta_1^t$.
        bias_correction_2_sqrt: $\sqrt{1 - \beta_2^t}$, or None when
            $\rho_\infty \le 5$ (the rectified branch never runs).
        rectified: $\rho_t > 5$, a boolean tensor (None likewise).
        rectification: $r_t$ (None likewise).
    """

    bias_correction_1: Any
    bias_correction_2_sqrt: Any = None
    rectified: Any = None
    rectification: Any = None


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


def step_scalars(hyper: Hyperparameters, step: Any, learning_rate: Any, dtype: str) -> StepScalars:
    r"""A step's scalars in `dtype`, as `keras.optimizers.Adam.update_step` computes them.

    Args:
        hyper: The hyperparameters and flags.
        step: $t \ge 1$, a scalar (any numeric dtype; Keras's
            `iterations + 1`).
        learning_rate: $\eta$, a scalar tensor, variable or float.
        dtype: The compute dtype (see `compute_dtype`).

    Returns:
        The `StepScalars`.
    """
    t = ops.cast(step, dtype)
    lr = ops.cast(learning_rate, dtype)
    beta_1_power = ops.power(ops.convert_to_tensor(hyper.beta_1, dtype=dtype), t)
    beta_2_power = ops.power(ops.convert_to_tensor(hyper.beta_2, dtype=dtype), t)
    radam = _radam_scalars(hyper.beta_1, hyper.beta_2, t) if hyper.rectify else None
    return _assemble(hyper, dtype, t, lr, beta_1_power, beta_2_power, ops.sqrt, radam)


def _assemble(
    hyper: Hyperparameters,
    dtype: str,
    t: Any,
    lr: Any,
    beta_1_power: Any,
    beta_2_power: Any,
    sqrt: Any,
    radam: RAdamScalars | None = None,
) -> StepScalars:
    """The `StepScalars` from $t$, η and the β powers, in the dtype they have.

    Written with operators and `sqrt` only, so that tensors (`step_scalars`)
    and NumPy scalars (`host_step_scalars`) compute the same formulas.
    """
    bias_correction_2_sqrt = sqrt(1 - beta_2_power)
    if hyper.epsilon_mode == "hat":
        alpha = lr * bias_correction_2_sqrt / (1 - beta_1_power)
    else:
        alpha = lr / (1 - beta_1_power)
    return StepScalars(
        hyper=hyper,
        dtype=dtype,
        step=t,
        learning_rate=lr,
        one_minus_beta_1=1 - hyper.beta_1,
        one_minus_beta_2=1 - hyper.beta_2,
        beta_1_power=beta_1_power,
        beta_2_power=beta_2_power,
        alpha=alpha,
        bias_correction_2_sqrt=bias_correction_2_sqrt,
        radam=radam,
    )


def _radam_scalars(beta_1: float, beta_2: float, t: Any) -> RAdamScalars:
    """RAdam's scalars at step `t` (a tensor of the compute dtype)."""
    bias_correction_1 = radam_scalars.one_minus_power(beta_1, t)
    rho_inf = 2 / (1 - beta_2) - 1
    if rho_inf <= 5:
        # rho_t < rho_inf <= 5 at every step: the rectified branch never runs.
        return RAdamScalars(bias_correction_1)
    rho_t = radam_scalars.rho(beta_2, t)
    return RAdamScalars(
        bias_correction_1,
        ops.sqrt(radam_scalars.one_minus_power(beta_2, t)),
        rho_t > 5.0,
        radam_scalars.rectification(beta_2, rho_t),
    )


def host_step_scalars(
    hyper: Hyperparameters, step: float, learning_rate: float, dtype: str
) -> StepScalars:
    r"""`step_scalars` computed on the host, in NumPy scalars of `dtype`.

    For paths that take their scalars as host numbers (torch's fused
    kernels). The same formulas, in the same order and dtype, as
    `step_scalars`. Without RAdam's scalars (no host path rectifies).

    Args:
        hyper: The hyperparameters and flags.
        step: $t \ge 1$.
        learning_rate: $\eta$.
        dtype: The compute dtype ("float32" or "float64").

    Returns:
        The `StepScalars`, whose scalars are NumPy scalars.
    """
    real = np.dtype(dtype).type
    t = real(step)
    beta_1_power = np.power(real(hyper.beta_1), t)
    beta_2_power = np.power(real(hyper.beta_2), t)
    return _assemble(hyper, dtype, t, real(learning_rate), beta_1_power, beta_2_power, np.sqrt)


def torch_kernel_scalars(scalars: StepScalars) -> tuple[float, float]:
    r"""The `lr` and `eps` that make torch's fused Adam kernels take this step.

    torch's kernels compute $1-\beta^t$ in double from the exact β and
    their step, then $\theta \mathrel{-}= \frac{lr}{1-\beta_1^t}\, m /
    (\sqrt{v}/\sqrt{1-\beta_2^t} + eps)$. With `epsilon_mode="hat"` they
    are given $eps = \hat\epsilon/\sqrt{1-\beta_2^t}$ and
    $lr = \alpha\,(1-\beta_1^t)/\sqrt{1-\beta_2^t}$ in those double bias
    corrections, so that they step by `scalars.alpha`, Keras's step size
    (from β rounded to the compute dtype). With "paper" they are torch's
    own `lr` and `eps`.

    Args:
        scalars: The step's scalars, on the host (`host_step_scalars`).

    Returns:
        `(lr, eps)`, Python floats.
    """
    hyper = scalars.hyper
    if hyper.epsilon_mode != "hat":
        return float(scalars.learning_rate), hyper.epsilon
    step = float(scalars.step)
    bias_correction_1 = 1.0 - hyper.beta_1**step
    bias_correction_2_sqrt = math.sqrt(1.0 - hyper.beta_2**step)
    return (
        float(scalars.alpha) * bias_correction_1 / bias_correction_2_sqrt,
        hyper.epsilon / bias_correction_2_sqrt,
    )


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


def effective_gradient(grad: Any, param: Any, hyper: Hyperparameters) -> Any:
    r"""The gradient the moments see: negated to maximize, plus L2 decay.

    `keras.ops` functions, not Python operators, so that a sparse gradient
    (JAX's `BCOO`) is combined with dense tensors as Keras combines it.

    Args:
        grad: $g_t$.
        param: $\theta_{t-1}$.
        hyper: The flags and $\lambda$ (0 for none).

    Returns:
        $\pm g_t$, plus $\lambda\theta_{t-1}$ for L2 decay.
    """
    if hyper.maximize:
        grad = ops.negative(grad)
    if hyper.weight_decay and not hyper.decoupled_weight_decay:
        # g + θλ, written g − θ·(−λ) (the same number): Keras's TensorFlow
        # `ops.add` takes some shapes for a bias (`BiasAdd`), which refuses
        # empty tensors; `ops.subtract` is a plain subtraction everywhere.
        grad = ops.subtract(grad, param * -hyper.weight_decay)
    return grad


def decoupled_decay(param: Any, hyper: Hyperparameters, lr: Any) -> Any:
    r"""AdamW's $\theta \leftarrow \theta - \theta\lambda\eta$ (Keras's rounding).

    Args:
        param: $\theta_{t-1}$.
        hyper: The flags and $\lambda$; without decoupled decay this is the
            identity (L2 decay is in `effective_gradient`).
        lr: $\eta$, in `param`'s dtype.

    Returns:
        The decayed parameter.
    """
    if hyper.weight_decay and hyper.decoupled_weight_decay:
        param = param - param * hyper.weight_decay * lr
    return param


def adam_step(param: Any, grad: Any, m: Any, v: Any, v_hat: Any, scalars: StepScalars) -> AdamState:
    r"""One elementwise step of Adam or a variant (see the module docstring).

    `param`, `grad`, `m`, `v` and `v_hat` share one floating dtype, the
    computation dtype of `scalars`. `grad` may be sparse where Keras's
    backend has sparse tensors (JAX's `BCOO`): it is combined with the dense
    moments by `keras.ops`, as in Keras.

    Args:
        param: $\theta_{t-1}$.
        grad: $g_t$.
        m: $m_{t-1}$.
        v: $v_{t-1}$.
        v_hat: With AMSGrad, the running maximum of $v$ so far; None without.
        scalars: The step's scalars (`step_scalars`).

    Returns:
        The new `AdamState`.
    """
    hyper = scalars.hyper
    grad = effective_gradient(grad, param, hyper)
    m = m + ops.subtract(grad, m) * scalars.one_minus_beta_1
    v = v + ops.subtract(ops.square(grad), v) * scalars.one_minus_beta_2
    denominator_v = v
    if v_hat is not None:
        # max(v_hat, v), NaN propagating as in ops.maximum, which Keras 3.15
        # computes in float32 for float64 tensors on torch.
        v_hat = ops.where(ops.logical_or(v > v_hat, ops.isnan(v)), v, v_hat)
        denominator_v = v_hat
    param = decoupled_decay(param, hyper, scalars.learning_rate)
    if scalars.radam is not None:
        param = param - _rectified_update(m, denominator_v, scalars)
    elif hyper.epsilon_mode == "hat":
        param = param - (m * scalars.alpha) / (ops.sqrt(denominator_v) + hyper.epsilon)
    else:
        denominator = ops.sqrt(denominator_v) / scalars.bias_correction_2_sqrt + hyper.epsilon
        param = param - scalars.alpha * (m / denominator)
    return AdamState(param=param, m=m, v=v, v_hat=v_hat)


def _rectified_update(m: Any, v: Any, scalars: StepScalars) -> Any:
    r"""RAdam's step: SGD with momentum until the variance is tractable.

    Args:
        m: $m_t$.
        v: $v_t$ (or its running maximum).
        scalars: The step's scalars, with `radam`.

    Returns:
        The amount to subtract from the parameter.
    """
    radam, lr, epsilon = scalars.radam, scalars.learning_rate, scalars.hyper.epsilon
    m_hat = m / radam.bias_correction_1
    if radam.rectified is None:
        return m_hat * lr
    if scalars.hyper.epsilon_mode == "hat":
        adaptive = radam.bias_correction_2_sqrt / (ops.sqrt(v) + epsilon)
    else:
        adaptive = 1 / (ops.sqrt(v) / radam.bias_correction_2_sqrt + epsilon)
    return ops.where(radam.rectified, m_hat * lr * adaptive * radam.rectification, m_hat * lr)
