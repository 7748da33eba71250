"""Float64 parity on JAX: optax, NumPy and keras.optimizers.Adam, on every path.

`jax_enable_x64` is process-wide and read when JAX starts, so the runs are
made in a subprocess: this file, run as a script with `JAX_ENABLE_X64=1`,
prints the deviations as JSON, and the tests check them. 50 steps on a
non-quadratic problem whose gradient depends on the weights, in float64
(`floatx` too, so the learning-rate variable is float64 as well), on the
four paths of a step on JAX: eager with `fused` None (one compiled program)
and False (`keras.ops` op by op), and `jax.jit` of `stateless_apply` with
each.

The peers, and how their options map onto ours:

- `optax.adam(lr, b1, b2, eps)` (`eps_root=0`): Algorithm 1, ε added to
  √v̂: ours with `epsilon_mode="paper"`.
- `optax.adamw(..., weight_decay=λ)`: θ ← θ − η(u + λθ), where u is Adam's
  step, which does not depend on θ: exactly θ − ηλθ − ηu, Keras's decay
  before the step (θ ← θ − θλη, then the step): ours with `weight_decay=λ`.
- `optax.radam(lr, b1, b2, eps)`: r·m̂/(√v̂ + ε) once ρ_t ≥ 5, else m̂:
  ours with `rectify=True, epsilon_mode="paper"`.
- AMSGrad: optax's `amsgrad` takes the running maximum of the
  bias-corrected v̂_t (or, with `bias_correction_nu=False`, of the raw v_t
  without any bias correction); Keras, torch and ours take the maximum of
  the raw v_t and bias-correct it. No optax option is that, so ours is
  compared to a NumPy transcription instead (and the deviation from optax
  is reported, to show that the difference is real).
- `keras.optimizers.Adam`: bit-identical on the `keras.ops` path (eager
  `fused=False`; anything under `jax.jit`, where the program is Keras's);
  the eager compiled step is bit-identical to Keras under `jax.jit`, and
  round-off from Keras eagerly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

STEPS = 50
LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.999, 1e-8, 0.01
SHAPES = ((5, 3), (3,), (4,))
PATHS = ("eager-None", "eager-False", "jit-None", "jit-False")
OPTAX_PEERS = ("optax.adam", "optax.adamw", "optax.radam", "numpy.amsgrad")


def _worker() -> dict:
    """In the x64 subprocess: every deviation, as {name: float or bool}."""
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np
    import optax

    import keras_adam

    assert jax.config.jax_enable_x64 and keras.backend.backend() == "jax"
    keras.config.set_floatx("float64")

    rng = np.random.default_rng(0)
    initial = [rng.normal(size=shape) for shape in SHAPES]

    @jax.jit
    def gradient(values, data):
        phase = data.astype(values[0].dtype)
        return [jnp.sin(3 * v + phase) + 0.5 * v**3 for v in values]

    def run(make, path):
        """The weights after every step (one flat array per step) and the final state."""
        variables = [keras.Variable(x, dtype="float64") for x in initial]
        optimizer = make()
        optimizer.build(variables)
        step = jax.jit(lambda tv, ov, g: optimizer.stateless_apply(ov, g, tv))
        weights = [v.value for v in variables]
        state = [v.value for v in optimizer.variables]
        history = []
        for index in range(STEPS):
            if path == "eager":
                weights = [v.value for v in variables]
            grads = gradient(weights, jnp.asarray(index))
            if path == "eager":
                optimizer.apply(grads, variables)
                weights = [v.value for v in variables]
            else:
                weights, state = step(weights, state, grads)
            history.append(np.concatenate([np.ravel(np.asarray(w)) for w in weights]))
        if path == "eager":
            state = [v.value for v in optimizer.variables]
        return np.array(history), [np.asarray(s) for s in state]

    def optax_run(transform):
        params = [jnp.asarray(x) for x in initial]
        opt_state = transform.init(params)
        history = []
        for index in range(STEPS):
            grads = gradient(params, jnp.asarray(index))
            updates, opt_state = transform.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            history.append(np.concatenate([np.ravel(np.asarray(p)) for p in params]))
        return np.array(history)

    def numpy_amsgrad():
        """Reddi et al.'s AMSGrad as Keras and torch have it, with Algorithm 1's ε."""
        params = [x.copy() for x in initial]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        v_max = [np.zeros_like(p) for p in params]
        history = []
        for t in range(1, STEPS + 1):
            grads = [np.asarray(g) for g in gradient(params, jnp.asarray(t - 1))]
            for i, g in enumerate(grads):
                m[i] = B1 * m[i] + (1 - B1) * g
                v[i] = B2 * v[i] + (1 - B2) * g * g
                v_max[i] = np.maximum(v_max[i], v[i])
                m_hat = m[i] / (1 - B1**t)
                params[i] = params[i] - LR * m_hat / (np.sqrt(v_max[i] / (1 - B2**t)) + EPS)
            history.append(np.concatenate([np.ravel(p) for p in params]))
        return np.array(history)

    def deviation(actual, expected):
        return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))

    def identical(a, b):
        (history_a, state_a), (history_b, state_b) = a, b
        same = history_a.tobytes() == history_b.tobytes()
        return same and all(
            x.tobytes() == y.tobytes() for x, y in zip(state_a, state_b, strict=True)
        )

    results = {}
    hyper = dict(learning_rate=LR, beta_1=B1, beta_2=B2, epsilon=EPS, epsilon_mode="paper")
    peers = {
        "optax.adam": (optax_run(optax.adam(LR, B1, B2, EPS, eps_root=0.0)), {}),
        "optax.adamw": (
            optax_run(optax.adamw(LR, B1, B2, EPS, eps_root=0.0, weight_decay=WD)),
            {"weight_decay": WD},
        ),
        "optax.radam": (optax_run(optax.radam(LR, B1, B2, EPS)), {"rectify": True}),
        "numpy.amsgrad": (numpy_amsgrad(), {"amsgrad": True}),
    }
    for peer, (expected, options) in peers.items():
        for name in PATHS:
            path, fused = name.split("-")
            fused = None if fused == "None" else False

            def make(options=options, fused=fused):
                return keras_adam.Adam(fused=fused, **hyper, **options)

            results[f"{peer}|{name}"] = deviation(run(make, path)[0], expected)
    amsgrad = numpy_amsgrad()
    results["optax.amsgrad vs numpy.amsgrad"] = deviation(
        optax_run(optax.amsgrad(LR, B1, B2, EPS)), amsgrad
    )

    keras_runs = {path: run(lambda: keras.optimizers.Adam(LR), path) for path in ("eager", "jit")}
    for name in PATHS:
        path, fused = name.split("-")
        fused = None if fused == "None" else False
        ours = run(lambda fused=fused: keras_adam.Adam(LR, fused=fused), path)
        results[f"keras|{name}|vs eager"] = deviation(ours[0], keras_runs["eager"][0])
        results[f"keras|{name}|vs jit"] = deviation(ours[0], keras_runs["jit"][0])
        results[f"keras|{name}|identical to eager"] = identical(ours, keras_runs["eager"])
        results[f"keras|{name}|identical to jit"] = identical(ours, keras_runs["jit"])
    return results


@pytest.fixture(scope="module")
def results() -> dict:
    """The deviations, computed once in a subprocess with JAX_ENABLE_X64=1."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_ENABLE_X64="1")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("peer", OPTAX_PEERS)
def test_float64_matches_optax_and_numpy(results, peer, path):
    assert results[f"{peer}|{path}"] <= 1e-9


def test_optax_amsgrad_is_another_algorithm(results):
    """The reason AMSGrad is compared to NumPy: optax's maximum is of the bias-corrected v̂."""
    assert results["optax.amsgrad vs numpy.amsgrad"] > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_float64_matches_keras_adam(results, path):
    if path == "eager-False":
        # The keras.ops path, op by op, as Keras runs eagerly.
        assert results[f"keras|{path}|identical to eager"]
    else:
        # Compiled: Keras's own step under jax.jit; round-off from it eagerly.
        assert results[f"keras|{path}|identical to jit"]
        assert results[f"keras|{path}|vs eager"] <= 1e-13


if __name__ == "__main__":
    print(json.dumps(_worker()))
