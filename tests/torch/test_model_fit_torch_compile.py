"""`model.fit` on torch with `jit_compile=True` (torch.compile) and False: the
kernels' result equals `fused=False`'s, a NaN batch is skipped; under
torch.compile the step is our operator (`torch.ops.keras_adam.fused_adam_`),
traced with no graph break, and gives the eager kernels' bits."""

import keras
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import keras_adam
from tests.helpers.torch_engine import (
    WD,
    flat,
    relative_deviation,
)

# -- model.fit ------------------------------------------------------------------------

X = np.random.default_rng(5).normal(size=(96, 5)).astype("float32")
Y = np.tanh(X @ np.random.default_rng(6).normal(size=(5, 2))).astype("float32")


def fit(optimizer, jit_compile, x=X, y=Y, epochs=3):
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return flat(model.get_weights()), history.history["loss"], model


#: float32 training, 18 steps at η = 0.01: the kernels' round-off (measured
#: up to 1.5e-6), amplified by the model.
FIT_BOUND = 1e-5
FIT_FEATURES = dict(
    learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 4, 0.9),
    gradient_accumulation_steps=2,
    use_ema=True,
    ema_overwrite_frequency=5,
    clipnorm=0.5,
    loss_scale_factor=64.0,
    weight_decay=WD,
    amsgrad=True,
)


def test_fit_eager_trains_and_matches_fused_false(kernel_calls):
    weights, losses, _ = fit(keras_adam.Adam(learning_rate=0.01), jit_compile=False)
    assert len(kernel_calls) == 18  # 6 batches x 3 epochs, one call each
    reference, reference_losses, _ = fit(keras_adam.Adam(learning_rate=0.01, fused=False), False)
    assert losses[-1] < 0.8 * losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND


def test_fit_eager_with_every_keras_feature_matches_fused_false(kernel_calls):
    weights, losses, _ = fit(keras_adam.Adam(**FIT_FEATURES), jit_compile=False)
    assert len(kernel_calls) == 9  # one update per two batches
    reference, _, _ = fit(keras_adam.Adam(**FIT_FEATURES, fused=False), jit_compile=False)
    assert losses[-1] < losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND


def test_fit_compiled_matches_fused_false(kernel_calls):
    """torch.compile: the step is in the graph, and calls the kernel once per step.

    Its only graph breaks are the three `Tensor.backward()` calls that any
    optimizer's compiled `fit` has (Keras's Adam, `fused=False`); the
    kernels once ran outside the graph, a break of their own.
    """
    counters.clear()
    weights, losses, model = fit(keras_adam.Adam(learning_rate=0.01), jit_compile=True)
    breaks = counters["graph_break"]
    assert sum(breaks.values()) == 3 and all("backward" in reason for reason in breaks)
    assert model.jit_compile and len(kernel_calls) == 18
    reference, reference_losses, _ = fit(keras_adam.Adam(learning_rate=0.01, fused=False), False)
    assert losses[-1] < 0.8 * losses[0]
    assert relative_deviation(weights, reference) <= FIT_BOUND
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def test_fit_compiled_with_every_keras_feature_and_a_skipped_batch(kernel_calls):
    """Under torch.compile, a NaN batch is skipped exactly as the batch never seen."""
    x_bad = X.copy()
    x_bad[32:48] = np.nan  # the third batch of each epoch
    optimizer = keras_adam.Adam(**FIT_FEATURES, skip_nonfinite=True)
    weights, _, model = fit(optimizer, jit_compile=True, x=x_bad)
    assert model.jit_compile and int(optimizer.skipped_steps.numpy()) == 3
    assert len(kernel_calls) == 7  # 15 good batches, one update per two
    keep = np.r_[0:32, 48:96]
    reference_optimizer = keras_adam.Adam(**FIT_FEATURES, skip_nonfinite=True, fused=False)
    reference, _, _ = fit(reference_optimizer, jit_compile=False, x=X[keep], y=Y[keep])
    assert int(reference_optimizer.skipped_steps.numpy()) == 0
    # Calls counted (15 good batches); `iterations` counts updates (7).
    assert int(optimizer._iterations.numpy()) == int(reference_optimizer._iterations.numpy()) == 15
    assert relative_deviation(weights, reference) <= FIT_BOUND


