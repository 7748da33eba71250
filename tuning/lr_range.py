"""Learning-rate range test for Keras 3 (Smith, 2017).

Smith ("Cyclical Learning Rates for Training Neural Networks", WACV 2017,
Section 3.3) trains a model for a short run while the learning rate grows
from very small to very large, and reads good bounds for the learning rate
off the loss curve: the loss first stays flat (the rate is too small to
matter), then falls (useful rates), then turns and blows up (too large).
This module implements the exponential variant popularised by fast.ai: the
rate grows geometrically, one value per batch,

    η_i = min_learning_rate · (max_learning_rate / min_learning_rate) ** (i / (steps - 1)),

and the per-batch loss, which is noisy, is smoothed with a bias-corrected
exponential moving average before it is read.

Only public Keras 3 API is used: the rate is set with
`optimizer.learning_rate = value` (which assigns the optimizer's
learning-rate variable, so XLA-compiled train steps see it too) and the run
is ended with `model.stop_training`. Learning-rate finders written for
Keras 2 (`keras.backend.set_value(optimizer.lr, ...)`) do not run on Keras 3.

Three levels of use:

- `lr_range_test(model, x, y)` runs the whole test on a compiled model and
  puts the model's weights and the optimizer's state (moments, step
  counter, learning rate) back exactly as they were, bit for bit, even if
  training raises. It returns a `RangeTestResult`.
- `LRRangeTest` is the `keras.callbacks.Callback` that does the sweep, for
  use in your own `model.fit` call (it does not restore anything).
- `suggest_bounds` turns a recorded curve into a learning-rate range.

`suggest_bounds` reads `(low, high)` off the smoothed curve: `high` is the
rate at the smoothed minimum divided by 10, `low` the rate where the
smoothed loss has made 10% of its total decrease, and the range spans a
decade at least (see its docstring for why). The bounds are meant as the η
search range when tuning `keras_adam.Adam`: search η on a log scale inside
`result.suggested_bounds`, e.g.
`AdamSearchSpace(learning_rate=result.suggested_bounds)` with `tuning.space`.

Example:
    >>> import keras, keras_adam
    >>> from tuning.lr_range import lr_range_test
    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    >>> model.compile(
    ...     optimizer=keras_adam.Adam(),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )
    >>> result = lr_range_test(model, x_train, y_train)  # doctest: +SKIP
    >>> low, high = result.suggested_bounds  # doctest: +SKIP
    >>> result.plot("lr_range_test.png")  # doctest: +SKIP

Notes:
    The recorded loss is each batch's own loss. Keras 3's batch logs hold
    the running mean of the loss over the epoch so far, so the callback
    resets the model's metrics before each batch. One point of the sweep is
    one call of the model's train function: with `steps_per_execution=k` it
    is k optimizer steps at one rate, and the loss recorded is their mean.

    The moving average lags the raw loss by about `smoothing / (1 - smoothing)`
    batches (49 at the default 0.98, several decades of learning rate at the
    default sweep), which is why `suggest_bounds` does not take the smoothed
    minimum itself as the top of the range.

References:
    Leslie N. Smith, "Cyclical Learning Rates for Training Neural Networks",
    IEEE WACV 2017, arXiv:1506.01186, Section 3.3.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import keras
import numpy as np

from keras_adam.validation import integer, invalid

__all__ = ["LRRangeTest", "RangeTestResult", "lr_range_test", "suggest_bounds"]

#: Stop reasons recorded in `LRRangeTest.stopped_reason`.
COMPLETED = "completed"
DIVERGED = "diverged"
NON_FINITE = "non-finite loss"

#: `suggest_bounds`: the high bound is the rate at the lowest smoothed loss
#: divided by this.
HIGH_BOUND_DIVISOR = 10.0

#: `suggest_bounds`: the low bound is where the smoothed loss has made this
#: share of its total decrease (start to minimum).
LOW_BOUND_FRACTION = 0.1

#: `suggest_bounds`: a decrease smaller than this share of the starting
#: smoothed loss does not count as a decrease (it is round-off or noise).
MIN_RELATIVE_DECREASE = 1e-3


# -- argument checks -----------------------------------------------------------


def _real(name: str, value: Any, requirement: str, *, allow_inf: bool = False) -> float:
    """`value` as a float; booleans, non-numbers and NaN (and inf) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(name, value, requirement)
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise invalid(name, value, requirement)
    return number


