"""`search`: tune Adam's β1, β2 and η on a model and data, and measure the result.

Example:
    ```python
    import keras
    import tuning
    from tuning.datasets import load_dataset

    data = load_dataset("digits")

    def build_model():
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])

    result = tuning.search(
        build_model, data.x_train, data.y_train,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], tuner="bayesian", max_trials=12, epochs=10,
    )
    print(result.table())
    print(result.comparison.summary())
    model.compile(optimizer=result.optimizer, ...)
    ```
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import keras_tuner
import numpy as np

from keras_adam import validation
from tuning import distributed
from tuning.hypermodel import AdamHyperModel, DivergenceGuard
from tuning.results import Comparison, SearchResult, TrialRecord
from tuning.space import DEFAULTS, AdamSearchSpace
from tuning.tuners import TUNERS, AdamTuner, make_tuner

_MINIMIZED = ("loss", "error", "mse", "mae", "crossentropy")
_MAXIMIZED = ("acc", "auc", "precision", "recall", "f1")


def objective_direction(objective: str) -> str:
    """The direction, "min" or "max", of a metric such as "val_loss" or "val_accuracy".

    Raises:
        ValueError: if the direction cannot be told from the name; pass a
            `keras_tuner.Objective(name, direction)` instead.
    """
    name = objective.lower()
    if any(word in name for word in _MINIMIZED):
        return "min"
    if any(word in name for word in _MAXIMIZED):
        return "max"
    raise ValueError(
        f"Argument `objective` must name a loss or an accuracy-like metric, or be a "
        f"keras_tuner.Objective(name, direction). Received: objective={objective!r}"
    )


def _reason(message: str | None) -> str | None:
    """The last line of a failed trial's traceback, without FailedTrialError's class name."""
    if not message:
        return None
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return None
    return re.sub(r"^[\w.]*FailedTrialError: ", "", lines[-1].strip())


def trial_record(tuner: AdamTuner, trial: Any, space: AdamSearchSpace) -> TrialRecord:
    """A `TrialRecord` for a KerasTuner trial."""
    score = trial.score
    score = None if score is None or not math.isfinite(float(score)) else float(score)
    status = str(trial.status)
    return TrialRecord(
        trial_id=str(trial.trial_id),
        status=status,
        hyperparameters=space.values_from(trial.hyperparameters.values),
        score=score if status == "COMPLETED" else None,
        seconds=tuner.trial_seconds(trial.trial_id),
        reason=_reason(trial.message) if status != "COMPLETED" else None,
    )


def search(
    build_model: Callable[..., keras.Model],
    x: Any,
    y: Any = None,
    *,
    validation_data: Any = None,
    validation_split: float = 0.2,
    test_data: tuple | None = None,
    loss: Any = "sparse_categorical_crossentropy",
    metrics: Sequence | None = ("accuracy",),
    objective: str | keras_tuner.Objective = "val_loss",
    tuner: str = "bayesian",
    max_trials: int | None = 20,
    epochs: int = 10,
    batch_size: int | None = 32,
    seed: int = 0,
    space: AdamSearchSpace | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    compile_options: Mapping[str, Any] | None = None,
    early_stopping: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    directory: str = "runs",
    project: str = "adam",
    overwrite: bool = False,
    comparison_repeats: int = 3,
    worker_timeout: float = 600.0,
    on_trial_begin: Callable[[Any], None] | None = None,
    on_trial_end: Callable[[TrialRecord], None] | None = None,
    verbose: int = 0,
) -> SearchResult | None:
    """Search Adam's hyperparameters for a model, then compare the best with default Adam.

    Every trial builds the model from the same initial weights, compiles it
    with a `keras_adam.Adam` sampled from `space`, trains it for `epochs` on
    `(x, y)` and is scored by the objective's best epoch on the validation
    data. A trial whose loss turns NaN or infinite is recorded as FAILED
    with its reason and the search goes on.

    The search lives in `directory/project`: run again without `overwrite`
    and it resumes, keeping finished trials and running only the missing
    ones (a larger `max_trials` adds trials).

    Under KerasTuner's chief/worker environment variables (see
    `tuning.distributed`), the chief serves the search and returns the
    result; a worker runs trials and returns None.

    Args:
        build_model: Returns an uncompiled `keras.Model`; may take a
            `keras_tuner.HyperParameters` to tune the model too.
        x: Training inputs (or a dataset), as for `Model.fit`.
        y: Training targets.
        validation_data: As for `Model.fit`; if None, the last
            `validation_split` of the training data is held out.
        validation_split: Used when `validation_data` is None.
        test_data: `(x, y)` evaluated at the end of each comparison run
            (reported as `test_*` metrics), or None.
        loss: As for `Model.compile`.
        metrics: As for `Model.compile`.
        objective: The metric to optimize, e.g. "val_loss" (minimized) or
            "val_accuracy" (maximized), or a `keras_tuner.Objective`.
        tuner: "random", "bayesian", "hyperband" or "grid".
        max_trials: The trial budget (it also picks what is searched, see
            `AdamSearchSpace`). For Hyperband, a cap on its own count.
        epochs: Epochs per trial (Hyperband's maximum).
        batch_size: As for `Model.fit`.
        seed: Seed of the search and of the initial weights; 0 is a seed.
        space: The search space; default `AdamSearchSpace()`.
        optimizer_options: `keras_adam.Adam` arguments fixed in every trial.
        compile_options: Other `Model.compile` arguments.
        early_stopping: Patience in epochs on the objective, or None.
        callbacks: More Keras callbacks for every training run.
        directory: Parent directory of the search.
        project: The search's name (its folder in `directory`).
        overwrite: Start afresh, deleting a previous search of that name.
        comparison_repeats: Training runs (seeds) per optimizer when
            comparing the best with default Adam; 0 skips the comparison.
        worker_timeout: Distributed mode: the chief gives up after this many
            seconds without a call from any worker (so it must exceed the
            longest trial), and a worker after waiting this long for the chief.
        on_trial_begin: Called with each KerasTuner trial as it starts.
        on_trial_end: Called with the `TrialRecord` of each finished trial.
        verbose: Verbosity of `Model.fit` in trials.

    Returns:
        The `SearchResult`, or None on a distributed worker.

    Raises:
        ValueError: for an invalid argument (named in the message).
        RuntimeError: if no trial completed.
        tuning.distributed.WorkerTimeoutError: if distributed workers fall silent.
    """
    validation.integer("max_trials", max_trials, 1, optional=tuner == "hyperband")
    validation.integer("epochs", epochs, 1)
    validation.integer("batch_size", batch_size, 1, optional=True)
    validation.integer("early_stopping", early_stopping, 1, optional=True)
    validation.integer("comparison_repeats", comparison_repeats, 0)
    validation.integer("seed", seed, 0)
    if tuner not in TUNERS:
        raise ValueError(
            f"Argument `tuner` must be one of {', '.join(TUNERS)}. Received: tuner={tuner!r}"
        )
    if validation_data is None and not 0 < validation_split < 1:
        raise ValueError(
            "Argument `validation_split` must be in (0, 1) when no validation_data is given. "
            f"Received: validation_split={validation_split!r}"
        )
    if not isinstance(worker_timeout, int | float) or not worker_timeout > 0:
        raise ValueError(
            "Argument `worker_timeout` must be positive. "
            f"Received: worker_timeout={worker_timeout!r}"
        )
    if isinstance(objective, str):
        objective = keras_tuner.Objective(objective, objective_direction(objective))
    space = (space or AdamSearchSpace()).for_budget(max_trials)
    hypermodel = AdamHyperModel(
        build_model,
        space=space,
        loss=loss,
        metrics=list(metrics) if metrics is not None else None,
        compile_options=compile_options,
        optimizer_options=optimizer_options,
        seed=seed,
    )
    space = hypermodel.space

    def report_end(tuner_: AdamTuner, trial_id: str, seconds: float) -> None:
        if on_trial_end is not None:
            on_trial_end(trial_record(tuner_, tuner_.oracle.get_trial(trial_id), space))

    def report_begin(tuner_: AdamTuner, trial: Any) -> None:
        if on_trial_begin is not None:
            on_trial_begin(trial)

    kt = make_tuner(
        tuner,
        hypermodel,
        objective=objective,
        max_trials=max_trials,
        epochs=epochs,
        seed=seed,
        directory=directory,
        project_name=project,
        # A worker never starts afresh: KerasTuner would delete the shared project.
        overwrite=overwrite and distributed.role() != "worker",
        on_trial_end=report_end,
        on_trial_begin=report_begin,
    )
    kt.oracle.verbose = 0
    fit_kwargs = _fit_kwargs(
        x,
        y,
        validation_data=validation_data,
        validation_split=validation_split,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=callbacks,
        early_stopping=early_stopping,
        objective=objective,
        verbose=verbose,
    )
    where = distributed.role()
    if where == "worker":
        distributed.limit_worker_wait(worker_timeout)
    if where == "chief":
        kt.save()
        distributed.serve_oracle(kt.oracle, worker_timeout=worker_timeout)
    else:
        args, kwargs = fit_kwargs
        kt.search(*args, **kwargs)
        if where == "worker":
            return None

    records = tuple(
        trial_record(kt, trial, space)
        for trial in sorted(kt.oracle.trials.values(), key=lambda t: _order(t.trial_id))
    )
    completed = [r for r in records if r.status == "COMPLETED" and r.score is not None]
    if not completed:
        reasons = "; ".join(f"trial {r.trial_id}: {r.reason}" for r in records if r.reason)
        raise RuntimeError(f"No trial completed. {reasons}")
    pick = min if objective.direction == "min" else max
    best = pick(completed, key=lambda r: r.score)
    best_trial = kt.oracle.get_trial(best.trial_id)
    comparison = None
    if comparison_repeats:
        comparison = compare(
            hypermodel,
            best_trial.hyperparameters,
            best.hyperparameters,
            fit_kwargs,
            objective=objective,
            repeats=comparison_repeats,
            seed=seed,
            test_data=test_data,
        )
    return SearchResult(
        best_hyperparameters=best.hyperparameters,
        optimizer=hypermodel.optimizer(best.hyperparameters),
        objective=objective.name,
        direction=objective.direction,
        score=best.score,
        trials=records,
        tuned=space.tuned_names(),
        tuner=tuner,
        comparison=comparison,
        project_dir=kt.project_dir,
    )


def _order(trial_id: str) -> tuple:
    return (0, int(trial_id)) if str(trial_id).isdigit() else (1, str(trial_id))


def _fit_kwargs(
    x: Any,
    y: Any,
    *,
    validation_data: Any,
    validation_split: float,
    epochs: int,
    batch_size: int | None,
    callbacks: Sequence,
    early_stopping: int | None,
    objective: keras_tuner.Objective,
    verbose: int,
) -> tuple[tuple, dict]:
    kwargs: dict = {"epochs": epochs, "verbose": verbose, "callbacks": list(callbacks)}
    if y is not None:
        kwargs["y"] = y
    if batch_size is not None and not _is_dataset(x):
        kwargs["batch_size"] = batch_size
    if validation_data is not None:
        kwargs["validation_data"] = validation_data
    else:
        kwargs["validation_split"] = validation_split
    if early_stopping is not None:
        kwargs["callbacks"].append(
            keras.callbacks.EarlyStopping(
                monitor=objective.name, mode=objective.direction, patience=early_stopping
            )
        )
    return (x,), kwargs


def _is_dataset(x: Any) -> bool:
    return not isinstance(x, np.ndarray | list | tuple | dict) and hasattr(x, "__iter__")


def _best_epoch(history: Mapping[str, list], objective: keras_tuner.Objective) -> float:
    values = [float(v) for v in history.get(objective.name, [])]
    if not values or not all(math.isfinite(v) for v in values):
        return float("nan")
    return min(values) if objective.direction == "min" else max(values)


def compare(
    hypermodel: AdamHyperModel,
    hp: keras_tuner.HyperParameters,
    tuned: Mapping[str, Any],
    fit_kwargs: tuple[tuple, dict],
    *,
    objective: keras_tuner.Objective,
    repeats: int,
    seed: int,
    test_data: tuple | None = None,
) -> Comparison:
    """Train the tuned optimizer and default Adam the same way and score both.

    Each repeat `r` builds the model (with the best trial's model
    hyperparameters `hp`) from seed `seed + r`, once per optimizer, and
    trains it with `fit_kwargs`. Repeat 0 therefore reproduces the search's
    own initial weights.

    Args:
        hypermodel: The search's hypermodel.
        hp: The best trial's hyperparameters (for model hyperparameters).
        tuned: The tuned optimizer's five hyperparameters.
        fit_kwargs: `(args, kwargs)` for `Model.fit`, as in the trials.
        objective: The objective.
        repeats: Runs per optimizer.
        seed: The first seed.
        test_data: `(x, y)` to evaluate each run on, or None.

    Returns:
        The `Comparison`.
    """
    args, kwargs = fit_kwargs
    scores: dict = {"tuned": [], "default": []}
    metrics: dict = {"tuned": [], "default": []}
    for label, values in (("tuned", dict(tuned)), ("default", dict(DEFAULTS))):
        for repeat in range(repeats):
            keras.backend.clear_session()
            model = hypermodel.build_compiled(hp.copy(), seed=seed + repeat, values=values)
            guard = DivergenceGuard()
            run_kwargs = dict(kwargs, callbacks=[*kwargs["callbacks"], guard])
            history = model.fit(*args, **run_kwargs).history
            scores[label].append(float("nan") if guard.reason else _best_epoch(history, objective))
            last = {k: float(v[-1]) for k, v in history.items() if v}
            if test_data is not None and guard.reason is None:
                evaluated = model.evaluate(*test_data, verbose=0, return_dict=True)
                last.update({f"test_{k}": float(v) for k, v in evaluated.items()})
            metrics[label].append(last)
    return Comparison(
        objective=objective.name,
        direction=objective.direction,
        tuned_scores=tuple(scores["tuned"]),
        default_scores=tuple(scores["default"]),
        tuned_metrics=_mean_metrics(metrics["tuned"]),
        default_metrics=_mean_metrics(metrics["default"]),
    )


def _mean_metrics(runs: list[dict]) -> dict:
    keys = sorted({k for run in runs for k in run})
    return {
        k: float(np.mean([run.get(k, float("nan")) for run in runs])) if runs else float("nan")
        for k in keys
    }
