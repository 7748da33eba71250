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
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import keras_tuner
import numpy as np

from keras_adam import validation
from tuning import distributed
from tuning import fingerprint as fingerprints
from tuning.hypermodel import AdamHyperModel, DivergenceGuard, _takes_hp
from tuning.inference import check_loss, infer_loss
from tuning.results import (
    HELD_OUT,
    Comparison,
    SearchResult,
    TrialRecord,
    best_trial,
    settled_score,
)
from tuning.space import DEFAULT_EPOCHS, DEFAULT_MAX_TRIALS, DEFAULTS, AdamSearchSpace
from tuning.tuners import TUNERS, AdamTuner, frozen_heap, make_tuner

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
    history = tuner.trial_history(trial.trial_id) or {}
    objective = getattr(tuner.oracle.objective, "name", None)
    return TrialRecord(
        trial_id=str(trial.trial_id),
        status=status,
        hyperparameters=space.values_from(trial.hyperparameters.values),
        score=score if status == "COMPLETED" else None,
        seconds=tuner.trial_seconds(trial.trial_id),
        reason=_reason(trial.message) if status != "COMPLETED" else None,
        fit_seconds=tuner.trial_seconds(trial.trial_id, key="fit_seconds"),
        settled=settled_score(history.get(objective)) if status == "COMPLETED" else None,
    )


