"""`search`: tune Adam's β1, β2 and η on a model and data, and measure the result.

`search` runs in phases, each a function of one `SearchPlan` (the search's
arguments, checked by `SearchPlan.validated`, and the values they
determine):

1. `_prepare`: the data and the model (the space for the budget, the
   hypermodel, the loss and metrics, the held-out data, `Model.fit`'s
   arguments);
2. `_fingerprint`: what defines the search, its project, and the check
   that its directory holds this search (which then resumes) or none;
3. `_run_tuner`: the KerasTuner search (or its chief's or a worker's part);
4. `_winner`: the trials' records, and the trial that settled best;
5. `_compare`: the winner against default Adam, on held-out data;
6. `_result`: the `SearchResult`.

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

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import keras_tuner
import numpy as np

from keras_adam import validation
from tuning import asha, distributed
from tuning import fingerprint as fingerprints
from tuning.comparison import Comparison, compare
from tuning.hypermodel import AdamHyperModel, _takes_hp
from tuning.inference import check_loss, infer_loss
from tuning.records import TrialRecord, best_trial, trial_record, trial_records
from tuning.results import SearchResult
from tuning.space import DEFAULT_EPOCHS, AdamSearchSpace
from tuning.tensorboard import write_experiment
from tuning.tuners import TUNERS, AdamTuner, default_max_trials, make_tuner

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
    max_trials: int | None = None,
    epochs: int = DEFAULT_EPOCHS,
    min_epochs: int | None = None,
    reduction_factor: int | None = None,
    batch_size: int | None = 32,
    seed: int = 0,
    space: AdamSearchSpace | None = None,
    optimizer_options: Mapping[str, Any] | None = None,
    compile_options: Mapping[str, Any] | None = None,
    early_stopping: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    tensorboard: str | os.PathLike | None = None,
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

    Every trial builds the model from the same initial weights and trains
    it with a `keras_adam.Adam` sampled from `space`; the winner is the
    trial whose objective settled best, and it is then judged against
    default Adam on data that took no part in selection. The search lives
    in `directory/project` and resumes when run again. The tuning guide
    (docs/tuning.md) tells the details: the first trial, failed trials,
    the winner, the held-out data, resuming and distributed searches.

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
        tuner: "random", "bayesian", "hyperband", "grid" or "asha"
            (asynchronous successive halving, `tuning.asha`: most trials
            stop after a few epochs, the best train on from where they
            stopped).
        max_trials: The trial budget (it also picks what is searched, see
            `AdamSearchSpace`); None: 20 (`space.DEFAULT_MAX_TRIALS`). For
            Hyperband, a cap on its own count (None: no cap). For ASHA, the
            number of configurations; None: 30
            (`tuning.tuners.ASHA_MAX_TRIALS`), which train about 0.85 of
            the epochs of 20 full trials.
        epochs: Epochs per trial (Hyperband's and ASHA's maximum).
        min_epochs: ASHA only: the least epochs of the first rung (default
            `epochs / reduction_factor`, rounded: a third of them,
            `tuning.asha.default_min_epochs`; the rungs are
            `tuning.asha.rung_epochs`).
        reduction_factor: ASHA only: the ratio of consecutive rungs'
            epochs, and the inverse of the share of trials that go on
            (default 3; at least 2).
        batch_size: As for `Model.fit`.
        seed: Seed of the search and of the trials' initial weights; 0 is
            a seed. The comparison's runs use seeds `seed + 1`, ...
        space: The search space; default `AdamSearchSpace()`.
        optimizer_options: `keras_adam.Adam` arguments fixed in every trial.
        compile_options: Other `Model.compile` arguments.
        early_stopping: Patience in epochs on the objective, or None.
        callbacks: More Keras callbacks for every training run.
        tensorboard: A directory to write each trial's curves and
            hyperparameters to, for TensorBoard's HParams dashboard
            (`tuning.tensorboard`); None writes none.
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
    plan = SearchPlan.validated(**locals())  # every argument, by name
    _prepare(plan)
    _fingerprint(plan)
    tuner_ = _run_tuner(plan)
    if tuner_ is None:  # a distributed worker: the chief returns the result
        return None
    records, best = _winner(plan, tuner_)
    return _result(plan, tuner_, records, best, _compare(plan, tuner_, best))


@dataclass
class SearchPlan:
    """One search: the validated arguments of `search`, and the values its phases derive.

    The fields up to `verbose` are `search`'s arguments (see there),
    validated, with `objective` a `keras_tuner.Objective` and `space` never
    None. `_prepare` then replaces `space` by the hypermodel's (for the
    budget, less the fixed options), `loss` and `metrics` by what the
    model and targets imply, and `x`, `y` and `test_data` when part of
    `(x, y)` is held out. The fields after `verbose` are derived: `role`
    from the environment, the others by the phases named below.

    Attributes:
        role: "single", "chief" or "worker" (`tuning.distributed.role`).
        hypermodel: The search's `AdamHyperModel` (`_prepare`).
        held_out: What the comparison is judged on: "test_data",
            "holdout" or "validation" (`_prepare`).
        fit_args: `(args, kwargs)` for `Model.fit`, in the trials and the
            comparison (`_prepare`).
        model_config: The model's config, for the fingerprint (`_prepare`).
        hashes: The search's fingerprint (`_fingerprint`).
    """

    build_model: Callable[..., keras.Model]
    x: Any
    y: Any
    validation_data: Any
    validation_split: float
    test_data: tuple | None
    loss: Any
    metrics: Sequence | None
    objective: keras_tuner.Objective
    tuner: str
    max_trials: int | None
    epochs: int
    min_epochs: int | None
    reduction_factor: int | None
    batch_size: int | None
    seed: int
    space: AdamSearchSpace
    optimizer_options: Mapping[str, Any] | None
    compile_options: Mapping[str, Any] | None
    early_stopping: int | None
    callbacks: Sequence[keras.callbacks.Callback]
    tensorboard: str | os.PathLike | None
    directory: str
    project: str | None
    overwrite: bool
    comparison_repeats: int
    worker_timeout: float
    on_trial_begin: Callable[[Any], None] | None
    on_trial_end: Callable[[TrialRecord], None] | None
    verbose: int
    role: str = "single"
    hypermodel: AdamHyperModel | None = None
    held_out: str = "validation"
    fit_args: tuple[tuple, dict] | None = None
    model_config: Any = None
    hashes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def validated(cls, **arguments: Any) -> SearchPlan:
        """The plan of a search with these arguments of `search`.

        Raises:
            ValueError: for an invalid argument, named in the message.
        """
        plan = cls(**arguments)
        if plan.max_trials is None and plan.tuner in TUNERS:
            plan.max_trials = default_max_trials(plan.tuner)
        validation.integer("max_trials", plan.max_trials, 1, optional=plan.tuner == "hyperband")
        validation.integer("epochs", plan.epochs, 1)
        validation.integer("batch_size", plan.batch_size, 1, optional=True)
        validation.integer("early_stopping", plan.early_stopping, 1, optional=True)
        validation.integer("comparison_repeats", plan.comparison_repeats, 0)
        validation.integer("seed", plan.seed, 0)
        if plan.tuner not in TUNERS:
            raise ValueError(
                f"Argument `tuner` must be one of {', '.join(TUNERS)}. "
                f"Received: tuner={plan.tuner!r}"
            )
        for name in ("min_epochs", "reduction_factor"):
            if plan.tuner != "asha" and getattr(plan, name) is not None:
                raise ValueError(
                    f"Argument `{name}` applies to tuner='asha' only. "
                    f"Received: {name}={getattr(plan, name)!r} with tuner={plan.tuner!r}"
                )
        if plan.tuner == "asha":
            if plan.reduction_factor is None:
                plan.reduction_factor = asha.REDUCTION_FACTOR
            validation.integer("reduction_factor", plan.reduction_factor, 2)
            if plan.min_epochs is None:
                plan.min_epochs = asha.default_min_epochs(plan.epochs, plan.reduction_factor)
            asha.rung_epochs(plan.epochs, plan.min_epochs, plan.reduction_factor)  # or raise
        if plan.validation_data is None and not 0 < plan.validation_split < 1:
            raise ValueError(
                "Argument `validation_split` must be in (0, 1) when no validation_data is "
                f"given. Received: validation_split={plan.validation_split!r}"
            )
        if plan.tensorboard is not None:
            if not isinstance(plan.tensorboard, str | os.PathLike) or not os.fspath(
                plan.tensorboard
            ):
                raise ValueError(
                    "Argument `tensorboard` must be a directory (a path) or None. "
                    f"Received: tensorboard={plan.tensorboard!r}"
                )
            plan.tensorboard = os.fspath(plan.tensorboard)
        timeout = plan.worker_timeout
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(
                f"Argument `worker_timeout` must be positive. Received: worker_timeout={timeout!r}"
            )
        if isinstance(plan.objective, str):
            plan.objective = keras_tuner.Objective(
                plan.objective, objective_direction(plan.objective)
            )
        plan.space = plan.space or AdamSearchSpace()
        plan.role = distributed.role()
        return plan


def _prepare(plan: SearchPlan) -> None:
    """The data and the model: hypermodel, loss and metrics, held-out data, fit arguments."""
    plan.hypermodel = AdamHyperModel(
        plan.build_model,
        space=plan.space.for_budget(plan.max_trials),
        loss=plan.loss,
        metrics=None,
        compile_options=plan.compile_options,
        optimizer_options=plan.optimizer_options,
        seed=plan.seed,
    )
    plan.space = plan.hypermodel.space
    model = _inspection_model(plan.build_model, plan.seed)
    if plan.loss is None:
        plan.loss, inferred_metrics, _ = infer_loss(model, plan.y)
    else:
        check_loss(model, plan.loss)
        try:
            inferred_metrics = infer_loss(model, plan.y)[1]
        except ValueError:
            inferred_metrics = []
    plan.metrics = inferred_metrics if plan.metrics is None else list(plan.metrics)
    plan.hypermodel.loss, plan.hypermodel.metrics = plan.loss, plan.metrics
    plan.model_config = fingerprints.model_config(model)
    if plan.comparison_repeats:
        if plan.test_data is not None:
            plan.held_out = "test_data"
        elif _splittable(plan.x, plan.y):
            plan.x, plan.y, plan.test_data = _hold_out(plan.x, plan.y)
            plan.held_out = "holdout"
    plan.fit_args = _fit_args(plan)


def _fingerprint(plan: SearchPlan) -> None:
    """Fingerprint the search, name its project, and refuse another search in its directory."""
    hypermodel = plan.hypermodel
    parts = {
        "model": plan.model_config,
        "data": fingerprints.describe_data(
            {
                "x": plan.x,
                "y": plan.y,
                "validation_data": plan.validation_data,
                "test_data": plan.test_data,
            }
        ),
        "validation": None if plan.validation_data is not None else plan.validation_split,
        "objective": [plan.objective.name, plan.objective.direction],
        "space": plan.space.to_json(),
        "loss": _describe(plan.loss),
        "metrics": [_describe(m) for m in plan.metrics],
        "options": [_describe(hypermodel.optimizer_options), _describe(plan.compile_options)],
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "early_stopping": plan.early_stopping,
        "tuner": plan.tuner,
        "seed": plan.seed,
    }
    if plan.tuner == "asha":
        parts["tuner"] = {
            "name": plan.tuner,
            "min_epochs": plan.min_epochs,
            "reduction_factor": plan.reduction_factor,
        }
    plan.hashes = fingerprints.fingerprint(parts)
    plan.project = plan.project or f"search-{plan.hashes['search'][:10]}"
    if plan.role != "worker":
        project_dir = os.path.join(plan.directory, plan.project)
        fingerprints.check(project_dir, plan.hashes, overwrite=plan.overwrite)


def _run_tuner(plan: SearchPlan) -> AdamTuner | None:
    """Run the trials (a chief serves them to workers); the tuner, or None on a worker."""

    def report_end(tuner_: AdamTuner, trial_id: str, seconds: float) -> None:
        if plan.on_trial_end is not None:
            plan.on_trial_end(trial_record(tuner_, tuner_.oracle.get_trial(trial_id), plan.space))

    def report_begin(tuner_: AdamTuner, trial: Any) -> None:
        if plan.on_trial_begin is not None:
            plan.on_trial_begin(trial)

    tuner_ = make_tuner(
        plan.tuner,
        plan.hypermodel,
        objective=plan.objective,
        max_trials=plan.max_trials,
        epochs=plan.epochs,
        seed=plan.seed,
        **(
            {"min_epochs": plan.min_epochs, "reduction_factor": plan.reduction_factor}
            if plan.tuner == "asha"
            else {}
        ),
        directory=plan.directory,
        project_name=plan.project,
        # A worker never starts afresh: KerasTuner would delete the shared project.
        overwrite=plan.overwrite and plan.role != "worker",
        on_trial_end=report_end,
        on_trial_begin=report_begin,
    )
    tuner_.oracle.verbose = 0
    tuner_.tensorboard = plan.tensorboard
    if plan.tensorboard is not None and plan.role != "worker":
        write_experiment(plan.tensorboard, plan.space, plan.objective.name)
    if plan.role == "worker":
        distributed.limit_worker_wait(plan.worker_timeout)
    else:
        fingerprints.write(tuner_.project_dir, plan.hashes)
    if plan.role == "chief":
        tuner_.save()
        distributed.serve_oracle(tuner_.oracle, worker_timeout=plan.worker_timeout)
        return tuner_
    args, kwargs = plan.fit_args
    tuner_.search(*args, **kwargs)
    return None if plan.role == "worker" else tuner_


def _winner(plan: SearchPlan, tuner_: AdamTuner) -> tuple[tuple[TrialRecord, ...], TrialRecord]:
    """Every trial's record, in trial order, and the winner's (see `best_trial`).

    Raises:
        RuntimeError: if no trial completed; the message gives the failed trials' reasons.
    """
    records = trial_records(tuner_, plan.space)
    best = best_trial(records, plan.objective.direction)
    if best is None:
        reasons = "; ".join(f"trial {r.trial_id}: {r.reason}" for r in records if r.reason)
        raise RuntimeError(f"No trial completed. {reasons}")
    return records, best


def _compare(plan: SearchPlan, tuner_: AdamTuner, best: TrialRecord) -> Comparison | None:
    """The winner against default Adam on held-out data; None with `comparison_repeats=0`."""
    if not plan.comparison_repeats:
        return None
    return compare(
        plan.hypermodel,
        tuner_.oracle.get_trial(best.trial_id).hyperparameters,
        best.hyperparameters,
        plan.fit_args,
        objective=plan.objective,
        repeats=plan.comparison_repeats,
        seed=plan.seed,
        test_data=plan.test_data,
        held_out=plan.held_out,
    )


def _result(
    plan: SearchPlan,
    tuner_: AdamTuner,
    records: tuple[TrialRecord, ...],
    best: TrialRecord,
    comparison: Comparison | None,
) -> SearchResult:
    """The `SearchResult` of the finished search."""
    return SearchResult(
        best_hyperparameters=best.hyperparameters,
        optimizer_config=plan.hypermodel.optimizer(best.hyperparameters).get_config(),
        objective=plan.objective.name,
        direction=plan.objective.direction,
        score=best.score,
        settled=best.settled,
        trials=records,
        tuned=plan.space.tuned_names(),
        tuner=plan.tuner,
        comparison=comparison,
        project_dir=tuner_.project_dir,
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


def _fit_args(plan: SearchPlan) -> tuple[tuple, dict]:
    """`(args, kwargs)` for `Model.fit`, the same in every trial and comparison run."""
    kwargs: dict = {
        "epochs": plan.epochs,
        "verbose": plan.verbose,
        "callbacks": list(plan.callbacks),
    }
    if plan.y is not None:
        kwargs["y"] = plan.y
    if plan.batch_size is not None and not _is_dataset(plan.x):
        kwargs["batch_size"] = plan.batch_size
    if plan.validation_data is not None:
        kwargs["validation_data"] = plan.validation_data
    else:
        kwargs["validation_split"] = plan.validation_split
    if plan.early_stopping is not None:
        kwargs["callbacks"].append(
            keras.callbacks.EarlyStopping(
                monitor=plan.objective.name,
                mode=plan.objective.direction,
                patience=plan.early_stopping,
            )
        )
    return (plan.x,), kwargs


def _is_dataset(x: Any) -> bool:
    return not isinstance(x, np.ndarray | list | tuple | dict) and hasattr(x, "__iter__")
