"""Learning-rate range test (tuning.lr_range_test): the sweep, the stops, the bounds."""

import functools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_adam
from tuning.datasets import load_dataset
from tuning.lr_range import (
    LRRangeTest,
    RangeTestResult,
    lr_range_test,
    suggest_bounds,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@functools.lru_cache(maxsize=1)
def digits():
    data = load_dataset("digits")
    return data.x_train, data.y_train


def linear(seed=0, **compile_kwargs):
    """Multinomial logistic regression on digits."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer=keras_adam.Adam(), loss=LOSS, **compile_kwargs)
    return model


def mlp(seed=0, learning_rate=1e-3, regularized=False, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((64,)), keras.layers.Dense(32, activation="relu")]
    if regularized:  # a seed generator's state and non-trainable variables
        layers += [keras.layers.Dropout(0.2), keras.layers.BatchNormalization()]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    model.compile(optimizer=keras_adam.Adam(learning_rate), loss=LOSS, **compile_kwargs)
    return model


def batches(x, y, batch_size=32, nan_batch=None):
    """An unshuffled tf.data pipeline; batch `nan_batch` has NaN inputs."""
    x = np.array(x, copy=True)
    if nan_batch is not None:
        x[nan_batch * batch_size : (nan_batch + 1) * batch_size] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def smoothed_in_numpy(losses, beta):
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return np.array(out)


def state(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables + model.optimizer.variables]


def assert_bit_identical(before, after):
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert old.dtype == new.dtype
        np.testing.assert_array_equal(new, old, strict=True)


# -- the sweep -------------------------------------------------------------------


class AdamStepProbe(keras.callbacks.Callback):
    """Infers, from the weights and Adam's moments, the learning rate each step used.

    One Adam step moves w by -lr * sqrt(1 - β2^t) / (1 - β1^t) * m_t / (sqrt(v_t) + ε),
    with the moments after the step: dividing the move by the rest gives lr.
    """

    def __init__(self):
        super().__init__()
        self.variable_values, self.implied = [], []

    def _kernel(self):
        return self.model.layers[0].kernel

    def on_train_batch_begin(self, batch, logs=None):
        self.variable_values.append(float(self.model.optimizer.learning_rate.numpy()))
        self.before = self._kernel().numpy().astype(np.float64)

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        slots = {
            v.path.rsplit("_", 1)[-1]: v.numpy().astype(np.float64)
            for v in optimizer.variables
            if "dense_kernel_" in v.path
        }
        t = int(optimizer.iterations.numpy())
        correction = math.sqrt(1 - optimizer.beta_2**t) / (1 - optimizer.beta_1**t)
        direction = correction * slots["momentum"] / (np.sqrt(slots["velocity"]) + 1e-7)
        move = self._kernel().numpy().astype(np.float64) - self.before
        usable = np.abs(direction) > 0.1 * np.abs(direction).max()
        self.implied.append(float(np.median(-move[usable] / direction[usable])))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_learning_rates_are_geometric_and_each_step_uses_its_rate(jit_compile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 3))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras_adam.Adam(), loss="mse", jit_compile=jit_compile)
    finder, probe = LRRangeTest(1e-3, 1e-1, steps=12, smoothing=0.0), AdamStepProbe()
    # 256 / 32 = 8 batches per epoch: the sweep crosses an epoch boundary.
    model.fit(x, y, batch_size=32, epochs=2, callbacks=[finder, probe], verbose=0)

    assert model.jit_compile is jit_compile
    expected = np.geomspace(1e-3, 1e-1, 12)
    assert finder.stopped_reason == "completed"
    np.testing.assert_allclose(finder.learning_rates, expected, rtol=1e-12)
    # The variable holds each rate (in float32) when the step runs ...
    np.testing.assert_array_equal(probe.variable_values, expected.astype(np.float32))
    # ... and the step moved the weights by that rate (consecutive rates differ by 52%).
    np.testing.assert_allclose(probe.implied, expected, rtol=2e-3)
    assert len(finder.losses) == len(finder.smoothed_losses) == 12


def test_recorded_loss_is_the_batch_loss_not_keras_running_mean():
    x, y = digits()
    data = batches(x, y)
    model = linear()
    recomputed = []

    class BatchLoss(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            xb, yb = batch_list[batch]
            recomputed.append(float(LOSS(yb, model(xb, training=True))))

    batch_list = list(data)
    finder = LRRangeTest(1e-3, 3.0, steps=15)
    model.fit(data, epochs=1, shuffle=False, callbacks=[finder, BatchLoss()], verbose=0)

    assert finder.stopped_reason == "completed"
    np.testing.assert_allclose(finder.losses, recomputed, rtol=1e-5)
    # Keras's batch logs hold the epoch's running mean; it would lag far behind.
    running_mean = np.cumsum(recomputed) / np.arange(1, 16)
    assert abs(finder.losses[-1] - running_mean[-1]) > 0.1


@pytest.mark.parametrize("beta", [0.0, 0.98])
def test_smoothed_loss_is_the_bias_corrected_moving_average(beta):
    x, y = digits()
    model = linear()
    finder = LRRangeTest(1e-4, 1.0, steps=25, smoothing=beta, divergence_factor=math.inf)
    model.fit(x, y, batch_size=64, epochs=2, callbacks=[finder], verbose=0)

    assert len(finder.losses) == 25
    assert len(set(finder.losses)) == 25  # real, varying batch losses
    expected = smoothed_in_numpy(finder.losses, beta)
    np.testing.assert_allclose(finder.smoothed_losses, expected, rtol=1e-12)
    if beta == 0.0:
        assert finder.smoothed_losses == finder.losses
    else:  # the bias correction: the first value is the first loss, not (1-β) times it
        assert finder.smoothed_losses[0] == pytest.approx(finder.losses[0], rel=1e-12)


# -- lr_range_test end to end ----------------------------------------------------


def training_loss(model):
    x, y = digits()
    return float(LOSS(y, model(x)))


def train_one_epoch(initial_weights, learning_rate):
    x, y = digits()
    model = linear()
    model.set_weights(initial_weights)
    model.compile(optimizer=keras_adam.Adam(learning_rate), loss=LOSS)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return training_loss(model)


def test_suggested_bounds_on_digits_are_a_sensible_search_range():
    x, y = digits()
    model = linear()
    initial_weights = model.get_weights()
    initial_loss = training_loss(model)
    result = lr_range_test(model, x, y)

    assert isinstance(result, RangeTestResult)
    assert result.stopped_reason in ("completed", "diverged")
    n = len(result.learning_rates)
    assert len(result.losses) == len(result.smoothed_losses) == n > 50
    assert all(isinstance(v, float) for v in result.learning_rates + result.smoothed_losses)
    np.testing.assert_allclose(result.learning_rates, np.geomspace(1e-7, 10.0, 100)[:n], rtol=1e-12)
    low, high = result.suggested_bounds
    assert 1e-7 <= low < high <= 10.0
    assert high / low >= 10 * (1 - 1e-12)
    assert result.suggested_bounds == suggest_bounds(result.learning_rates, result.smoothed_losses)

    at_high = train_one_epoch(initial_weights, high)
    assert at_high < 0.5 * initial_loss
    # The top of the range trains better than rates far outside it on either side.
    assert at_high < train_one_epoch(initial_weights, high / 100)
    assert at_high < train_one_epoch(initial_weights, high * 100)


def test_a_large_max_learning_rate_diverges_before_the_last_step():
    x, y = digits()
    result = lr_range_test(
        mlp(), x, y, min_learning_rate=1e-4, max_learning_rate=100.0, steps=60, smoothing=0.9
    )
    assert result.stopped_reason == "diverged"
    smoothed = np.array(result.smoothed_losses)
    n = len(smoothed)
    assert n < 60
    # The stop rule, point by point: only the last point exceeds 4x the best before it.
    for i in range(1, n):
        exceeded = smoothed[i] > 4.0 * smoothed[:i].min()
        assert exceeded == (i == n - 1)
    np.testing.assert_allclose(result.learning_rates, np.geomspace(1e-4, 100.0, 60)[:n], rtol=1e-12)


def test_nan_loss_is_recorded_then_training_stops():
    x, y = digits()
    model = linear()
    finder = LRRangeTest(1e-4, 1e-2, steps=20)
    model.fit(batches(x, y, nan_batch=7), epochs=1, shuffle=False, callbacks=[finder], verbose=0)

    assert finder.stopped_reason == "non-finite loss"
    assert model.stop_training
    assert len(finder.losses) == len(finder.learning_rates) == 8
    assert math.isnan(finder.losses[-1]) and math.isnan(finder.smoothed_losses[-1])
    assert np.all(np.isfinite(finder.losses[:-1]))


def test_lr_range_test_with_a_non_finite_loss_suggests_bounds_from_the_finite_part():
    x, y = digits()
    data = batches(x, y, nan_batch=40)
    result = lr_range_test(linear(), data, min_learning_rate=1e-5, steps=50, smoothing=0.8)

    assert result.stopped_reason == "non-finite loss"
    assert len(result.losses) == 41 and math.isnan(result.losses[-1])
    finite = result.learning_rates[:-1], result.smoothed_losses[:-1]
    assert result.suggested_bounds == suggest_bounds(*finite)


def test_datasets_of_any_cardinality_run_all_steps():
    x, y = digits()
    finite = batches(x[:320], y[:320], batch_size=32)  # 10 batches an epoch
    for data in (finite, finite.repeat(), finite.filter(lambda xb, yb: True)):
        result = lr_range_test(linear(), data, min_learning_rate=1e-5, steps=25, smoothing=0.7)
        assert result.stopped_reason == "completed"
        assert len(result.losses) == 25


# -- state is restored ---------------------------------------------------------------


class RaiseAt(keras.callbacks.Callback):
    def __init__(self, batch, saved):
        super().__init__()
        self.batch, self.saved, self.changed = batch, saved, False

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            self.changed = any(
                not np.array_equal(v.numpy(), old)
                for v, old in zip(self.model.trainable_variables, self.saved, strict=False)
            )
            raise RuntimeError("injected failure")


@pytest.mark.parametrize(("jit_compile", "fails"), [(False, False), (False, True), (True, False)])
def test_weights_and_optimizer_state_are_restored_bit_identical(jit_compile, fails):
    x, y = digits()
    model = mlp(learning_rate=1.234e-3, regularized=True, jit_compile=jit_compile)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    for _ in range(3):  # non-zero moments, step 3, without compiling a second function
        grads = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    assert int(optimizer.iterations.numpy()) == 3
    before = state(model)
    learning_rate = optimizer.learning_rate.numpy()

    if fails:
        raiser = RaiseAt(5, [v.numpy() for v in model.trainable_variables])
        with pytest.raises(RuntimeError, match="injected failure"):
            lr_range_test(model, x, y, steps=30, max_learning_rate=10.0, callbacks=[raiser])
        assert raiser.changed  # training did move the weights before it failed
    else:
        result = lr_range_test(model, x, y, min_learning_rate=1e-5, steps=40, smoothing=0.8)
        assert len(result.losses) > 20

    assert model.jit_compile is jit_compile
    assert_bit_identical(before, state(model))
    assert optimizer.learning_rate.numpy() == learning_rate == np.float32(1.234e-3)
    assert int(optimizer.iterations.numpy()) == 3


def test_an_unbuilt_optimizer_is_built_and_left_in_its_fresh_state():
    x, y = digits()
    model = mlp(learning_rate=2e-3)
    weights = [w.numpy() for w in model.variables]
    assert not model.optimizer.built
    lr_range_test(model, x, y, min_learning_rate=1e-5, steps=40, smoothing=0.8)

    assert model.optimizer.built
    assert_bit_identical(weights, [w.numpy() for w in model.variables])
    assert int(model.optimizer.iterations.numpy()) == 0
    assert model.optimizer.learning_rate.numpy() == np.float32(2e-3)
    slots = [v.numpy() for v in model.optimizer.variables if "_kernel_" in v.path]
    assert len(slots) == 4 and all(not s.any() for s in slots)


# -- suggest_bounds ------------------------------------------------------------------

RATES = 10.0 ** np.linspace(-6, 0, 61)  # 0.1 decade apart
LOG = np.log10(RATES)


def test_suggest_bounds_on_a_u_shaped_curve():
    losses = (LOG + 2) ** 2 + 1  # 17 at 1e-6, lowest (1) at 1e-2
    low, high = suggest_bounds(RATES, losses)
    # high: the minimum's rate over 10. low: the loss must drop by 10% of 16, to 15.4,
    # i.e. |log10(lr) + 2| <= sqrt(14.4) = 3.79: first at log10(lr) = -5.7.
    assert high == pytest.approx(1e-3, rel=1e-12)
    assert low == pytest.approx(10**-5.7, rel=1e-12)


def test_suggest_bounds_widens_a_narrow_range_to_a_decade():
    losses = np.where(LOG < -1.05, 5.0, 1.0 + 10 * np.maximum(LOG + 1, 0))  # a cliff at 0.1
    low, high = suggest_bounds(RATES, losses)
    assert high == pytest.approx(1e-2, rel=1e-12)
    assert low == pytest.approx(1e-3, rel=1e-12)


def test_suggest_bounds_ignores_the_loss_scale_and_offset():
    rng = np.random.default_rng(1)
    losses = (LOG + 2) ** 2 + 1 + rng.normal(scale=0.05, size=LOG.size)
    bounds = suggest_bounds(RATES, losses)
    for scale, offset in [(3.5, -1.0), (1e-4, 0.0), (2.0, 100.0)]:
        assert suggest_bounds(RATES, scale * losses + offset) == bounds


def test_suggest_bounds_ignores_points_from_the_first_non_finite_loss():
    losses = (LOG + 2) ** 2 + 1
    cut = losses.copy()
    cut[50] = np.nan
    cut[51:] = -5.0  # lower than the minimum, but after the NaN
    assert suggest_bounds(RATES, cut) == suggest_bounds(RATES[:50], losses[:50])
    cut[50] = np.inf
    assert suggest_bounds(RATES, cut) == suggest_bounds(RATES[:50], losses[:50])


def test_suggest_bounds_refuses_a_loss_that_never_decreased():
    curves = {
        "flat": np.full(61, 2.3),
        "flat up to round-off": smoothed_in_numpy(np.full(61, 0.7), 0.98),
        "increasing": np.linspace(1.0, 3.0, 61),
        "0.03% lower over the sweep": 2.3 - 1e-5 * np.arange(61),
    }
    for name, losses in curves.items():
        with pytest.raises(ValueError, match=r"never decreased over learning rates \[1e-06, 1\]"):
            suggest_bounds(RATES, losses)
            pytest.fail(name)


def test_suggest_bounds_refuses_a_minimum_too_close_to_the_first_rate():
    losses = (LOG + 4.5) ** 2  # lowest at 10**-4.5, 1.5 decades above the first rate
    with pytest.raises(ValueError, match="lower `min_learning_rate`"):
        suggest_bounds(RATES, losses)


def test_suggest_bounds_refuses_malformed_curves():
    cases = [
        (RATES[:10], np.ones(9), "same length"),
        (RATES[::-1], np.ones(61), "strictly increasing"),
        (-RATES, np.ones(61), "positive"),
        (RATES, np.r_[np.nan, np.ones(60)], "At least two finite"),
    ]
    for rates, losses, match in cases:
        with pytest.raises(ValueError, match=match):
            suggest_bounds(rates, losses)


# -- arguments -------------------------------------------------------------------------

BAD_ARGUMENTS = [
    ("min_learning_rate", 0),
    ("min_learning_rate", -1e-3),
    ("min_learning_rate", math.inf),
    ("min_learning_rate", "1e-7"),
    ("max_learning_rate", 1e-7),
    ("max_learning_rate", 1e-8),
    ("max_learning_rate", math.nan),
    ("steps", 1),
    ("steps", 10.0),
    ("steps", True),
    ("steps", None),
    ("smoothing", 1.0),
    ("smoothing", -0.1),
    ("smoothing", True),
    ("divergence_factor", 1.0),
    ("divergence_factor", 0.5),
    ("divergence_factor", math.nan),
]


def test_bad_arguments_name_themselves_and_the_value():
    model, (x, y) = linear(), digits()
    weights = [w.numpy() for w in model.weights]
    for argument, value in BAD_ARGUMENTS:
        for run in (LRRangeTest, functools.partial(lr_range_test, model, x, y)):
            with pytest.raises(ValueError) as info:
                run(**{argument: value})
            message = str(info.value)
            assert message.startswith(f"Argument `{argument}` must be "), message
            assert message.endswith(f"Received: {argument}={value!r}"), message
    for batch_size in [0, -32, 2.5, True]:
        with pytest.raises(ValueError, match=rf"Received: batch_size={batch_size!r}$"):
            lr_range_test(model, x, y, batch_size=batch_size)
    assert not model.optimizer.built  # nothing was touched
    assert_bit_identical(weights, [w.numpy() for w in model.weights])


def test_the_message_format():
    with pytest.raises(ValueError) as info:
        LRRangeTest(min_learning_rate=0)
    assert str(info.value) == (
        "Argument `min_learning_rate` must be a positive finite number. "
        "Received: min_learning_rate=0"
    )


def test_the_model_must_be_compiled_and_built():
    x, y = digits()
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    with pytest.raises(ValueError, match=r"^Argument `model` must be compiled"):
        lr_range_test(model, x, y)
    unbuilt = keras.Sequential([keras.layers.Dense(10)])
    unbuilt.compile(optimizer=keras_adam.Adam(), loss=LOSS)
    with pytest.raises(ValueError, match=r"^Argument `model` must be built"):
        lr_range_test(unbuilt, x, y)
    with pytest.raises(ValueError, match=r"^Argument `model` must be a keras.Model"):
        lr_range_test("model", x, y)


def constant_rate():
    return 1e-3


def test_a_learning_rate_schedule_is_refused():
    x, y = digits()
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9)
    cases = [
        (schedule, "learning_rate=ExponentialDecay"),
        (constant_rate, "a callable learning_rate"),
    ]
    for learning_rate, received in cases:
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        model.compile(optimizer=keras_adam.Adam(learning_rate), loss=LOSS)
        weights = [w.numpy() for w in model.weights]
        message = rf"not a LearningRateSchedule or a callable\..*Received: {received}$"
        with pytest.raises(ValueError, match=message):
            lr_range_test(model, x, y)
        with pytest.raises(ValueError, match=message):
            model.fit(x, y, epochs=1, callbacks=[LRRangeTest()], verbose=0)
        assert_bit_identical(weights, [w.numpy() for w in model.weights])


# -- the plot ----------------------------------------------------------------------------


def test_plot_writes_a_png(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    rates = tuple(float(r) for r in RATES)
    losses = tuple(float(v) for v in (LOG + 2) ** 2 + 1)
    result = RangeTestResult(
        learning_rates=rates,
        losses=losses[:-1] + (math.nan,),
        smoothed_losses=losses[:-1] + (math.nan,),
        stopped_reason="non-finite loss",
        suggested_bounds=suggest_bounds(rates, losses),
    )
    path = tmp_path / "range.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    assert matplotlib.get_backend() == backend
    with pytest.raises(AttributeError):
        result.stopped_reason = "completed"  # frozen
