"""The JAX engine (`keras_adam.backends.jax`): every flag on every path.

Runs only under `KERAS_BACKEND=jax` (see conftest.py), which gives this
process two virtual CPU devices. The paths of a step on JAX:

- "eager": `optimizer.apply` outside any trace. With `fused` None or True
  the whole step is one compiled program; with `fused=False`, `keras.ops`
  op by op.
- "jit": `jax.jit` of `optimizer.stateless_apply` (whatever `fused` says).
- `model.fit` with `jit_compile` True and False.

References are independent: `keras.optimizers.Adam` on the same gradients
(transformed, for maximize and L2 decay), optax, a NumPy transcription, and
for `skip_nonfinite` the same run with the bad step left out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import optax
import pytest

import keras_adam
from keras_adam import update_rule

SHAPES = ((5, 3), (3,), (4,))
STEPS = 8
ROUND_OFF = 2e-6  # float32, relative to the largest |value|


def _initial(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in SHAPES]


@jax.jit
def _gradient(values: list, data: jax.Array) -> list:
    """A gradient that depends on the weights (so errors feed back) and the data index."""
    phase = data.astype(values[0].dtype)
    return [jnp.sin(3 * v + phase) + 0.5 * v**3 for v in values]


class State(NamedTuple):
    """Weights, and the optimizer's variables by position and kind ("3:momentum")."""

    weights: list
    optimizer: dict

    def without(self, kind: str) -> State:
        kept = {k: v for k, v in self.optimizer.items() if not k.endswith(f":{kind}")}
        return State(self.weights, kept)


def _state(variables: list, optimizer: keras.optimizers.Optimizer) -> State:
    """The state, named independently of the variables' and optimizers' names."""
    return State(
        [np.asarray(v.value) for v in variables],
        {
            f"{i}:{v.path.rsplit('/', 1)[-1].rsplit('_', 1)[-1]}": np.asarray(v.value)
            for i, v in enumerate(optimizer.variables)
        },
    )


def run(
    make,
    path: str,
    data=range(STEPS),
    poison: dict | None = None,
    transform=None,
    scale: float = 1.0,
    dtype: str = "float32",
) -> State:
    """Steps of the optimizer `make()` on `_gradient`, on one path.

    Args:
        make: Builds the optimizer.
        path: "eager" (`apply`) or "jit" (`jax.jit` of `stateless_apply`).
        data: The data index of each step.
        poison: Step number -> a value (NaN, inf) written into one element
            of the first variable's gradient at that step.
        transform: `(grads, weights) -> grads` applied before the optimizer.
        scale: Gradients are multiplied by it (loss scaling).
        dtype: The variables' dtype.
    """
    variables = [keras.Variable(x, dtype=dtype) for x in _initial()]
    optimizer = make()
    optimizer.build(variables)
    step = jax.jit(lambda tv, ov, g: optimizer.stateless_apply(ov, g, tv))
    weights = [v.value for v in variables]
    optimizer_values = [v.value for v in optimizer.variables]
    for i, index in enumerate(data):
        if path == "eager":
            weights = [v.value for v in variables]
        grads = _gradient(weights, jnp.asarray(index))
        if poison and i in poison:
            grads[0] = grads[0].at[0, 0].set(poison[i])
        grads = [g * scale for g in grads]
        if transform is not None:
            grads = transform(grads, weights)
        if path == "eager":
            optimizer.apply(grads, variables)
        else:
            weights, optimizer_values = step(weights, optimizer_values, grads)
    if path == "jit":
        for variable, value in zip(variables, weights, strict=True):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, optimizer_values, strict=True):
            variable.assign(value)
    for variable in [*variables, *optimizer.variables]:
        assert not isinstance(variable.value, jax.core.Tracer), variable.path
    return _state(variables, optimizer)


def deviation(actual: State, expected: State) -> float:
    """Largest |difference| relative to the largest |expected|, over weights and state."""
    pairs = list(zip(actual.weights, expected.weights, strict=True))
    assert len(actual.optimizer) == len(expected.optimizer)
    pairs += list(zip(actual.optimizer.values(), expected.optimizer.values(), strict=True))
    worst = 0.0
    for a, e in pairs:
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape
        scale = max(float(np.max(np.abs(e))), 1e-30) if e.size else 1.0
        worst = max(worst, float(np.max(np.abs(a - e), initial=0.0)) / scale)
    return worst