def _check_sweep(
    min_learning_rate: Any,
    max_learning_rate: Any,
    steps: Any,
    smoothing: Any,
    divergence_factor: Any,
) -> tuple[float, float, int, float, float]:
    """Validate the sweep's arguments and return them as Python numbers."""
    low = _real("min_learning_rate", min_learning_rate, "a positive finite number")
    if not low > 0:
        raise invalid("min_learning_rate", min_learning_rate, "a positive finite number")
    requirement = f"a finite number greater than min_learning_rate ({min_learning_rate!r})"
    high = _real("max_learning_rate", max_learning_rate, requirement)
    if not high > low:
        raise invalid("max_learning_rate", max_learning_rate, requirement)
    steps = integer("steps", steps, 2)
    beta = _real("smoothing", smoothing, "a number in [0, 1)")
    if not 0 <= beta < 1:
        raise invalid("smoothing", smoothing, "a number in [0, 1)")
    requirement = "a number > 1 (inf disables the divergence check)"
    factor = _real("divergence_factor", divergence_factor, requirement, allow_inf=True)
    if not factor > 1:
        raise invalid("divergence_factor", divergence_factor, requirement)
    return low, high, int(steps), beta, factor


def _settable_learning_rate(optimizer: Any) -> keras.Variable:
    """The optimizer's learning-rate variable; a schedule or callable is refused."""
    if optimizer is None:
        raise ValueError(
            "The learning-rate range test needs a compiled model with an optimizer; "
            "call `model.compile(optimizer=..., loss=...)` first."
        )
    learning_rate = optimizer.learning_rate
    if not isinstance(learning_rate, keras.Variable):
        # Reading the property evaluated the schedule (or called the callable):
        # name what was configured instead.
        received = "a callable learning_rate"
        try:
            with warnings.catch_warnings():  # Keras warns about serializing lambdas
                warnings.simplefilter("ignore")
                config = optimizer.get_config()["learning_rate"]
            if isinstance(config, dict) and config.get("module") != "builtins":
                received = f"learning_rate={config.get('class_name', 'a schedule')}"
        except Exception:  # a lambda's source may not be available
            pass
        raise ValueError(
            "The learning-rate range test sets the learning rate at every batch, so "
            "the optimizer's learning rate must be a float, not a "
            "LearningRateSchedule or a callable. Compile the model with e.g. "
            f"`keras_adam.Adam(learning_rate=1e-3)`. Received: {received}"
        )
    return learning_rate


# -- the callback ----------------------------------------------------------------


