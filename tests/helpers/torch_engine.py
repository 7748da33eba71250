"""The harness of tests/torch/ (the PyTorch engine, `keras_adam.backends.torch`:
torch's fused Adam kernels): the problem, runs of Keras and torch.optim
optimizers on it, and deviations. Imported only under `KERAS_BACKEND=torch`.

What tests/torch/ checks:

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

import keras
import numpy as np
import torch

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