def _bits(x: np.ndarray) -> np.ndarray:
    return np.atleast_1d(x).view(np.uint8)


def assert_identical(actual: State, expected: State) -> None:
    """Bit for bit (NaN and signed zeros included)."""
    for a, e in zip(actual.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(e))
    assert list(actual.optimizer) == list(expected.optimizer)
    for name, a in actual.optimizer.items():
        e = expected.optimizer[name]
        assert a.dtype == e.dtype, name
        np.testing.assert_array_equal(_bits(a), _bits(e), err_msg=name)


# -- every Keras option: bit-identical to keras.optimizers.Adam -----------------

KERAS_OPTIONS = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight_decay": {"weight_decay": 0.05},
    "clipnorm": {"clipnorm": 0.5},
    "clipvalue": {"clipvalue": 0.2},
    "global_clipnorm": {"global_clipnorm": 0.5},
    "loss_scale_factor": {"loss_scale_factor": 64.0},
    "schedule": {
        "learning_rate": keras.optimizers.schedules.ExponentialDecay(
            0.01, decay_steps=3, decay_rate=0.5
        )
    },
    "ema": {"use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 5},
    "gradient_accumulation": {"gradient_accumulation_steps": 3},
    "all": {
        "amsgrad": True,
        "weight_decay": 0.05,
        "global_clipnorm": 0.5,
        "loss_scale_factor": 8.0,
        "use_ema": True,
        "ema_overwrite_frequency": 4,
        "gradient_accumulation_steps": 2,
    },
}


def _options(name: str) -> dict:
    options = dict(KERAS_OPTIONS[name])
    options.setdefault("learning_rate", 0.01)
    return options


@functools.cache
def keras_run(name: str, path: str) -> State:
    options = _options(name)
    scale = options.get("loss_scale_factor") or 1.0
    return run(lambda: keras.optimizers.Adam(**options), path, scale=scale)


# On the keras.ops path (fused=False eagerly, anything under jax.jit) the
# trajectory is Keras's own, bit for bit. The eager compiled step is the
# program jax.jit makes of Keras's own step: bit-identical to Keras under
# jax.jit, and round-off from Keras eagerly.
PATHS = {
    ("eager", False): "eager",
    ("jit", None): "jit",
    ("jit", False): "jit",
    ("eager", None): "jit",
}
# Keras's eager gradient accumulation runs `jax.lax.cond` op by op, which
# compiles its branches at every step: these take seconds per eager run, and
# are compared on the compiled paths only.
SLOW_EAGERLY = ("gradient_accumulation", "all")


@pytest.mark.parametrize(
    "name, path, fused",
    [
        (name, path, fused)
        for name in KERAS_OPTIONS
        for path, fused in PATHS
        if not (name in SLOW_EAGERLY and (path, fused) == ("eager", False))
    ],
)
def test_keras_options_match_keras_adam(name, path, fused):
    options = _options(name)
    scale = options.get("loss_scale_factor") or 1.0
    ours = run(lambda: keras_adam.Adam(fused=fused, **options), path, scale=scale)
    assert_identical(ours, keras_run(name, PATHS[path, fused]))
    if (path, fused) == ("eager", None) and name not in SLOW_EAGERLY:
        # And round-off from Keras's eager steps.
        assert deviation(ours, keras_run(name, "eager")) <= ROUND_OFF


def test_moment_dtype_of_the_variable_is_keras_adam():
    ours = run(lambda: keras_adam.Adam(learning_rate=0.01, moment_dtype="float32"), "jit")
    assert_identical(ours, keras_run("plain", "jit"))


# -- our own flags, against transformed Keras runs, optax, NumPy ----------------


def _negated(grads, weights):
    return [-g for g in grads]


def _l2(grads, weights):
    return [g + w * 0.05 for g, w in zip(grads, weights, strict=True)]


def _optax_run(transform: optax.GradientTransformation) -> State:
    params = [jnp.asarray(x, "float32") for x in _initial()]
    state = transform.init(params)
    for index in range(STEPS):
        grads = _gradient(params, jnp.asarray(index))
        updates, state = transform.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return State([np.asarray(p) for p in params], {})