class LRRangeTest(keras.callbacks.Callback):
    """Sweep the learning rate geometrically over batches and record the loss.

    Before batch i (counted from 0 since `on_train_begin`) the optimizer's
    learning rate is set to
    `min_learning_rate * (max_learning_rate / min_learning_rate) ** (i / (steps - 1))`;
    after it, the batch's loss is recorded together with its bias-corrected
    exponential moving average
    `smoothed_i = avg_i / (1 - smoothing ** (i + 1))`, where
    `avg_i = smoothing * avg_{i-1} + (1 - smoothing) * loss_i` and `avg_{-1} = 0`.

    Training is stopped (`model.stop_training = True`) after `steps` batches
    ("completed"), when the smoothed loss exceeds `divergence_factor` times
    the lowest smoothed loss so far ("diverged"; checked while that lowest
    value is positive, as for the usual non-negative losses), or when the
    loss is NaN or infinite ("non-finite loss"; the value is recorded
    first). Use `epochs` large enough for `steps` batches.

    The callback changes the model's weights and the optimizer's learning
    rate and does not restore them: `lr_range_test` does. Before each batch
    it resets the model's metrics, so that Keras's `logs["loss"]` is the
    loss of that batch rather than the running mean over the epoch.

    Example:
        >>> finder = LRRangeTest(min_learning_rate=1e-6, max_learning_rate=1.0)
        >>> model.fit(x, y, epochs=10, callbacks=[finder])  # doctest: +SKIP
        >>> suggest_bounds(finder.learning_rates, finder.smoothed_losses)  # doctest: +SKIP

    Args:
        min_learning_rate: The first learning rate, > 0.
        max_learning_rate: The last learning rate, > `min_learning_rate`.
        steps: Number of batches (and learning rates) of the sweep, an
            integer >= 2.
        smoothing: β of the exponential moving average of the loss, in
            [0, 1); 0 records the raw loss.
        divergence_factor: Stop once the smoothed loss exceeds this multiple
            of its lowest value so far; > 1, `inf` never stops for it.

    Attributes:
        learning_rates: The learning rate used at each recorded batch.
        losses: The loss of each recorded batch.
        smoothed_losses: The smoothed loss after each recorded batch.
        stopped_reason: "completed", "diverged" or "non-finite loss"; None
            while running, or if training ended before any of these.

    Raises:
        ValueError: if an argument is not valid.
    """

    def __init__(
        self,
        min_learning_rate: float = 1e-7,
        max_learning_rate: float = 10.0,
        steps: int = 100,
        smoothing: float = 0.98,
        divergence_factor: float = 4.0,
    ) -> None:
        super().__init__()
        (
            self.min_learning_rate,
            self.max_learning_rate,
            self.steps,
            self.smoothing,
            self.divergence_factor,
        ) = _check_sweep(min_learning_rate, max_learning_rate, steps, smoothing, divergence_factor)
        self._reset()

    def _reset(self) -> None:
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self.smoothed_losses: list[float] = []
        self.stopped_reason: str | None = None
        self._average = 0.0
        self._best = math.inf
        self._pending: float | None = None

    def learning_rate_at(self, index: int) -> float:
        """The learning rate of batch `index` of the sweep (0 <= index < steps).

        Args:
            index: The batch's position in the sweep, from 0.

        Returns:
            `min_learning_rate * (max_learning_rate / min_learning_rate) ** (index / (steps - 1))`.
        """
        if index == self.steps - 1:
            return self.max_learning_rate  # exactly, as np.geomspace
        ratio = self.max_learning_rate / self.min_learning_rate
        return self.min_learning_rate * ratio ** (index / (self.steps - 1))

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Start a new sweep; refuse an optimizer whose learning rate is a schedule.

        Raises:
            ValueError: if the model has no optimizer, or its learning rate
                is a `LearningRateSchedule` or a callable.
        """
        _settable_learning_rate(self.model.optimizer)
        self._reset()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Set this batch's learning rate and reset the metrics."""
        if self.stopped_reason is not None:
            return
        self._pending = self.learning_rate_at(len(self.learning_rates))
        self.model.optimizer.learning_rate = self._pending
        self.model.reset_metrics()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Record the batch's loss and decide whether to stop.

        Raises:
            ValueError: if the logs have no "loss" entry.
        """
        if self.stopped_reason is not None or self._pending is None:
            return
        if not logs or "loss" not in logs:
            raise ValueError(
                "LRRangeTest needs the batch's loss in the logs of `on_train_batch_end` "
                f"(a `loss` entry). Received logs with keys: {sorted(logs or {})}"
            )
        loss = float(np.asarray(logs["loss"]))
        index = len(self.learning_rates)
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smoothed = self._average / (1 - self.smoothing ** (index + 1))
        self.learning_rates.append(self._pending)
        self.losses.append(loss)
        self.smoothed_losses.append(smoothed)
        self._pending = None
        if not math.isfinite(loss) or not math.isfinite(smoothed):
            self.stopped_reason = NON_FINITE
        elif self._best > 0 and smoothed > self.divergence_factor * self._best:
            self.stopped_reason = DIVERGED
        elif index + 1 >= self.steps:
            self.stopped_reason = COMPLETED
        self._best = min(self._best, smoothed)
        if self.stopped_reason is not None:
            self.model.stop_training = True


# -- bounds ----------------------------------------------------------------------


def suggest_bounds(
    learning_rates: Sequence[float], smoothed_losses: Sequence[float]
) -> tuple[float, float]:
    """Suggest a learning-rate search range `(low, high)` from a range test.

    Smith (2017, Section 3.3) reads the bounds off the curve as the rate
    where the loss starts to improve and the rate where improvement slows
    or turns ragged, before the loss rises. On a smoothed curve:

    - `high` is the learning rate at the lowest smoothed loss divided by
      `HIGH_BOUND_DIVISOR` (10), as fast.ai's "minimum/10" suggestion. The
      minimum itself is a bad top of the range, for two reasons. It is the
      edge of stability: the loss is about to rise there, and improvement
      already slowed before it. And the exponential moving average lags the
      raw loss by about `smoothing / (1 - smoothing)` batches (49 at 0.98),
      so the smoothed minimum comes after the raw loss has turned: on
      digits, logistic regression and a one-hidden-layer MLP trained with
      Adam had their smoothed minimum 1 to 1.7 decades above the best
      constant learning rate, at rates where an epoch of training ends
      with a higher loss than it started with.
    - `low` is the first learning rate at which the smoothed loss has made
      `LOW_BOUND_FRACTION` (10%) of its total decrease, from its starting
      value to its minimum: below it, the rate is too small to move the
      loss. A share of the total decrease, rather than an absolute amount,
      makes the rule independent of the loss's scale and offset. 10% rather
      than e.g. 1% because the first smoothed value is a single batch's
      loss, whose batch-to-batch noise is typically a few percent of the
      total decrease, so a 1% threshold is often met by noise at the very
      first rates. A threshold crossing is also steadier than the
      "steepest descent" point, which needs the derivative of a noisy curve.
    - The range spans at least a decade: if `high / low < 10`, `low`
      becomes `high / 10`. It never goes below the first tested rate, so
      the smoothed minimum must lie at least two decades above it.

    Points from the first NaN or infinite smoothed loss on are ignored.

    Args:
        learning_rates: The tested learning rates, positive and increasing.
        smoothed_losses: The smoothed loss at each of them (same length).

    Returns:
        `(low, high)` with `learning_rates[0] <= low < high < learning_rates[-1]`
        and `high / low >= 10`.

    Raises:
        ValueError: if the inputs are malformed (lengths differ, fewer than
            two finite points, rates not positive and increasing), if the
            loss never decreased (by more than `MIN_RELATIVE_DECREASE`, 0.1%,
            of its starting value: the one place where the loss's offset
            matters), or if its minimum lies less than two decades
            above the first tested rate (then start the sweep lower).
    """
    rates = np.asarray(learning_rates, dtype=np.float64).ravel()
    losses = np.asarray(smoothed_losses, dtype=np.float64).ravel()
    if rates.shape != losses.shape:
        raise ValueError(
            "Arguments `learning_rates` and `smoothed_losses` must have the same length. "
            f"Received: {rates.size} learning rates and {losses.size} losses"
        )
    if not (np.all(np.isfinite(rates)) and np.all(rates > 0) and np.all(np.diff(rates) > 0)):
        raise ValueError(
            "Argument `learning_rates` must hold positive, finite, strictly increasing "
            f"values. Received: learning_rates={rates.tolist()!r}"
        )
    non_finite = np.flatnonzero(~np.isfinite(losses))
    end = int(non_finite[0]) if non_finite.size else losses.size
    rates, losses = rates[:end], losses[:end]
    if rates.size < 2:
        raise ValueError(
            "At least two finite smoothed losses are needed to suggest bounds; "
            f"received {rates.size}. Lower `min_learning_rate` or raise `steps`."
        )
    start, best = losses[0], int(np.argmin(losses))
    decrease = start - losses[best]
    if not decrease > MIN_RELATIVE_DECREASE * abs(start):
        raise ValueError(
            f"The loss never decreased over learning rates [{rates[0]:.3g}, {rates[-1]:.3g}] "
            f"(smoothed loss {start:.6g} at the start, lowest {losses[best]:.6g}); "
            "widen the range or check the model."
        )
    high = float(rates[best]) / HIGH_BOUND_DIVISOR
    if high < 10 * rates[0]:
        raise ValueError(
            f"The smoothed loss was lowest at learning rate {rates[best]:.3g}, less than two "
            f"decades above the first tested rate {rates[0]:.3g}, so the range below "
            f"{high:.3g} was not tested; lower `min_learning_rate`."
        )
    threshold = start - LOW_BOUND_FRACTION * decrease
    low = float(rates[int(np.argmax(losses <= threshold))])
    if high / low < 10:
        low = max(high / 10, float(rates[0]))
    return low, high


# -- the result ----------------------------------------------------------------------


@dataclass(frozen=True)
class RangeTestResult:
    """The outcome of `lr_range_test`.

    Attributes:
        learning_rates: The learning rate of each recorded batch.
        losses: The raw loss of each recorded batch.
        smoothed_losses: The bias-corrected moving average of the loss.
        stopped_reason: "completed", "diverged" or "non-finite loss".
        suggested_bounds: `(low, high)` from `suggest_bounds`: a range to
            search η in (on a log scale).
    """

    learning_rates: tuple[float, ...]
    losses: tuple[float, ...]
    smoothed_losses: tuple[float, ...]
    stopped_reason: str
    suggested_bounds: tuple[float, float]

    def plot(self, path: str | PathLike) -> None:
        """Write the loss against the learning rate (log scale) to a PNG file.

        The raw loss is drawn faintly, the smoothed loss on top with its
        minimum marked, and the suggested bounds are shaded. Uses matplotlib's Agg canvas directly,
        so the pyplot backend and state are left alone.

        Args:
            path: Where to write the PNG file.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rates = np.asarray(self.learning_rates, dtype=np.float64)
        raw = np.asarray(self.losses, dtype=np.float64)
        smoothed = np.asarray(self.smoothed_losses, dtype=np.float64)
        figure = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        shown = np.isfinite(raw)
        axes.plot(rates[shown], raw[shown], color="0.75", linewidth=1, label="loss")
        shown = np.isfinite(smoothed)
        axes.plot(rates[shown], smoothed[shown], color="C0", linewidth=2, label="smoothed loss")
        low, high = self.suggested_bounds
        axes.axvspan(low, high, color="C2", alpha=0.15)
        for bound, name, side in ((low, "low", -1), (high, "high", 1)):
            axes.axvline(bound, color="C2", linestyle="--", linewidth=1)
            axes.annotate(
                f"{name} {bound:.2g}",
                (bound, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3 * side, -12),
                textcoords="offset points",
                horizontalalignment="left" if side > 0 else "right",
                color="C2",
            )
        if shown.any():
            finite = smoothed[shown]
            lowest = int(np.argmin(finite))
            axes.plot(
                rates[shown][lowest], finite[lowest], "o", color="C0", label="smoothed minimum"
            )
            # Keep the divergence from squashing the interesting part of the curve.
            top, bottom = finite[: lowest + 1].max(), finite.min()
            raw_finite = raw[np.isfinite(raw)]
            if raw_finite.size:
                bottom = min(bottom, raw_finite.min())
            margin = 0.1 * (top - bottom) or 0.1 * abs(top) or 1.0
            axes.set_ylim(bottom - margin, top + 2 * margin)
        axes.set_xscale("log")
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss")
        axes.set_title(f"Learning-rate range test ({self.stopped_reason})")
        axes.legend(loc="lower left")
        figure.tight_layout()
        figure.savefig(path, format="png")


