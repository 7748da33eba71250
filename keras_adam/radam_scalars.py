r"""RAdam's scalars ($1-\beta^t$, $\rho_t$, $r_t$) to about one rounding.

`torch.optim.RAdam` computes these scalars in Python floats (double) and
rounds each once. `keras_adam` computes them as tensors in the step's dtype
(float32 for float32 weights: JAX has no float64 by default), with formulas
that lose no more than a rounding or two where the textbook ones cancel:

- $\log\beta$ is taken in Python, and $1-\beta^t = -\operatorname{expm1}(t\log\beta)$
  (`one_minus_power`).
- With $a = -\log\beta_2$ and $g(y) = \coth y - 1/y$ (so that
  $\rho_\infty = \coth(a/2)$ and $2t\beta_2^t/(1-\beta_2^t) = t\coth(at/2) - t$),
  $$
  \rho_t = t\,\bigl(1 - g(at/2)\bigr) + g(a/2),
  $$
  a sum of two positive terms, where the textbook
  $\rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$ cancels (1999 - 1994 at
  $t = 5$ for $\beta_2 = 0.999$) (`rho`).
- $r_t$ from $\rho_t$ with its constant computed in Python (`rectification`).

`keras_adam.update_rule.step_scalars` calls these once per step; the error
bounds are tested in the RAdam precision tests on every backend.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from keras import backend, ops


def _constant(value: float, like: Any) -> Any:
    """A Python float as a scalar tensor of `like`'s dtype, rounded once."""
    return ops.convert_to_tensor(value, dtype=like.dtype)


def _coth_series_coefficients(count: int) -> tuple[float, ...]:
    r"""The Taylor coefficients of $g(y) = \coth y - 1/y$.

    $g(y) = \sum_{k \ge 1} c_k y^{2k-1}$ with $c_k = 2^{2k} B_{2k} / (2k)!$
    ($B_n$ the Bernoulli numbers: $c = 1/3, -1/45, 2/945, \ldots$). The
    series converges for $|y| < \pi$.

    Args:
        count: How many coefficients.

    Returns:
        $c_1, \ldots, c_{count}$, each rounded once from the exact fraction.
    """
    # Akiyama-Tanigawa: bernoulli[n] = B_n, exactly, with B_1 = +1/2.
    bernoulli, row = [], []
    for n in range(2 * count + 1):
        row.append(Fraction(1, n + 1))
        for j in range(n, 0, -1):
            row[j - 1] = j * (row[j - 1] - row[j])
        bernoulli.append(row[0])
    return tuple(
        float(4**k * bernoulli[2 * k] / math.factorial(2 * k)) for k in range(1, count + 1)
    )


#: Coefficients of `_coth_series_coefficients`: 16 terms reach double
#: precision for $y \le 1$ (the switch point of `_one_minus_g`), 7 float32.
_G_COEFFICIENTS = _coth_series_coefficients(16)
_G_TERMS = {"float64": 16, "float32": 7}
_G_SWITCH = 1.0


def _g(y: float) -> float:
    r"""$g(y) = \coth y - 1/y$ for a Python float $y > 0$, to double precision.

    Args:
        y: The argument.

    Returns:
        $g(y)$, without the cancellation of $\coth y - 1/y$ for small $y$.
    """
    if y >= _G_SWITCH:
        return 1 / math.tanh(y) - 1 / y
    series = 0.0
    for c in reversed(_G_COEFFICIENTS):
        series = series * y * y + c
    return y * series


def _one_minus_g(y: Any) -> Any:
    r"""$1 - g(y) = 1 - \coth y + 1/y$ for a tensor $y > 0$.

    $1/y - 2/\operatorname{expm1}(2y)$ for $y \ge 1$; below, where those two
    terms cancel, the Taylor series of $g$ (7 terms in float32, 16 in
    float64). Both are within about one rounding of the exact value: the
    worst float32 relative error over $y \in [10^{-6}, 50]$ is
    $2.1 \cdot 2^{-24}$ on TensorFlow, JAX and PyTorch, eager or compiled.

    Args:
        y: A floating tensor, $y > 0$.

    Returns:
        $1 - g(y)$, in $(0, 1)$, in `y`'s dtype.
    """
    dtype = backend.standardize_dtype(y.dtype)
    terms = _G_TERMS.get(dtype, _G_TERMS["float32"])
    switch = _constant(_G_SWITCH, y)
    small = ops.where(y < switch, y, switch)  # (ops.minimum drops float64 on torch)
    square = small * small
    series = _constant(_G_COEFFICIENTS[terms - 1], y)
    for c in reversed(_G_COEFFICIENTS[: terms - 1]):
        series = series * square + _constant(c, y)
    near_zero = 1 - small * series
    # expm1 overflows to inf for large y, and 2 / inf = 0 is the limit.
    away = 1 / y - 2 / ops.expm1(2 * y)
    return ops.where(y < switch, near_zero, away)