def _numpy_bfloat16_moments() -> State:
    """Adam with m and v stored in bfloat16, the step in float32 (as `compute_dtype`)."""
    f32 = np.float32
    params = [x.astype(f32) for x in _initial()]
    ms = [np.zeros_like(p).astype(ml_dtypes.bfloat16) for p in params]
    vs = [np.zeros_like(p).astype(ml_dtypes.bfloat16) for p in params]
    for t, index in enumerate(range(STEPS), start=1):
        grads = [np.asarray(g) for g in _gradient(params, jnp.asarray(index))]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            m = ms[i].astype(f32) + (g - ms[i].astype(f32)) * f32(0.1)
            v = vs[i].astype(f32) + (g * g - vs[i].astype(f32)) * f32(1 - 0.999)
            alpha = (
                f32(0.01) * np.sqrt(f32(1) - f32(0.999) ** f32(t)) / (f32(1) - f32(0.9) ** f32(t))
            )
            params[i] = p - (m * alpha) / (np.sqrt(v) + f32(1e-7))
            ms[i], vs[i] = m.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)
    return State(params, {})


@functools.cache
def own_flag_reference(name: str) -> tuple[State, float]:
    """The reference run of one of our flags, and how close (relative) ours must be."""
    keras_adam_options = {"learning_rate": 0.01}
    if name == "maximize":
        return run(
            lambda: keras.optimizers.Adam(**keras_adam_options), "eager", transform=_negated
        ), 0
    if name == "l2_weight_decay":
        return run(lambda: keras.optimizers.Adam(**keras_adam_options), "eager", transform=_l2), 0
    if name == "epsilon_mode_paper":
        return _optax_run(optax.adam(0.01, eps=1e-7)), 1e-5
    if name == "rectify":
        # optax computes rho_t as rho_inf - 2t b2^t / (1 - b2^t), which cancels
        # in float32 (ours is to one rounding): the x64 test compares to 1e-9.
        return _optax_run(optax.radam(0.01, eps=1e-7)), 1e-4
    if name == "moment_dtype_bfloat16":
        return _numpy_bfloat16_moments(), 1e-5
    raise KeyError(name)


OWN_FLAGS = {
    "maximize": {"maximize": True},
    "l2_weight_decay": {"weight_decay": 0.05, "decoupled_weight_decay": False},
    "epsilon_mode_paper": {"epsilon_mode": "paper"},
    "rectify": {"rectify": True, "epsilon_mode": "paper"},
    "moment_dtype_bfloat16": {"moment_dtype": "bfloat16"},
}


@pytest.mark.parametrize("path, fused", [("eager", None), ("eager", False), ("jit", None)])
@pytest.mark.parametrize("name", list(OWN_FLAGS))
def test_own_flags_match_their_references(name, path, fused):
    make = functools.partial(keras_adam.Adam, learning_rate=0.01, fused=fused, **OWN_FLAGS[name])
    ours = run(make, path)
    expected, tolerance = own_flag_reference(name)
    if name in ("maximize", "l2_weight_decay") and (path, fused) != ("eager", False):
        tolerance = ROUND_OFF  # the compiled programs round a few operations differently
    got = deviation(State(ours.weights, {}), State(expected.weights, {}))
    assert got <= tolerance, f"{name} on {path} fused={fused}: {got:.3g} > {tolerance:.3g}"
    assert deviation(State(ours.weights, {}), State(_initial(), {})) > 1e-3  # it moved


# -- skip_nonfinite ---------------------------------------------------------------

SKIP_OPTIONS = {
    "plain": {},
    "ema_accumulation_amsgrad_clip": {
        "amsgrad": True,
        "use_ema": True,
        "ema_overwrite_frequency": 3,
        "gradient_accumulation_steps": 2,
        "global_clipnorm": 1.0,
    },
}
BAD = {2: float("nan"), 5: float("inf"), 6: float("-inf")}