# -- the whole test ----------------------------------------------------------------------


def _fit_arguments(x: Any, batch_size: int | None, steps: int) -> dict:
    """The `fit` arguments (besides `y`) that make at least `steps` batches."""
    tf = sys.modules.get("tensorflow")  # a tf.data.Dataset implies it is imported
    if tf is not None and isinstance(x, tf.data.Dataset):
        # Repeated, any dataset (finite, infinite, or of unknown size) gives
        # `steps` batches in one epoch, without Keras's "ran out of data".
        return dict(x=x.repeat(), epochs=1, steps_per_epoch=steps, shuffle=False)
    first = keras.tree.flatten(x)[0] if x is not None else None
    if first is not None and hasattr(first, "shape") and len(first.shape) > 0:
        per_epoch = math.ceil(int(first.shape[0]) / (batch_size or 32))
        if per_epoch > 0:
            epochs = math.ceil(steps / per_epoch)
            return dict(x=x, epochs=epochs, batch_size=batch_size, shuffle=True)
    # Other inputs (generators, PyDataset): batched already; each epoch yields a
    # batch at least, and the callback stops the run.
    return dict(x=x, epochs=steps, shuffle=False)


def _snapshot(variables: list) -> list[np.ndarray]:
    return [np.array(variable.numpy(), copy=True) for variable in variables]


