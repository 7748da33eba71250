"""KerasTuner tuners for Adam: trial timing and reports, and continued trials keeping Adam's state.

`make_tuner` builds one of five searches by name (`TUNERS`) around an
oracle from `tuning.oracles` or `tuning.asha` (`make_oracle`). All share
`AdamTuner`, which times every trial and keeps its per-epoch logs
(`trial_<id>/seconds.json` and `history.json`, see `tuning.records`, so
resumed and distributed searches keep them) and reports each finished
trial to a callback.

ASHA (`AdamAsha`) continues a promoted trial itself: the same trial
trains its next rung from the checkpoint it saved at the end of the last
one (weights, Adam's moments and step counter), and its records grow into
one history.

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

import collections
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

from tuning import asha, oracles
from tuning.output import atomic_open
from tuning.records import (
    HISTORY_FILE,
    SECONDS_FILE,
    SETTLED_METRIC,
    read_trial_file,
    settled_score,
)
from tuning.space import DEFAULT_MAX_TRIALS
from tuning.tensorboard import TrialLog

#: Tuner names accepted by `make_tuner` and the `--tuner` option.
TUNERS = ("random", "bayesian", "hyperband", "grid", "asha")

#: Configurations an ASHA search tries by default: with its default two
#: rungs, about 0.85 of the epochs of `space.DEFAULT_MAX_TRIALS` full trials
#: (30 × a third of the epochs, then a third of them to the end).
ASHA_MAX_TRIALS = 30


def default_max_trials(tuner: str) -> int | None:
    """The budget of a search that names none: 20 trials; ASHA 30 configurations.

    Hyperband's is None: the number of trials its brackets make.
    """
    return {"asha": ASHA_MAX_TRIALS, "hyperband": None}.get(tuner, DEFAULT_MAX_TRIALS)


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
        self._earlier: dict = {}

    def on_trial_begin(self, trial: Any) -> None:
        """Start the trial's clock."""
        super().on_trial_begin(trial)
        # Nothing of the previous trial is recorded for this one if it fails before `fit`.
        for name in ("fit_seconds", "history"):
            if hasattr(self.hypermodel, name):
                setattr(self.hypermodel, name, None)
        self._earlier = {}
        self._started = time.perf_counter()
        if self._report_begin is not None:
            self._report_begin(self, trial)

    #: Whether trials save their best epoch's weights (only Hyperband reads them back).
    checkpoints = False

    #: Where trials write their TensorBoard runs (`tuning.tensorboard`), or None.
    tensorboard: str | None = None

    #: Whether a trial may train again from a later epoch as the same trial
    #: (ASHA's promotions), its earlier records then read back (`_records_before`).
    continues_trials = False

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

        A trial whose values hold `tuner/epochs` (Hyperband, ASHA) trains
        to that epoch from `tuner/initial_epoch`; if the trial itself trained
        those first epochs before (`continues_trials`: an ASHA trial promoted
        to its next rung), its records so far are read back to continue
        them (`_earlier`).
        """
        values = trial.hyperparameters.values
        if asha.EPOCHS_KEY in values:
            kwargs["epochs"] = values[asha.EPOCHS_KEY]
            kwargs["initial_epoch"] = values[asha.INITIAL_EPOCH_KEY]
        self._earlier = self._records_before(trial.trial_id, kwargs.get("initial_epoch", 0))
        if self.tensorboard is not None:
            log = TrialLog(
                self.tensorboard,
                trial.trial_id,
                self.hypermodel.space.values_from(values),
                self.oracle.objective.name,
                earlier=self._earlier["history"].get(self.oracle.objective.name, []),
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

    def _records_before(self, trial_id: str, epoch: int) -> dict:
        """What this trial recorded of its first `epoch` epochs: history and seconds.

        Empty unless the trial's own `history.json` holds those epochs (a
        continued ASHA trial); longer lists, from a rung cut short by a
        kill, are cut back to `epoch` epochs.
        """
        earlier: dict = {"history": {}, "seconds": 0.0, "fit_seconds": 0.0}
        history = self.trial_history(trial_id) if epoch and self.continues_trials else None
        objective = self.oracle.objective.name
        if not history or len(history.get(objective, ())) < epoch:
            return earlier
        earlier["history"] = {key: list(values[:epoch]) for key, values in history.items()}
        for key in ("seconds", "fit_seconds"):
            earlier[key] = self.trial_seconds(trial_id, key) or 0.0
        return earlier

    def _joined(self, logs: dict | None) -> dict | None:
        """The run's per-epoch logs after the trial's earlier epochs (`_records_before`)."""
        before = self._earlier.get("history")
        if not before or logs is None:
            return logs
        missing = [float("nan")] * len(next(iter(before.values())))
        return {key: [*before.get(key, missing), *values] for key, values in logs.items()}

    def _with_settled(self, history: Any) -> Any:
        """`history` and the trial's settled score, as one more metric for the oracle.

        KerasTuner reports each metric's value at the trial's best epoch;
        the settled score (the objective's mean over the last
        `SETTLED_EPOCHS` epochs) goes in as `SETTLED_METRIC`, the same at
        every epoch, so that the oracle (`oracles.BayesianOracle`) can model
        the score the winner is chosen by. A continued trial's logs are
        reported whole, its earlier epochs first, so that its best epoch
        and settled score are those of all its epochs. The trial's own
        logs, which `HISTORY_FILE` keeps, are left as they are.
        """
        logs = self._joined(getattr(history, "history", None))
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
        seconds = time.perf_counter() - self._started + self._earlier.get("seconds", 0.0)
        directory = self.get_trial_dir(trial.trial_id)
        fit_seconds = getattr(self.hypermodel, "fit_seconds", None)
        if fit_seconds is not None:
            fit_seconds += self._earlier.get("fit_seconds", 0.0)
        with atomic_open(os.path.join(directory, SECONDS_FILE)) as f:
            json.dump({"seconds": seconds, "fit_seconds": fit_seconds}, f)
        history = self._joined(getattr(self.hypermodel, "history", None))
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
    `keras_tuner.oracles.HyperbandOracle`. (`AdamTuner.run_trial` trains
    the epochs the Hyperband bracket gives the trial.)
    """

    checkpoints = True

    def _build_hypermodel(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        model = super()._build_hypermodel(hp)
        previous = hp.values.get("tuner/trial_id")
        if previous is not None:
            # The previous trial's best epoch.
            restore(
                model,
                self._get_build_config_fname(previous),
                self._get_checkpoint_fname(previous),
            )
        return model


class AdamAsha(AdamTuner):
    """ASHA's tuner: a promoted trial continues from the checkpoint of its last rung.

    Takes the same arguments as `AdamTuner`, with a `tuning.asha.AshaOracle`.
    A trial that ends a rung below the last saves its model's weights and
    Adam's variables (`checkpoint_path`); when the oracle promotes it, the
    model is built, that state loaded, and training goes on at the next
    epoch. Each trial keeps only the checkpoint it may continue from.
    """

    #: Seconds a worker waits before asking again when the oracle has nothing for it yet.
    idle_seconds = 0.5

    #: Models of the last trials that ended a rung, kept in memory to continue
    #: without a rebuild, a checkpoint load and a new trace of `fit`'s step
    #: (ASHA often promotes a trial that just ended its rung); 0: always load.
    cached_models = 2

    continues_trials = True

    def __init__(self, oracle: asha.AshaOracle, *args: Any, **kwargs: Any) -> None:
        """See the class docstring."""
        # A distributed worker talks to the chief's oracle through a client
        # that exposes only KerasTuner's calls: keep what it cannot tell.
        self.last_rung = oracle.rungs[-1]
        super().__init__(oracle, *args, **kwargs)
        self._asked = False
        self._resume: tuple[str, str] | None = None
        self._model: keras.Model | None = None
        self._cache: collections.OrderedDict[str, tuple[int, keras.Model]] = (
            collections.OrderedDict()
        )

    def checkpoint_path(self, trial_id: str, epochs: int) -> str:
        """Where the trial's state after `epochs` epochs is saved."""
        return os.path.join(self.get_trial_dir(trial_id), f"after_{epochs}_epochs.weights.h5")

    def pre_create_trial(self) -> None:
        """Pause before asking again if the last answer was "IDLE"."""
        if self._asked:
            time.sleep(self.idle_seconds)
        self._asked = True

    def on_trial_begin(self, trial: Any) -> None:
        """The oracle gave a trial: no pause before the next request."""
        self._asked = False
        super().on_trial_begin(trial)

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        """Train the trial's rung: from its checkpoint if promoted, saving one unless last."""
        values = trial.hyperparameters.values
        start, end = values[asha.INITIAL_EPOCH_KEY], values[asha.EPOCHS_KEY]
        self._resume = None
        if start:
            self._resume = (trial.trial_id, self.checkpoint_path(trial.trial_id, start))
        callbacks = list(kwargs.get("callbacks", []))
        if start:
            # The continued epochs draw their own shuffles, not the first epochs' again.
            callbacks.append(Reseed(self.hypermodel.seed + start))
        if end < self.last_rung:
            callbacks.append(RungCheckpoint(self.checkpoint_path(trial.trial_id, end)))
        return super().run_trial(trial, *args, **{**kwargs, "callbacks": callbacks})

    def _run_and_update_trial(self, trial: Any, *fit_args: Any, **fit_kwargs: Any) -> None:
        """Train the rung and report each of its epochs to the oracle, at its epoch.

        KerasTuner reports a trial's best epoch only; ASHA ranks trials by
        their score at each rung (`asha.rung_score`), so the oracle is
        given the whole curve. The settled score of all the trial's epochs
        goes with the last.
        """
        results = self.run_trial(trial, *fit_args, **fit_kwargs)
        tuner_utils.validate_trial_results(results, self.oracle.objective, "Tuner.run_trial()")
        start = trial.hyperparameters.values[asha.INITIAL_EPOCH_KEY]
        end = trial.hyperparameters.values[asha.EPOCHS_KEY]
        logs = self.hypermodel.history or {}
        epochs = max((len(values) for values in logs.values()), default=0)
        if self.cached_models and end < self.last_rung and start + epochs == end:
            self._cache[trial.trial_id] = (end, self._model)
            while len(self._cache) > self.cached_models:
                self._cache.popitem(last=False)
        self._model = None
        settled = results[0].history.get(SETTLED_METRIC, [None])[-1]
        for index in range(epochs):
            metrics = {k: v[index] for k, v in logs.items() if index < len(v)}
            if index == epochs - 1 and settled is not None:
                metrics[SETTLED_METRIC] = settled
            self.oracle.update_trial(trial.trial_id, metrics, step=start + index)

    def _try_build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        """The trial's model: kept in memory from its last rung, or built (and restored)."""
        start = hp.values[asha.INITIAL_EPOCH_KEY]
        cached = self._cache.pop(self._resume[0], None) if self._resume else None
        if cached is not None and cached[0] == start:
            keras.backend.clear_session()  # as KerasTuner does before each build
            self._model = cached[1]
        else:
            self._model = super()._try_build(hp)
        return self._model

    def _build_hypermodel(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        model = super()._build_hypermodel(hp)
        if self._resume is not None:
            trial_id, checkpoint = self._resume
            restore(model, self._get_build_config_fname(trial_id), checkpoint)
        return model

    def on_trial_end(self, trial: Any) -> None:
        """Record the rung, then drop the checkpoints the trial can no longer continue from."""
        super().on_trial_end(trial)
        values = trial.hyperparameters.values
        # A completed rung may be promoted; an invalid one may be retried
        # (KerasTuner's retries) from where it began; a failed trial is over.
        epochs = {"COMPLETED": values[asha.EPOCHS_KEY], "INVALID": values[asha.INITIAL_EPOCH_KEY]}
        kept = epochs.get(str(trial.status))
        if kept is not None:
            kept = os.path.basename(self.checkpoint_path(trial.trial_id, kept))
        directory = self.get_trial_dir(trial.trial_id)
        for name in os.listdir(directory):
            if name.startswith("after_") and name.endswith(".weights.h5") and name != kept:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))