# -- the operator -----------------------------------------------------------------------

OPERATOR_CASES = {
    "default": {},
    "amsgrad, decoupled decay": dict(amsgrad=True, weight_decay=0.1),
    "paper epsilon, maximize": dict(epsilon_mode="paper", maximize=True),
    "L2 decay, schedule": dict(
        weight_decay=0.1,
        decoupled_weight_decay=False,
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.01, 2, 0.5),
    ),
    "float64": dict(dtype="float64"),
}


def operator_run(compiled, dtype="float32", **options):
    """Four steps of three variables (one above `SMALL`: two calls a step), eager or compiled.

    Compiled with `fullgraph=True`: any graph break raises.
    """
    rng = np.random.default_rng(0)
    variables = [
        keras.Variable(rng.normal(size=shape).astype(dtype)) for shape in [(3, 4), (200, 200), (7,)]
    ]
    optimizer = keras_adam.Adam(**{"learning_rate": 0.01, **options})
    optimizer.build(variables)
    steps = [[torch.tensor(rng.normal(size=v.shape).astype(dtype)) for v in variables]] * 2
    steps += [[torch.tensor(rng.normal(size=v.shape).astype(dtype)) for v in variables]] * 2

    def step(grads):
        optimizer.apply(grads, variables)

    run = torch.compile(step, fullgraph=True) if compiled else step
    for grads in steps:
        run(grads)
    return [v.numpy() for v in variables + optimizer.variables]


@pytest.mark.parametrize("case", OPERATOR_CASES, ids=list(OPERATOR_CASES))
def test_compiled_step_is_the_eager_kernels_bit_for_bit(case, kernel_calls):
    options = dict(OPERATOR_CASES[case])
    eager = operator_run(False, **options)
    eager_calls = list(kernel_calls)
    kernel_calls.clear()
    compiled = operator_run(True, **options)
    assert len(eager_calls) == len(kernel_calls) == 8  # 4 steps, small and large variables
    assert [c["step"] for c in kernel_calls] == [c["step"] for c in eager_calls]
    for a, b in zip(eager, compiled, strict=True):
        np.testing.assert_array_equal(a, b)
    initial = np.random.default_rng(0).normal(size=(3, 4)).astype(eager[0].dtype)
    assert np.abs(eager[0] - initial).min() > 0  # every weight moved


def test_operator_called_directly_is_the_kernel_call():
    """`torch.ops.keras_adam.fused_adam_` reads t and η from tensors, as `fused` is given them."""
    from keras_adam import update_rule
    from keras_adam.backends.torch import TorchEngine

    rng = np.random.default_rng(3)

    def tensors():
        return [torch.tensor(rng.normal(size=(5, 3)).astype("float32")) for _ in range(2)]

    params, grads, ms = tensors(), tensors(), [torch.zeros(5, 3), torch.zeros(5, 3)]
    vs = [torch.zeros(5, 3), torch.zeros(5, 3)]
    copies = [[t.clone() for t in ts] for ts in (params, ms, vs)]
    initial = copies[0][0].clone()
    versions = [t._version for t in params + ms + vs + grads]
    torch.ops.keras_adam.fused_adam_(
        params, grads, ms, vs, [], torch.tensor(6), torch.tensor(0.05),
        0.8, 0.99, 1e-6, 0.0, True, "hat", False, False, "float32", False,
    )  # fmt: skip
    hyper = update_rule.Hyperparameters(beta_1=0.8, beta_2=0.99, epsilon=1e-6)
    scalars = update_rule.host_step_scalars(hyper, 7.0, 0.05, "float32")
    TorchEngine().fused(*copies[:1], grads, *copies[1:], [], scalars)
    for a, b in zip(params + ms + vs, sum(copies, []), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.abs(params[0].numpy() - initial.numpy()).min() > 0
    # Written tensors are marked modified, as in-place ops do (autograd's
    # check on saved tensors); the gradients are not.
    after = [t._version for t in params + ms + vs + grads]
    assert [a > b for a, b in zip(after, versions, strict=True)] == [True] * 6 + [False] * 2