@pytest.mark.parametrize(
    "options, path, fused",
    [
        ("plain", "eager", None),
        ("plain", "eager", False),
        ("plain", "jit", None),
        # With Keras's eager accumulation (see SLOW_EAGERLY), compiled paths only.
        ("ema_accumulation_amsgrad_clip", "eager", None),
        ("ema_accumulation_amsgrad_clip", "jit", None),
    ],
)
def test_a_skipped_step_is_a_step_left_out(options, path, fused):
    """Bit-identical to the run without the bad steps: nothing at all was written."""

    def make(skip=True):
        return keras_adam.Adam(
            learning_rate=0.01, skip_nonfinite=skip, fused=fused, **SKIP_OPTIONS[options]
        )

    data = list(range(STEPS))
    with_bad = run(make, path, data=data, poison=BAD)
    good = [index for i, index in enumerate(data) if i not in BAD]
    without = run(make, path, data=good)
    assert_identical(with_bad.without("steps"), without.without("steps"))
    counter = with_bad.optimizer[f"{len(with_bad.optimizer) - 1}:steps"]
    assert counter.dtype == np.int32 and int(counter) == len(BAD)
    iterations = with_bad.optimizer["0:iteration"]
    assert int(iterations) == len(good)
    assert all(np.isfinite(w).all() for w in with_bad.weights)
    # Keras's own steps on the good data: bit for bit on the keras.ops path,
    # where the select is an operation of its own; compiled, the select can
    # change how XLA fuses (and rounds) the rest, e.g. with use_ema and
    # gradient accumulation together.
    keras_path = "eager" if (path, fused) == ("eager", False) else "jit"
    options = dict(learning_rate=0.01, **SKIP_OPTIONS[options])
    reference = run(lambda: keras.optimizers.Adam(**options), keras_path, data=good)
    if keras_path == "eager":
        assert_identical(with_bad.without("steps"), reference)
    else:
        assert deviation(with_bad.without("steps"), reference) <= ROUND_OFF


def test_one_verdict_for_the_whole_step():
    """A NaN in one variable's gradient leaves every variable untouched."""
    variables = [keras.Variable(x, dtype="float32") for x in _initial()]
    optimizer = keras_adam.Adam(skip_nonfinite=True)
    grads = [jnp.ones(shape) for shape in SHAPES]
    optimizer.apply(grads, variables)
    before = _state(variables, optimizer)
    grads[2] = grads[2].at[1].set(jnp.nan)
    optimizer.apply(grads, variables)
    after = _state(variables, optimizer)
    assert_identical(after.without("steps"), before.without("steps"))
    assert int(optimizer.skipped_steps.value) == 1


# -- model.fit -------------------------------------------------------------------

BATCH = 8


def _data(bad_batch: int | None = None, drop: int | None = None):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5 * BATCH, 3)).astype("float32")
    y = rng.normal(size=(5 * BATCH, 2)).astype("float32")
    if bad_batch is not None:
        x[bad_batch * BATCH + 1, 0] = np.nan
    if drop is not None:
        keep = np.r_[0 : drop * BATCH, (drop + 1) * BATCH : len(x)]
        x, y = x[keep], y[keep]
    return x, y


def fit(make, jit_compile: bool, data=None, epochs: int = 1) -> State:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )
    optimizer = make()
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    x, y = data if data is not None else _data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    state = _state(model.trainable_variables, optimizer)
    for variable in [*model.variables, *optimizer.variables]:
        assert not isinstance(variable.value, jax.core.Tracer), variable.path
    return state


