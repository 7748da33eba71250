"""A KerasTuner HyperModel that compiles the user's model with a sampled `keras_adam.Adam`."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import keras
import keras_tuner
import numpy as np

import keras_adam
from tuning.inference import check_loss
from tuning.space import NAMES, AdamSearchSpace


def _takes_hp(build_model: Callable) -> bool:
    try:
        parameters = inspect.signature(build_model).parameters.values()
    except (TypeError, ValueError):  # builtins, some C callables
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return bool(positional)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss and remembers why.

    Attributes:
        reason: None while training is sound, else a sentence such as
            "diverged: loss=nan at epoch 3, batch 17".
    """

    def __init__(self) -> None:
        """Create a guard with no reason recorded."""
        super().__init__()
        self.reason: str | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Remember the epoch for the message."""
        self._epoch = epoch

    def _check(self, logs: dict | None, where: str) -> None:
        for key, value in (logs or {}).items():
            if "loss" not in key or self.reason is not None:
                continue
            value = float(value)
            if not math.isfinite(value):
                self.reason = f"diverged: {key}={value} at {where}"
                self.model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Check the running loss of the batch."""
        self._check(logs, f"epoch {self._epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Check the epoch's losses, validation included."""
        self._check(logs, f"the end of epoch {epoch + 1}")


class AdamHyperModel(keras_tuner.HyperModel):
    """Builds the user's model and compiles it with a sampled `keras_adam.Adam`.

    Every trial starts from the same initial weights (the random seed is set
    before each build), so trials differ only by their hyperparameters.

    Args:
        build_model: Returns an uncompiled `keras.Model`. It may take a
            `keras_tuner.HyperParameters` argument and tune the model too.
        space: The Adam search space; its `tuned` names decide what is
            searched (see `AdamSearchSpace.for_budget`).
        loss: The loss, as for `Model.compile` (required when building; a
            cross-entropy whose `from_logits` contradicts the model's last
            layer is refused, see `tuning.inference`).
        metrics: Metrics, as for `Model.compile`.
        compile_options: Other `Model.compile` arguments (e.g. `jit_compile`).
        optimizer_options: `keras_adam.Adam` arguments held fixed in every
            trial (e.g. `{"amsgrad": True}`). Any of the five searched
            hyperparameters given here is removed from the search and fixed.
        seed: The random seed set before each build.

    Raises:
        ValueError: if `optimizer_options` is not accepted by `keras_adam.Adam`.
    """

    def __init__(
        self,
        build_model: Callable[..., keras.Model],
        *,
        space: AdamSearchSpace | None = None,
        loss: Any = None,
        metrics: Any = None,
        compile_options: Mapping[str, Any] | None = None,
        optimizer_options: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        """Validate the arguments (see the class docstring)."""
        super().__init__(name="adam_hypermodel")
        if not callable(build_model):
            raise TypeError(
                f"Argument `build_model` must be callable. Received: build_model={build_model!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(
                f"Argument `seed` must be a non-negative integer. Received: seed={seed!r}"
            )
        options = dict(optimizer_options or {})
        fixed = {name: options.pop(name) for name in NAMES if name in options}
        space = space or AdamSearchSpace()
        if fixed:
            space = space.fixed(**fixed)
        keras_adam.Adam(**options)  # raises ValueError/TypeError naming a bad option
        self.build_model = build_model
        self.space = space
        self.loss = loss
        self.metrics = metrics
        self.compile_options = dict(compile_options or {})
        for key in ("optimizer", "loss", "metrics"):
            if key in self.compile_options:
                raise ValueError(
                    f"Argument `compile_options` must not contain {key!r}: "
                    f"{'the optimizer is tuned' if key == 'optimizer' else f'pass {key}= itself'}."
                )
        self.optimizer_options = options
        self.seed = seed
        self.fit_seconds: float | None = None
        #: The last `fit`'s per-epoch logs (`History.history`), for the trial's records.
        self.history: dict | None = None

    def optimizer(self, values: Mapping[str, Any]) -> keras_adam.Adam:
        """A `keras_adam.Adam` from the five hyperparameters and the fixed options."""
        arguments = {**self.optimizer_options, **values}
        if arguments.get("weight_decay") is None:
            arguments.pop("weight_decay", None)
        return keras_adam.Adam(**arguments)

    def build_compiled(
        self,
        hp: keras_tuner.HyperParameters,
        *,
        seed: int | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> keras.Model:
        """Build and compile a model.

        Args:
            hp: The trial's hyperparameters (Adam's are sampled from it unless
                `values` is given).
            seed: The random seed for the initial weights; defaults to `seed`.
            values: Adam's five hyperparameters, to use instead of sampling.

        Returns:
            The compiled model.
        """
        keras.utils.set_random_seed(self.seed if seed is None else seed)
        sampled = self.space.declare(hp)
        model = self.build_model(hp) if _takes_hp(self.build_model) else self.build_model()
        if not isinstance(model, keras.Model):
            raise TypeError(
                "Argument `build_model` must return a keras.Model. "
                f"Received: {type(model).__name__} from build_model={self.build_model!r}"
            )
        if self.loss is None:
            raise ValueError(
                "Argument `loss` is required: pass the loss to AdamHyperModel (tuning.search "
                "infers it from the model and targets)."
            )
        check_loss(model, self.loss)
        model.compile(
            optimizer=self.optimizer(sampled if values is None else values),
            loss=self.loss,
            metrics=self.metrics,
            **self.compile_options,
        )
        return model

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """Build and compile the trial's model (KerasTuner calls this)."""
        return self.build_compiled(hp)

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, **kwargs) -> Any:
        """Train; a trial whose loss becomes NaN or infinite fails with its reason.

        Raises:
            keras_tuner.errors.FailedTrialError: on divergence. KerasTuner
                records the trial as FAILED with this message, and goes on.
        """
        guard = DivergenceGuard()
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), guard]
        started = time.perf_counter()
        history = model.fit(*args, **kwargs)
        self.fit_seconds = time.perf_counter() - started
        self.history = {
            key: [float(v) for v in values]
            for key, values in history.history.items()
            if all(np.ndim(v) == 0 for v in values)  # scalars (not, say, per-class F1)
        }
        if guard.reason is not None:
            raise keras_tuner.errors.FailedTrialError(guard.reason)
        return history