def one_minus_power(beta: float, t: Any) -> Any:
    r"""$1 - \beta^t$, to about one rounding in `t`'s dtype.

    Computed as $1 - e^{t \log\beta}$ (`_one_minus_exp`) with $\log\beta$
    taken in Python (double) and rounded once: `ops.power` on $\beta$ rounded
    to float32 carries that rounding $t$ times, then divides it by the small
    $1 - \beta^t$.

    Args:
        beta: $\beta \in [0, 1)$, a Python float.
        t: The step $t \ge 1$, a floating tensor.

    Returns:
        $1 - \beta^t$, in `t`'s dtype.
    """
    if beta == 0:
        return ops.ones_like(t)
    return _one_minus_exp(t * _constant(math.log(beta), t))


#: $1/k!$ for $k = 2, 3, \ldots$: the Taylor series of $(e^x - 1 - x)/x^2$.
_EXP_COEFFICIENTS = tuple(1 / math.factorial(k) for k in range(2, 19))
#: Terms of `_EXP_COEFFICIENTS` for $|x| \le \log 2$, by dtype.
_EXP_TERMS = {"float64": 17, "float32": 10}
_EXP_SWITCH = -math.log(2)


def _one_minus_exp(x: Any) -> Any:
    r"""$1 - e^x = -\operatorname{expm1}(x)$ for a tensor $x \le 0$.

    In float32, `ops.expm1` is off by up to $3.6 \cdot 2^{-24}$ (relative) on
    TensorFlow and $4.8 \cdot 2^{-24}$ under XLA (JAX, `jit_compile=True`)
    for $x \in [-1, 0]$; PyTorch's is within $2^{-24}$. Here: $-(x + x^2 p(x))$
    with $p$ the Taylor series of $(e^x - 1 - x)/x^2$ for $x \ge -\log 2$,
    where $x^2 p(x)$ is a small correction to the exact $x$; below,
    $1 - e^x$ with $e^x \le 1/2$. Within $1.5 \cdot 2^{-24}$ in float32 on
    the three backends, eager or compiled.

    Args:
        x: A floating tensor, $x \le 0$.

    Returns:
        $1 - e^x$, in `x`'s dtype.
    """
    dtype = backend.standardize_dtype(x.dtype)
    terms = _EXP_TERMS.get(dtype, _EXP_TERMS["float32"])
    switch = _constant(_EXP_SWITCH, x)
    near = ops.where(x >= switch, x, switch)  # (ops.maximum drops float64 on torch)
    series = _constant(_EXP_COEFFICIENTS[terms - 1], x)
    for c in reversed(_EXP_COEFFICIENTS[: terms - 1]):
        series = series * near + _constant(c, x)
    return ops.where(x >= switch, -(near + near * near * series), 1 - ops.exp(x))


def rho(beta_2: float, t: Any) -> Any:
    r"""RAdam's $\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)$, to about one rounding.

    With $a = -\log\beta_2$ and $g(y) = \coth y - 1/y$, exactly
    $\rho_\infty = \coth(a/2) = 2/a + g(a/2)$ and
    $2t\beta_2^t / (1 - \beta_2^t) = t\coth(at/2) - t = 2/a + t\,g(at/2) - t$, so
    $$
    \rho_t = t\,\bigl(1 - g(at/2)\bigr) + g(a/2),
    $$
    two positive terms: no cancellation. $g(a/2)$ is a Python float;
    $1 - g$ is `_one_minus_g`. For $t \le 10^4$ and
    $\beta_2 \in \{0.9, 0.99, 0.999, 0.9999\}$ the float32 relative error is
    at most $3.3 \cdot 2^{-24}$ on TensorFlow, JAX and PyTorch (the textbook
    formula from `ops.power` of float32 $\beta_2$: up to $5.6 \cdot 10^7 \cdot 2^{-24}$).

    Args:
        beta_2: $\beta_2 \in (0, 1)$, a Python float.
        t: The step $t \ge 1$, a floating tensor.

    Returns:
        $\rho_t$, in `t`'s dtype.
    """
    half_a = -0.5 * math.log(beta_2)
    return t * _one_minus_g(t * _constant(half_a, t)) + _constant(_g(half_a), t)


def rectification(beta_2: float, rho_t: Any) -> Any:
    r"""RAdam's $r_t$ (used where $\rho_t > 5$; 0 where it is not real).

    $r_t = \sqrt{C (\rho_t - 4)(\rho_t - 2)/\rho_t}$ with
    $C = \rho_\infty / ((\rho_\infty - 4)(\rho_\infty - 2))$ computed in
    Python and rounded once. Near $\rho_t = 5$, $r_t$ is up to 2.8 times as
    sensitive (relatively) as $\rho_t$: $3.6 \cdot 2^{-24}$ at worst in
    float32 where $\rho_t > 5$.

    Args:
        beta_2: $\beta_2$, a Python float with $\rho_\infty > 4$.
        rho_t: $\rho_t$, a floating tensor (see `rho`).

    Returns:
        $r_t$, in `rho_t`'s dtype.
    """
    rho_inf = 2 / (1 - beta_2) - 1
    scale = _constant(rho_inf / ((rho_inf - 4) * (rho_inf - 2)), rho_t)
    ratio = (rho_t - 4) * (rho_t - 2) / rho_t * scale
    # ops.maximum(ratio, 0.0) would be float32 for float64 on torch (Keras 3.15).
    return ops.sqrt(ops.where(ratio > 0, ratio, ops.zeros_like(ratio)))