FIT_OPTIONS = {
    "learning_rate": keras.optimizers.schedules.ExponentialDecay(
        0.05, decay_steps=2, decay_rate=0.5
    ),
    "amsgrad": True,
    "weight_decay": 0.05,
    "global_clipnorm": 1.0,
    "loss_scale_factor": 8.0,
    "use_ema": True,
    "ema_overwrite_frequency": 2,
    "gradient_accumulation_steps": 2,
}


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_with_every_keras_option_matches_keras_adam(jit_compile):
    expected = fit(lambda: keras.optimizers.Adam(**FIT_OPTIONS), jit_compile)
    default = fit(lambda: keras_adam.Adam(**FIT_OPTIONS), jit_compile)
    if jit_compile:
        assert_identical(default, expected)
    else:
        assert deviation(default, expected) <= ROUND_OFF  # one compiled program per step


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_with_our_flags(jit_compile):
    options = {
        "learning_rate": 0.05,
        "maximize": True,
        "weight_decay": 0.05,
        "decoupled_weight_decay": False,
        "epsilon_mode": "paper",
        "rectify": True,
        "moment_dtype": "bfloat16",
    }
    plain = fit(lambda: keras_adam.Adam(learning_rate=0.05), jit_compile, epochs=2)
    compiled = fit(lambda: keras_adam.Adam(**options), jit_compile, epochs=2)
    reference = fit(lambda: keras_adam.Adam(fused=False, **options), False, epochs=2)
    assert deviation(compiled, reference) <= 1e-5
    assert deviation(State(compiled.weights, {}), State(plain.weights, {})) > 1e-3


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_skips_the_bad_batch(jit_compile):
    def make():
        return keras_adam.Adam(
            learning_rate=0.05, skip_nonfinite=True, use_ema=True, gradient_accumulation_steps=2
        )

    with_bad = fit(make, jit_compile, data=_data(bad_batch=2))
    without = fit(make, jit_compile, data=_data(drop=2))
    assert_identical(with_bad.without("steps"), without.without("steps"))
    counter = with_bad.optimizer[f"{len(with_bad.optimizer) - 1}:steps"]
    assert counter.dtype == np.int32 and int(counter) == 1


# -- fused on JAX ----------------------------------------------------------------


def test_an_eager_step_is_one_compiled_program(monkeypatch):
    """After its first compiled step, an eager step runs no Python per variable."""
    calls = []
    real = update_rule.adam_step
    monkeypatch.setattr(update_rule, "adam_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for fused, per_step in [(None, 0), (True, 0), (False, len(SHAPES))]:
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(fused=fused)
        grads = [jnp.ones(shape) for shape in SHAPES]
        for _ in range(3):  # builds (op by op), then compiles
            optimizer.apply(grads, variables)
        calls.clear()
        for _ in range(3):
            optimizer.apply(grads, variables)
        assert len(calls) == 3 * per_step, fused


def test_fused_true_takes_every_option_and_dtype():
    cases = [
        ({"amsgrad": True, "epsilon_mode": "paper"}, "float32"),
        ({"rectify": True, "maximize": True}, "float32"),
        ({"moment_dtype": "float32", "skip_nonfinite": True, "amsgrad": True}, "bfloat16"),
    ]
    for options, dtype in cases:
        fused = run(lambda o=options: keras_adam.Adam(fused=True, **o), "eager", dtype=dtype)
        plain = run(lambda o=options: keras_adam.Adam(fused=False, **o), "eager", dtype=dtype)
        tolerance = ROUND_OFF if dtype == "float32" else 2**-7
        assert deviation(fused, plain) <= tolerance, (options, dtype)


def test_an_eager_step_follows_changed_hyperparameters(monkeypatch):
    """A new learning rate (a variable) reuses the program; a new `beta_1` compiles one."""
    traced = []
    real = update_rule.adam_step
    monkeypatch.setattr(update_rule, "adam_step", lambda *a, **k: traced.append(1) or real(*a, **k))
    results = {}
    for fused in (None, False):
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=0.01, fused=fused)
        traces = []
        for index in range(8):
            if index == 3:
                optimizer.learning_rate = 0.03
            if index == 5:
                optimizer.beta_1 = 0.5
            if index == 7:
                optimizer.clipvalue = 0.1
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            traced.clear()
            optimizer.apply(grads, variables)
            traces.append(len(traced) // len(SHAPES))
        results[fused] = _state(variables, optimizer)
        if fused is None:
            # Step 0 builds (op by op), step 1 compiles; then only new hyperparameters do.
            assert traces == [1, 1, 0, 0, 0, 1, 0, 1]
    assert deviation(results[None], results[False]) <= ROUND_OFF
    unchanged = run(lambda: keras_adam.Adam(learning_rate=0.01, fused=False), "eager", range(8))
    assert deviation(results[False], unchanged) > 1e-3


def test_eager_step_with_a_callable_learning_rate_and_a_subset_of_variables():
    results = {}
    for fused in (None, False):
        rate = {"value": 0.01}
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=lambda r=rate: r["value"], fused=fused)
        optimizer.build(variables)
        for index in range(5):
            rate["value"] *= 2  # read at each step, never frozen into a program
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            optimizer.apply(grads[:2], variables[:2])  # the third never moves
        results[fused] = _state(variables, optimizer)
        np.testing.assert_array_equal(results[fused].weights[2], _initial()[2].astype("float32"))
    assert deviation(results[None], results[False]) <= ROUND_OFF
    constant = run(lambda: keras_adam.Adam(learning_rate=0.01), "eager", range(5))
    assert deviation(State(results[None].weights[:1], {}), State(constant.weights[:1], {})) > 1e-3
    # A subset under a plain learning rate compiles (its own program per subset).
    for fused in (None, False):
        variables = [keras.Variable(x, dtype="float32") for x in _initial()]
        optimizer = keras_adam.Adam(learning_rate=0.01, fused=fused)
        optimizer.build(variables)
        for index in range(4):
            grads = _gradient([v.value for v in variables], jnp.asarray(index))
            subset = [0, 1] if index % 2 else [1, 2]
            optimizer.apply([grads[i] for i in subset], [variables[i] for i in subset])
        results[fused] = _state(variables, optimizer)
    assert deviation(results[None], results[False]) <= ROUND_OFF


