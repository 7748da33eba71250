"""KerasTuner tuners for Adam: trial timing and reports, and a Hyperband that keeps Adam's state.

`make_tuner` builds one of four searches by name (`TUNERS`) around an
oracle from `tuning.oracles` (`make_oracle`). All share `AdamTuner`, which
times every trial and keeps its per-epoch logs (`trial_<id>/seconds.json`
and `history.json`, see `tuning.records`, so resumed and distributed
searches keep them) and reports each finished trial to a callback.

Hyperband trains a promising configuration further by starting a new trial
from the old one's best-epoch checkpoint. Keras 3 weight files hold the
optimizer's variables too, but KerasTuner's `Hyperband` loads them into an
optimizer that is not built yet, and `keras.optimizers.Adam` then skips them
with a warning: Adam restarts with zero moments at step 1, and its bias
correction treats the continued run as brand new. `AdamHyperband` builds
the optimizer before loading, so a continued trial resumes Adam's moments
and step counter exactly. (`keras_adam.Adam` also keeps state loaded before
it is built and restores it in `build`, so KerasTuner's own `Hyperband`
carries it as well.)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import keras
import keras_tuner
from keras_tuner.src.engine import tuner_utils

from tuning import oracles
from tuning.output import atomic_open
from tuning.records import (
    HISTORY_FILE,
    SECONDS_FILE,
    SETTLED_METRIC,
    read_trial_file,
    settled_score,
)
from tuning.tensorboard import TrialLog

#: Tuner names accepted by `make_tuner` and the `--tuner` option.
TUNERS = ("random", "bayesian", "hyperband", "grid")


class AdamTuner(keras_tuner.Tuner):
    """A `keras_tuner.Tuner` that times trials and reports each one as it ends.

    Args:
        oracle: The KerasTuner oracle (the search algorithm).
        hypermodel: The `tuning.AdamHyperModel`.
        on_trial_end: Called with `(tuner, trial_id, seconds)` after each
            trial has been recorded by the oracle, or None.
        on_trial_begin: Called with `(tuner, trial)` as a trial starts, or None.
        **kwargs: `keras_tuner.Tuner` arguments (directory, project_name,
            overwrite, ...).
    """

    def __init__(
        self,
        oracle: keras_tuner.Oracle,
        hypermodel: keras_tuner.HyperModel,
        *,
        on_trial_end: Callable[[AdamTuner, str, float], None] | None = None,
        on_trial_begin: Callable[[AdamTuner, Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        """See the class docstring."""
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        self._report_end = on_trial_end
        self._report_begin = on_trial_begin
        self._started = 0.0

    def on_trial_begin(self, trial: Any) -> None:
        """Start the trial's clock."""
        super().on_trial_begin(trial)
        # Nothing of the previous trial is recorded for this one if it fails before `fit`.
        for name in ("fit_seconds", "history"):
            if hasattr(self.hypermodel, name):
                setattr(self.hypermodel, name, None)
        self._started = time.perf_counter()
        if self._report_begin is not None:
            self._report_begin(self, trial)

    #: Whether trials save their best epoch's weights (only Hyperband reads them back).
    checkpoints = False

    #: Where trials write their TensorBoard runs (`tuning.tensorboard`), or None.
    tensorboard: str | None = None

    def search(self, *args: Any, **kwargs: Any) -> None:
        """KerasTuner's search, with the heap alive at its start frozen (see `frozen_heap`)."""
        with frozen_heap():
            super().search(*args, **kwargs)

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        """Build and train the trial's model; KerasTuner's own, less the checkpoint it never reads.

        KerasTuner saves the model's weights at every improving epoch of
        every trial, for `get_best_models`; `search` never calls it, so
        those writes would only slow every trial down. With `tensorboard`
        set the trial writes its TensorBoard run (`TrialLog`), and its
        results carry its settled score to the oracle (`_with_settled`).
        """
        if self.tensorboard is not None:
            log = TrialLog(
                self.tensorboard,
                trial.trial_id,
                self.hypermodel.space.values_from(trial.hyperparameters.values),
                self.oracle.objective.name,
            )
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), log]
        if self.checkpoints:
            histories = super().run_trial(trial, *args, **kwargs)
        else:
            original = kwargs.pop("callbacks", [])
            callbacks = self._deepcopy_callbacks(original)
            self._configure_tensorboard_dir(callbacks, trial, 0)
            callbacks.append(tuner_utils.TunerCallback(self, trial))
            histories = [
                self._build_and_fit_model(trial, *args, **copy.copy(kwargs), callbacks=callbacks)
            ]
        return [self._with_settled(history) for history in histories]

    def _with_settled(self, history: Any) -> Any:
        """`history` and the trial's settled score, as one more metric for the oracle.

        KerasTuner reports each metric's value at the trial's best epoch;
        the settled score (the objective's mean over the last
        `SETTLED_EPOCHS` epochs) goes in as `SETTLED_METRIC`, the same at
        every epoch, so that the oracle (`oracles.BayesianOracle`) can model
        the score the winner is chosen by. The trial's own logs, which
        `HISTORY_FILE` keeps, are left as they are.
        """
        logs = getattr(history, "history", None)
        objective = getattr(self.oracle.objective, "name", None)
        if not isinstance(logs, dict) or not logs.get(objective):
            return history
        settled = settled_score(logs[objective])
        if settled is None:
            return history
        reported = keras.callbacks.History()
        reported.history = {**logs, SETTLED_METRIC: [settled] * len(logs[objective])}
        return reported

    def on_trial_end(self, trial: Any) -> None:
        """Record the trial's seconds and epochs, let the oracle score it, then report it."""
        seconds = time.perf_counter() - self._started
        directory = self.get_trial_dir(trial.trial_id)
        fit_seconds = getattr(self.hypermodel, "fit_seconds", None)
        with atomic_open(os.path.join(directory, SECONDS_FILE)) as f:
            json.dump({"seconds": seconds, "fit_seconds": fit_seconds}, f)
        history = getattr(self.hypermodel, "history", None)
        if history is not None:
            with atomic_open(os.path.join(directory, HISTORY_FILE)) as f:
                json.dump(history, f, allow_nan=True)
        super().on_trial_end(trial)
        if self._report_end is not None:
            self._report_end(self, trial.trial_id, seconds)

    def trial_seconds(self, trial_id: str, key: str = "seconds") -> float | None:
        """Seconds the trial took (`key="fit_seconds"`: in `fit`), or None if unknown."""
        seconds = read_trial_file(self.project_dir, trial_id, SECONDS_FILE)
        try:
            return float(seconds[key])
        except (KeyError, TypeError, ValueError):
            return None

    def trial_history(self, trial_id: str) -> dict | None:
        """The trial's per-epoch logs, e.g. `{"val_loss": [...]}`, or None if unknown."""
        history = read_trial_file(self.project_dir, trial_id, HISTORY_FILE)
        return history if isinstance(history, dict) else None