class Reseed(keras.callbacks.Callback):
    """Sets the random seed as training begins (after `fit`'s own set-up has drawn from it).

    A continued trial's shuffles then depend only on the seed: the same
    whether its model was kept in memory or built and loaded, which draw
    different amounts of randomness before training begins on JAX and
    PyTorch.

    Args:
        seed: The seed, for `keras.utils.set_random_seed`.
    """

    def __init__(self, seed: int) -> None:
        """See the class docstring."""
        super().__init__()
        self.seed = seed

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Seed Python, NumPy and the backends."""
        keras.utils.set_random_seed(self.seed)


class RungCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights and optimizer state at the end of training, atomically.

    Nothing is saved when training was stopped (early stopping, divergence):
    such a trial is not continued.

    Args:
        path: The `.weights.h5` file to write.
    """

    def __init__(self, path: str) -> None:
        """See the class docstring."""
        super().__init__()
        self.path = path

    def on_train_end(self, logs: dict | None = None) -> None:
        """Write `path` (through a temporary file that replaces it whole)."""
        if self.model.stop_training:
            return
        partial = self.path[: -len(".weights.h5")] + ".partial.weights.h5"
        self.model.save_weights(partial)
        os.replace(partial, self.path)


def restore(model: keras.Model, build_config: str, weights: str) -> None:
    """Load a saved trial state into a fresh model: weights and Adam's variables, step included.

    The optimizer is built first, so that its variables load now and are
    checked now (see the module docstring).
    """
    if not model.built:
        model.build_from_config(json.loads(_read(build_config)))
    model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)


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
    min_epochs: int | None = None,
    reduction_factor: int = asha.REDUCTION_FACTOR,
) -> keras_tuner.Oracle:
    """The oracle (search algorithm, see `tuning.oracles` and `tuning.asha`) for a tuner name.

    Args:
        name: One of `TUNERS`.
        objective: The KerasTuner objective.
        max_trials: The trial budget. Hyperband sets its own number of
            trials from `epochs`; `max_trials` then caps it. For ASHA, the
            number of configurations.
        epochs: Training epochs per trial (Hyperband's and ASHA's most).
        seed: The search's seed; 0 is a seed like any other.
        min_epochs: ASHA: the first rung's least epochs (None: a third of `epochs`).
        reduction_factor: ASHA: the rungs' ratio (`asha.rung_epochs`).

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
    elif name == "asha":
        oracle = asha.AshaOracle(
            epochs=epochs,
            min_epochs=min_epochs,
            reduction_factor=reduction_factor,
            max_trials=max_trials,
            **common,
        )
    else:
        oracle = oracles.HyperbandOracle(max_epochs=max(epochs, 2), **common)
        oracle.max_trials = max_trials
    oracles.seed_oracle(oracle, seed)
    return oracle


def make_tuner(name: str, hypermodel: keras_tuner.HyperModel, **kwargs: Any) -> AdamTuner:
    """An `AdamTuner` (`AdamHyperband`, `AdamAsha`) around the named oracle.

    Args:
        name: One of `TUNERS`.
        hypermodel: The `tuning.AdamHyperModel`.
        **kwargs: `make_oracle` arguments (objective, max_trials, epochs,
            seed, min_epochs, reduction_factor) and `AdamTuner` arguments
            (directory, project_name, overwrite, on_trial_end, on_trial_begin).

    Returns:
        The tuner; if its project directory holds a search and `overwrite`
        is false, the search is reloaded and resumes.
    """
    names = ("objective", "max_trials", "epochs", "seed", "min_epochs", "reduction_factor")
    oracle = make_oracle(name, **{k: kwargs.pop(k) for k in names if k in kwargs})
    cls = {"hyperband": AdamHyperband, "asha": AdamAsha}.get(name, AdamTuner)
    return cls(oracle, hypermodel, **kwargs)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
