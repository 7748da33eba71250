"""Against `keras.optimizers.Adam` on torch (Keras's `torch._foreach_` Adam), and
state moving between it and `keras_adam.Adam`."""

import keras
import numpy as np
import pytest

import keras_adam
from tests.helpers.torch_engine import (
    BINARY,
    INITIAL,
    STEPS,
    WD,
    flat,
    gradients,
    keras_run,
    relative_deviation,
)

# -- parity with keras.optimizers.Adam (Keras's torch Adam) ----------------------

KERAS_VARIANTS = {
    "Adam": {},
    "AMSGrad": dict(amsgrad=True),
    "AdamW": dict(weight_decay=WD),
    "AdamW+AMSGrad": dict(weight_decay=WD, amsgrad=True),
}


def test_keras_adam_on_torch_is_kerass_torch_adam():
    from keras.src.backend.torch.optimizers import torch_adam

    assert isinstance(keras.optimizers.Adam(), torch_adam.Adam)


#: With Keras's default hyperparameters and weight decay, Keras's torch
#: optimizer multiplies float64 weights by a float32 `1 - λη`
#: (`TorchOptimizer._apply_weight_decay`): those run in float32 only.
KERAS_CASES = [
    (variant, hyper, dtype)
    for variant in sorted(KERAS_VARIANTS)
    for hyper in ("binary", "defaults")
    for dtype in ("float32", "float64")
    if not (
        hyper == "defaults" and "weight_decay" in KERAS_VARIANTS[variant] and dtype == "float64"
    )
]


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize(("variant", "hyper", "dtype"), KERAS_CASES)
def test_matches_keras_adam(variant, hyper, dtype, fused):
    """Round-off against `keras.optimizers.Adam` in Keras's ε̂ form."""
    options = KERAS_VARIANTS[variant]
    hyperparameters = BINARY if hyper == "binary" else {}
    ours, our_state, _ = keras_run(
        keras_adam.Adam(**hyperparameters, **options, fused=fused), dtype
    )
    theirs, their_state, _ = keras_run(keras.optimizers.Adam(**hyperparameters, **options), dtype)
    assert relative_deviation(theirs[-1], theirs[0]) > 1e-3  # it moved
    bound = 1e-12 if dtype == "float64" else (1e-6 if fused is None else 3e-6)
    assert relative_deviation(ours, theirs) <= bound
    for mine, keras_value in zip(our_state[2:], their_state[2:], strict=True):
        assert relative_deviation(mine, keras_value) <= 100 * bound  # moments
    assert [int(our_state[0])] == [int(their_state[0])] == [STEPS]


# -- state moves between keras.optimizers.Adam and keras_adam.Adam -------------------


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("direction", ["keras to ours", "ours to keras"])
def test_state_moves_between_keras_and_ours(direction, amsgrad, kernel_calls):
    def make(kind):
        if kind == "keras":
            return keras.optimizers.Adam(**BINARY, amsgrad=amsgrad)
        return keras_adam.Adam(**BINARY, amsgrad=amsgrad)

    first, second = ("keras", "ours") if direction == "keras to ours" else ("ours", "keras")
    # 10 steps with the first optimizer, then 10 with the second from its state ...
    source = make(first)
    weights = [keras.Variable(value, dtype="float64", name=name) for name, value in INITIAL.items()]
    source.build(weights)
    for t in range(1, 11):
        source.apply(gradients([w.value for w in weights], t), weights)
    store = {}
    source.save_own_variables(store)
    target = make(second)
    target.build(weights)
    target.load_own_variables(store)
    assert int(target.iterations.numpy()) == 10
    # ... equals 20 steps with the first alone.
    for t in range(11, 21):
        target.apply(gradients([w.value for w in weights], t), weights)
    alone, _, _ = keras_run(make(first), dtype="float64", steps=20)
    assert relative_deviation(flat(w.numpy() for w in weights), alone[-1]) <= 1e-12
    assert kernel_calls  # ours ran fused


# -- one step from the same state, at a large learning rate -------------------------


def _one_step(optimizer, step, rng_seed=3):
    """The change of the weights in step `step` (1-based) from one fixed state.

    The weights start at 0, so that the change is read without cancellation.
    """
    rng = np.random.default_rng(rng_seed)
    shapes = [(64, 32), (32,), (1000,)]
    variables = [keras.Variable(np.zeros(s, "float32")) for s in shapes]
    optimizer.build(variables)
    optimizer.iterations.assign(step - 1)
    grads = [rng.normal(size=s).astype("float32") for s in shapes]
    # Moments of the gradient's sign, so that the moments' update does not
    # cancel (its rounding, Keras's `β m + (1 − β) g` against our
    # `m + (g − m)(1 − β)`, would then show, not the step size's).
    for index, grad in enumerate(grads):
        m, v = optimizer.variables[2 + 2 * index : 4 + 2 * index]
        m.assign(np.sign(grad) * np.abs(rng.normal(size=grad.shape)).astype("float32"))
        v.assign((rng.normal(size=grad.shape) ** 2).astype("float32"))
    before = [keras.ops.convert_to_numpy(v).copy() for v in variables]
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
    after = [keras.ops.convert_to_numpy(v) for v in variables]
    return np.concatenate([(a - b).ravel() for a, b in zip(after, before, strict=True)])


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 1000])
@pytest.mark.parametrize("learning_rate", [0.5, 1e-3])
def test_fused_step_is_kerass_step_size_at_every_step(step, learning_rate):
    """The default (fused) path takes Keras's step: α from β rounded to float32.

    torch's kernels compute 1 − β^t in double from the exact β; Keras in
    float32 from β rounded to float32 (1 − β2 off by 1.3e-5 relative at
    t = 1). Given the bias corrections Keras computes, the kernels' step
    agrees with Keras's to float32 round-off (it was 4e-6 to 1e-5 off).
    """
    ours = _one_step(keras_adam.Adam(learning_rate), step)
    theirs = _one_step(keras.optimizers.Adam(learning_rate), step)
    deviation = np.max(np.abs(ours - theirs) / np.abs(theirs))
    assert np.max(np.abs(theirs)) > 1e-4  # the weights moved
    assert deviation < 1e-6, deviation
