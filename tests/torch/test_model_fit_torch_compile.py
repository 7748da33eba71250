"""`model.fit` on torch with `jit_compile=True` (torch.compile) and False: the
kernels' result equals `fused=False`'s, a NaN batch is skipped."""

import keras
import numpy as np

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
    """torch.compile: the kernel calls run outside the graph, once per step."""
    weights, losses, model = fit(keras_adam.Adam(learning_rate=0.01), jit_compile=True)
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