def search(
    build_model: Callable[..., keras.Model],
    x: Any,
    y: Any = None,
    *,
    validation_data: Any = None,
    validation_split: float = 0.2,
    test_data: tuple | None = None,
    loss: Any = None,
    metrics: Sequence | None = None,
    objective: str | keras_tuner.Objective = "val_loss",
    tuner: str = "bayesian",
    max_trials: int | None = DEFAULT_MAX_TRIALS,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int | None = 32,
    seed: int = 0,
    space: AdamSearchSpace | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    compile_options: Mapping[str, Any] | None = None,
    early_stopping: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    directory: str = "runs",
    project: str | None = None,
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
    data. The first trial is default Adam (or the fixed values), so the
    table shows where the search started. The winner is the trial whose
    objective settled best: its mean over the last 5 epochs (see
    `tuning.results.best_trial`: a best epoch alone favours noisy curves).
    A trial whose loss turns NaN or infinite is recorded as FAILED with its
    reason and the search goes on.

    The winner is then judged against default Adam on data that took no
    part in selection (see `tuning.Comparison`): `test_data` when given;
    otherwise, for array data, `HOLDOUT_FRACTION` of `(x, y)` is held out
    of the search for it (the comparison says so).

    The search lives in `directory/project`, with a fingerprint of what
    defines it (`tuning.fingerprint`): run the same search again and it
    resumes, keeping finished trials and running only the missing ones (a
    larger `max_trials` adds trials); a different search there is refused
    unless `overwrite`.

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
        test_data: `(x, y)` on which the tuned optimizer and default Adam
            are judged; None holds part of `(x, y)` out instead.
        loss: As for `Model.compile`; None infers it from the model's last
            layer and the targets (see `tuning.inference`) or raises a
            `ValueError` naming `loss`. A cross-entropy that expects
            probabilities on a model that outputs logits (or the reverse)
            is refused.
        metrics: As for `Model.compile`; None adds accuracy for
            classification and nothing for regression.
        objective: The metric to optimize, e.g. "val_loss" (minimized) or
            "val_accuracy" (maximized), or a `keras_tuner.Objective`.
        tuner: "random", "bayesian", "hyperband" or "grid".
        max_trials: The trial budget (it also picks what is searched, see
            `AdamSearchSpace`). For Hyperband, a cap on its own count.
        epochs: Epochs per trial (Hyperband's maximum).
        batch_size: As for `Model.fit`.
        seed: Seed of the search and of the trials' initial weights; 0 is
            a seed. The comparison's runs use seeds `seed + 1`, ...
        space: The search space; default `AdamSearchSpace()`.
        optimizer_options: `keras_adam.Adam` arguments fixed in every trial.
        compile_options: Other `Model.compile` arguments.
        early_stopping: Patience in epochs on the objective, or None.
        callbacks: More Keras callbacks for every training run.
        directory: Parent directory of the search.
        project: The search's name (its folder in `directory`); None names
            it after its fingerprint ("search-<hash>"), so that the same
            search resumes and another starts its own.
        overwrite: Start afresh, deleting a previous search of that name.
        comparison_repeats: Training runs (seeds) per optimizer when
            comparing the best with default Adam; 0 skips the comparison
            (and the holdout).
        worker_timeout: Distributed mode: the chief gives up after this many
            seconds without a call from any worker (so it must exceed the
            longest trial), and a worker after waiting this long for the chief.
        on_trial_begin: Called with each KerasTuner trial as it starts.
        on_trial_end: Called with the `TrialRecord` of each finished trial.
        verbose: Verbosity of `Model.fit` in trials.

    Returns:
        The `SearchResult`, or None on a distributed worker.

    Raises:
        ValueError: for an invalid argument (named in the message), a loss
            that cannot be inferred or does not fit the model's output.
        tuning.fingerprint.SearchMismatchError: (a `ValueError`) if
            `directory/project` holds a different search.
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
        metrics=None,
        compile_options=compile_options,
        optimizer_options=optimizer_options,
        seed=seed,
    )
    space = hypermodel.space
    model = _inspection_model(build_model, seed)
    if loss is None:
        loss, inferred_metrics, _ = infer_loss(model, y)
    else:
        check_loss(model, loss)
        try:
            inferred_metrics = infer_loss(model, y)[1]
        except ValueError:
            inferred_metrics = []
    metrics = inferred_metrics if metrics is None else list(metrics)
    hypermodel.loss, hypermodel.metrics = loss, metrics

    held_out = "validation"
    if comparison_repeats:
        if test_data is not None:
            held_out = "test_data"
        elif _splittable(x, y):
            x, y, test_data = _hold_out(x, y)
            held_out = "holdout"
    parts = {
        "model": fingerprints.model_config(model),
        "data": fingerprints.describe_data(
            {"x": x, "y": y, "validation_data": validation_data, "test_data": test_data}
        ),
        "validation": None if validation_data is not None else validation_split,
        "objective": [objective.name, objective.direction],
        "space": space.to_json(),
        "loss": _describe(loss),
        "metrics": [_describe(m) for m in metrics],
        "options": [_describe(hypermodel.optimizer_options), _describe(compile_options)],
        "epochs": epochs,
        "batch_size": batch_size,
        "early_stopping": early_stopping,
        "tuner": tuner,
        "seed": seed,
    }
    hashes = fingerprints.fingerprint(parts)
    project = project or f"search-{hashes['search'][:10]}"
    where = distributed.role()
    project_dir = os.path.join(directory, project)
    if where != "worker":
        fingerprints.check(project_dir, hashes, overwrite=overwrite)
    del model

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
    if where != "worker":
        fingerprints.write(kt.project_dir, hashes)
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
    best = best_trial(records, objective.direction)
    if best is None:
        reasons = "; ".join(f"trial {r.trial_id}: {r.reason}" for r in records if r.reason)
        raise RuntimeError(f"No trial completed. {reasons}")
    winner = kt.oracle.get_trial(best.trial_id)
    comparison = None
    if comparison_repeats:
        comparison = compare(
            hypermodel,
            winner.hyperparameters,
            best.hyperparameters,
            fit_kwargs,
            objective=objective,
            repeats=comparison_repeats,
            seed=seed,
            test_data=test_data,
            held_out=held_out,
        )
    return SearchResult(
        best_hyperparameters=best.hyperparameters,
        optimizer_config=hypermodel.optimizer(best.hyperparameters).get_config(),
        objective=objective.name,
        direction=objective.direction,
        score=best.score,
        settled=best.settled,
        trials=records,
        tuned=space.tuned_names(),
        tuner=tuner,
        comparison=comparison,
        project_dir=kt.project_dir,
    )


#: Share of `(x, y)` held out of the search to judge the winner when no test data is given.
HOLDOUT_FRACTION = 0.2

#: Seed of the holdout's draw: fixed, so that every search on the same data holds out the same.
HOLDOUT_SEED = 0


def _inspection_model(build_model: Callable[..., keras.Model], seed: int) -> keras.Model:
    """The model as the first trial builds it, to infer the loss and fingerprint the search."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_model(keras_tuner.HyperParameters()) if _takes_hp(build_model) else build_model()
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Argument `build_model` must return a keras.Model. "
            f"Received: {type(model).__name__} from build_model={build_model!r}"
        )
    return model


def _describe(value: Any) -> Any:
    """A JSON-ready description of a loss, metric or options, for the fingerprint."""
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "get_config"):
        try:
            config = value.get_config()
        except (NotImplementedError, TypeError):
            config = {}
        config = {k: v for k, v in config.items() if k != "name"}
        return {"class": type(value).__name__, "config": _describe(config)}
    return getattr(value, "__name__", type(value).__name__)


def _splittable(x: Any, y: Any) -> bool:
    return (
        isinstance(x, np.ndarray)
        and isinstance(y, np.ndarray)
        and len(x) == len(y)
        and len(x) >= 10
    )


def _hold_out(x: np.ndarray, y: np.ndarray) -> tuple:
    """`(x, y, (x_held, y_held))`: a random `HOLDOUT_FRACTION` held out, the rest in order."""
    n = len(x)
    held = np.zeros(n, dtype=bool)
    held[
        np.random.default_rng(HOLDOUT_SEED).permutation(n)[: max(1, round(n * HOLDOUT_FRACTION))]
    ] = True
    return x[~held], y[~held], (x[held], y[held])


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


class _KeepBestEpoch(keras.callbacks.Callback):
    """Restores the weights of the epoch whose monitored value was best, when training ends."""

    def __init__(self, objective: keras_tuner.Objective) -> None:
        super().__init__()
        self.objective = objective
        self.best: float | None = None
        self.weights: list | None = None
        self.logs: dict = {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.objective.name)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        better = self.best is None or (
            value < self.best if self.objective.direction == "min" else value > self.best
        )
        if better:
            self.best, self.weights = value, self.model.get_weights()
            self.logs = {k: float(v) for k, v in (logs or {}).items()}

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


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
    held_out: str | None = None,
) -> Comparison:
    """Train the tuned optimizer and default Adam the same way and judge both on held-out data.

    Repeat `r` builds the model (with the best trial's model hyperparameters
    `hp`) from seed `seed + 1 + r`, initial weights the search never saw,
    once per optimizer; trains it with `fit_kwargs`; keeps the weights of
    the epoch whose validation objective was best (as trials are scored);
    and scores it on `test_data`. Without `test_data`, runs are scored on
    the validation objective itself (optimistic: it chose the winner).

    Args:
        hypermodel: The search's hypermodel.
        hp: The best trial's hyperparameters (for model hyperparameters).
        tuned: The tuned optimizer's five hyperparameters.
        fit_kwargs: `(args, kwargs)` for `Model.fit`, as in the trials.
        objective: The search's objective.
        repeats: Runs per optimizer.
        seed: The search's seed.
        test_data: `(x, y)` held out of the search, or None.
        held_out: What `test_data` is ("test_data" or "holdout"); ignored
            without `test_data`.

    Returns:
        The `Comparison`.
    """
    if test_data is None:
        held_out = "validation"
    held_out = held_out or "test_data"
    if held_out not in HELD_OUT:
        raise ValueError(f"Argument `held_out` must be one of {', '.join(HELD_OUT)}.")
    name = objective.name
    metric = name[4:] if held_out != "validation" and name.startswith("val_") else name
    args, kwargs = fit_kwargs
    scores: dict = {"tuned": [], "default": []}
    metrics: dict = {"tuned": [], "default": []}
    runs = [
        (repeat, label, values)
        for repeat in range(repeats)
        for label, values in (("tuned", dict(tuned)), ("default", dict(DEFAULTS)))
    ]
    with frozen_heap():
        for repeat, label, values in runs:
            keras.backend.clear_session()
            model = hypermodel.build_compiled(hp.copy(), seed=seed + 1 + repeat, values=values)
            guard, keep = DivergenceGuard(), _KeepBestEpoch(objective)
            run_kwargs = dict(kwargs, callbacks=[*kwargs["callbacks"], guard, keep])
            model.fit(*args, **run_kwargs)
            logs = {k: v for k, v in keep.logs.items() if k.startswith("val_")}
            score = float("nan")
            if guard.reason is None and keep.weights is not None:
                if test_data is None:
                    score = keep.best
                else:
                    evaluated = model.evaluate(*test_data, verbose=0, return_dict=True)
                    logs.update({f"test_{k}": float(v) for k, v in evaluated.items()})
                    score = float(evaluated.get(metric, float("nan")))
            scores[label].append(score)
            metrics[label].append(logs)
    return Comparison(
        objective=name,
        metric=metric,
        direction=objective.direction,
        held_out=held_out,
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