class AdamHyperband(AdamTuner):
    """Hyperband whose continued trials resume Adam's moments and step counter.

    Takes the same arguments as `AdamTuner`, with a
    `keras_tuner.oracles.HyperbandOracle`.
    """

    checkpoints = True

    def run_trial(self, trial: Any, *fit_args, **fit_kwargs) -> Any:
        """Train for the epochs the Hyperband bracket gives this trial."""
        values = trial.hyperparameters.values
        if "tuner/epochs" in values:
            fit_kwargs["epochs"] = values["tuner/epochs"]
            fit_kwargs["initial_epoch"] = values["tuner/initial_epoch"]
        return super().run_trial(trial, *fit_args, **fit_kwargs)

    def _build_hypermodel(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        model = super()._build_hypermodel(hp)
        previous = hp.values.get("tuner/trial_id")
        if previous is not None:
            # The previous trial's best epoch: weights and, built first so that
            # they load now and are checked now, Adam's variables.
            if not model.built:
                model.build_from_config(json.loads(_read(self._get_build_config_fname(previous))))
            model.optimizer.build(model.trainable_variables)
            model.load_weights(self._get_checkpoint_fname(previous))
        return model


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive on entry out of garbage collection until exit.

    KerasTuner runs two full garbage collections before building each trial's
    model (`keras.backend.clear_session()` and `gc.collect()`), as the
    comparison runs one per run. With TensorFlow, Keras and KerasTuner loaded
    the heap is large, and every full collection walks all of it: on small
    problems that is a visible part of a search's wall time (docs/tuning.md
    measures it). Freezing (`gc.freeze`) moves the objects alive on entry to
    a generation the collector skips, so each collection walks only what was
    created since, and every trial's garbage is still freed before the next
    trial. On exit they are unfrozen, so anything that became garbage
    meanwhile is collected as usual. If the caller froze the heap already,
    this changes nothing.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_oracle(
    name: str,
    *,
    objective: Any,
    max_trials: int | None,
    epochs: int,
    seed: int,
) -> keras_tuner.Oracle:
    """The oracle (search algorithm, see `tuning.oracles`) for a tuner name.

    Args:
        name: One of `TUNERS`.
        objective: The KerasTuner objective.
        max_trials: The trial budget. Hyperband sets its own number of
            trials from `epochs`; `max_trials` then caps it.
        epochs: Training epochs per trial (Hyperband's most).
        seed: The search's seed; 0 is a seed like any other.

    Returns:
        The oracle, seeded.
    """
    if name not in TUNERS:
        raise ValueError(
            f"Argument `tuner` must be one of {', '.join(TUNERS)}. Received: tuner={name!r}"
        )
    # Diverging trials fail (and are recorded) without stopping the search.
    common = {
        "objective": objective,
        "seed": seed or None,
        "max_consecutive_failed_trials": 10**9,
    }
    # Each starts with default Adam (GridSearch's first point is the defaults already).
    if name == "random":
        oracle = oracles.RandomOracle(max_trials=max_trials, **common)
    elif name == "bayesian":
        oracle = oracles.BayesianOracle(max_trials=max_trials, **common)
    elif name == "grid":
        oracle = keras_tuner.oracles.GridSearchOracle(max_trials=max_trials, **common)
    else:
        oracle = oracles.HyperbandOracle(max_epochs=max(epochs, 2), **common)
        oracle.max_trials = max_trials
    oracles.seed_oracle(oracle, seed)
    return oracle


def make_tuner(name: str, hypermodel: keras_tuner.HyperModel, **kwargs: Any) -> AdamTuner:
    """An `AdamTuner` (or `AdamHyperband` for "hyperband") around the named oracle.

    Args:
        name: One of `TUNERS`.
        hypermodel: The `tuning.AdamHyperModel`.
        **kwargs: `make_oracle` arguments (objective, max_trials, epochs,
            seed) and `AdamTuner` arguments (directory, project_name,
            overwrite, on_trial_end, on_trial_begin).

    Returns:
        The tuner; if its project directory holds a search and `overwrite`
        is false, the search is reloaded and resumes.
    """
    oracle_args = {k: kwargs.pop(k) for k in ("objective", "max_trials", "epochs", "seed")}
    oracle = make_oracle(name, **oracle_args)
    cls = AdamHyperband if name == "hyperband" else AdamTuner
    return cls(oracle, hypermodel, **kwargs)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