# -- keras.distribution on two virtual CPU devices ---------------------------------


@pytest.fixture
def distribution():
    """Sets a `keras.distribution` for the test; unsets it after."""
    from keras import distribution as kd

    assert len(jax.devices()) == 2, "conftest.py sets two virtual CPU devices"
    yield kd.set_distribution
    kd.set_distribution(None)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_data_parallel_gives_the_single_device_result(distribution, jit_compile):
    from keras import distribution as kd

    def make():
        return keras_adam.Adam(learning_rate=0.05, skip_nonfinite=True, amsgrad=True)

    data = _data(bad_batch=4)
    single = fit(make, jit_compile, data=data, epochs=2)
    distribution(kd.DataParallel(devices=kd.list_devices()))
    parallel = fit(make, jit_compile, data=data, epochs=2)
    assert deviation(parallel, single) <= 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "moment_dtype": "bfloat16",
            "amsgrad": True,
            "use_ema": True,
            "gradient_accumulation_steps": 2,
        },
    ],
)
def test_model_parallel_moments_are_sharded_as_their_variable(distribution, options):
    """Every slot of a sharded kernel is sharded as it, and the result is the single device's."""
    from keras import distribution as kd

    def make():
        return keras_adam.Adam(learning_rate=0.05, skip_nonfinite=True, **options)

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4, activation="tanh", name="sharded"),
                keras.layers.Dense(2, name="head"),
            ]
        )

    x, y = _data(bad_batch=3)
    single = model()
    single.compile(optimizer=make(), loss="mse")
    single.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    mesh = kd.DeviceMesh((2,), ["model"], kd.list_devices())
    layout_map = kd.LayoutMap(mesh)
    layout_map[".*sharded/kernel"] = (None, "model")
    distribution(kd.ModelParallel(layout_map=layout_map, batch_dim_name=None))
    sharded = model()
    optimizer = make()
    sharded.compile(optimizer=optimizer, loss="mse")
    kernel = sharded.layers[0].kernel

    def check():
        sharding = kernel.value.sharding
        assert sharding.spec == jax.sharding.PartitionSpec(None, "model")
        slots = [v for v in optimizer.variables if "sharded_kernel" in v.path]
        extra = optimizer.amsgrad + optimizer.use_ema + bool(optimizer.gradient_accumulation_steps)
        assert len(slots) == 2 + extra
        for slot in slots:
            assert slot.value.sharding.is_equivalent_to(sharding, 2), slot.path
            if slot.path.endswith(("momentum", "velocity", "velocity_hat")):
                expected = options.get("moment_dtype") or "float32"
                assert keras.backend.standardize_dtype(slot.dtype) == expected

    sharded.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    check()
    assert (
        deviation(
            _state(sharded.trainable_variables, optimizer),
            _state(single.trainable_variables, single.optimizer),
        )
        <= 1e-6
    )
    grads = [jnp.ones(v.shape) for v in sharded.trainable_variables]
    optimizer.apply(grads, sharded.trainable_variables)  # the eager compiled step
    check()