def _restore(variables: list, values: list[np.ndarray]) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def lr_range_test(
    model: keras.Model,
    x: Any,
    y: Any = None,
    *,
    batch_size: int | None = 32,
    min_learning_rate: float = 1e-7,
    max_learning_rate: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
    verbose: Any = 0,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> RangeTestResult:
    """Run a learning-rate range test on a compiled model, then undo it.

    The model is trained with `model.fit` for `steps` batches (fewer if the
    loss diverges) while `LRRangeTest` sweeps the learning rate from
    `min_learning_rate` to `max_learning_rate` geometrically. Afterwards,
    also when training raised, every model variable (weights, and the
    states of random seed generators), every optimizer variable (moments,
    step counter) and the learning rate are restored bit for bit. An
    optimizer that was not built is built first (its fresh state, zero
    moments at step 0, is what gets restored).

    Args:
        model: A built model, compiled with an optimizer whose learning rate
            is a float (not a schedule).
        x: Inputs as for `model.fit`: NumPy arrays (or tensors, or a dict or
            list of them), shuffled each epoch, with enough epochs to reach
            `steps` batches; or a `tf.data.Dataset` of batches, repeated as
            needed (shuffle it yourself if it should be).
        y: Targets, for array inputs.
        batch_size: Batch size for array inputs (None: Keras's default, 32);
            ignored for datasets, which are batched already.
        min_learning_rate: The first learning rate, > 0.
        max_learning_rate: The last learning rate, > `min_learning_rate`.
        steps: Number of batches of the sweep, an integer >= 2.
        smoothing: β of the loss's exponential moving average, in [0, 1).
        divergence_factor: Stop once the smoothed loss exceeds this multiple
            of its lowest value so far, > 1.
        verbose: Passed to `model.fit`.
        callbacks: More callbacks for `model.fit`, run after the range
            test's own. What they change outside the model and optimizer
            variables (files, logs) is not undone.

    Returns:
        The `RangeTestResult`, with `suggested_bounds` from `suggest_bounds`.

    Raises:
        ValueError: if an argument is not valid, the model is not compiled
            or not built, its learning rate is a schedule, the data ran out
            before the sweep ended, or no bounds can be suggested from the
            curve (see `suggest_bounds`).
    """
    finder = LRRangeTest(min_learning_rate, max_learning_rate, steps, smoothing, divergence_factor)
    if not isinstance(model, keras.Model):
        raise invalid("model", model, "a keras.Model")
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise invalid(
            "model",
            model,
            "compiled with an optimizer: call `model.compile(optimizer=keras_adam.Adam(), "
            "loss=...)` first",
        )
    if not model.built:
        raise invalid(
            "model",
            model,
            "built, so that its weights can be saved and restored: give it a `keras.Input` "
            "or call `model.build(input_shape)` first",
        )
    integer("batch_size", batch_size, 1, optional=True)
    optimizer = model.optimizer
    learning_rate = _settable_learning_rate(optimizer)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)

    model_variables = list(model.variables)
    optimizer_variables = list(optimizer.variables)
    saved_model = _snapshot(model_variables)
    saved_optimizer = _snapshot(optimizer_variables)
    saved_learning_rate = np.array(learning_rate.numpy(), copy=True)
    stop_training = getattr(model, "stop_training", False)
    had_history, history = hasattr(model, "history"), getattr(model, "history", None)
    try:
        model.fit(
            y=y,
            verbose=verbose,
            callbacks=[finder, *(callbacks or [])],
            **_fit_arguments(x, batch_size, finder.steps),
        )
    finally:
        _restore(model_variables, saved_model)
        _restore(optimizer_variables, saved_optimizer)
        learning_rate.assign(saved_learning_rate)
        model.stop_training = stop_training
        if had_history:
            model.history = history

    if finder.stopped_reason is None:
        raise ValueError(
            f"The data ran out after {len(finder.losses)} of {finder.steps} batches of the "
            "range test; pass more data or fewer `steps`."
        )
    try:
        bounds = suggest_bounds(finder.learning_rates, finder.smoothed_losses)
    except ValueError as error:
        raise ValueError(
            f"No learning-rate bounds can be suggested from the range test (stopped: "
            f"{finder.stopped_reason}, after {len(finder.losses)} batches): {error} "
            "To inspect the curve, run `model.fit` with an `LRRangeTest` callback."
        ) from error
    return RangeTestResult(
        learning_rates=tuple(finder.learning_rates),
        losses=tuple(finder.losses),
        smoothed_losses=tuple(finder.smoothed_losses),
        stopped_reason=finder.stopped_reason,
        suggested_bounds=bounds,
    )
