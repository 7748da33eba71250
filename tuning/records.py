"""A search's trials as records: `TrialRecord`, its settled score, and the winner.

Besides KerasTuner's `trial.json`, each trial's folder holds two JSON
files that `tuning.tuners.AdamTuner` writes as the trial ends:

- `seconds.json` (`SECONDS_FILE`): `{"seconds": ..., "fit_seconds": ...}`,
  the trial's wall time and the part of it spent in `Model.fit`;
- `history.json` (`HISTORY_FILE`): the trial's per-epoch logs
  (`History.history`), e.g. `{"val_loss": [...]}`.

Resumed and distributed searches read them back with `read_trial_file`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuning.space import AdamSearchSpace
    from tuning.tuners import AdamTuner

#: Each trial's wall time and `fit` time, beside KerasTuner's `trial.json`.
SECONDS_FILE = "seconds.json"
#: Each trial's per-epoch logs (`History.history`), beside KerasTuner's `trial.json`.
HISTORY_FILE = "history.json"

#: Epochs at the end of a trial whose mean objective is its `TrialRecord.settled` score.
SETTLED_EPOCHS = 5

#: The metric under which a trial reports its settled score to the oracle
#: (`AdamTuner.run_trial`), which models it (`oracles.BayesianOracle`).
SETTLED_METRIC = "keras_adam_settled_objective"


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search.

    Attributes:
        trial_id: KerasTuner's id ("00", "01", ...), in start order.
        status: "COMPLETED", "FAILED", "INVALID", "RUNNING" or "IDLE".
        hyperparameters: Adam's five hyperparameters in this trial
            (searched or fixed), as `keras_adam.Adam` arguments.
        score: The objective's best value over the trial's epochs, or None.
        seconds: Wall time of the trial, or None if unknown.
        reason: Why the trial failed (e.g. "diverged: loss=nan at epoch 2,
            batch 5"), else None.
        fit_seconds: The part of `seconds` spent in `Model.fit` (the rest
            builds and compiles the model and keeps KerasTuner's records),
            or None if unknown.
        settled: The objective averaged over the trial's last
            `SETTLED_EPOCHS` epochs (all of them, if fewer): where training
            settled, which picks the winner (see `best_trial`); None if
            unknown (a trial saved without its per-epoch logs).
        epochs: The epochs the trial trained, or None if unknown.
        final: False for a trial that a multi-fidelity search (ASHA)
            stopped below its full epochs, which cannot win; True otherwise.
    """

    trial_id: str
    status: str
    hyperparameters: dict
    score: float | None
    seconds: float | None
    reason: str | None = None
    fit_seconds: float | None = None
    settled: float | None = None
    epochs: int | None = None
    final: bool = True


def settled_score(values: Sequence[float] | None) -> float | None:
    """The mean of the last `SETTLED_EPOCHS` per-epoch values.

    Args:
        values: A trial's per-epoch values of the objective, or None.

    Returns:
        The mean, or None if there are no values or one of the last is not finite.
    """
    if not values:
        return None
    last = [float(v) for v in values[-SETTLED_EPOCHS:]]
    if not all(math.isfinite(v) for v in last):
        return None
    return sum(last) / len(last)


def best_trial(trials: Sequence[TrialRecord], direction: str) -> TrialRecord | None:
    """The winner of a search: the completed trial whose objective settled best.

    A trial's `score` is its best epoch: the extreme of a noisy curve, so
    the trials whose validation objective jumps most from epoch to epoch
    (large η) look best by luck, and their winners do worse on held-out
    data (the tuning guide, docs/tuning.md, measures it). The winner is
    therefore the trial with the best `settled` score, the mean over its
    last `SETTLED_EPOCHS` epochs; if any completed trial has no settled
    score (one saved without its per-epoch logs), the best `score` decides
    for all. Ties go to the earlier trial. Only `final` trials compete (in
    an ASHA search, those that trained all epochs or stopped early); if no
    final trial completed, every completed trial does.

    Args:
        trials: The search's trials, in trial order.
        direction: "min" or "max".

    Returns:
        The winning trial, or None if no trial completed with a score.
    """
    done = [
        t
        for t in trials
        if t.status == "COMPLETED" and t.score is not None and math.isfinite(t.score)
    ]
    if not done:
        return None
    done = [t for t in done if t.final] or done
    settled = all(t.settled is not None for t in done)
    sign = -1.0 if direction == "max" else 1.0
    return min(done, key=lambda t: sign * (t.settled if settled else t.score))


def read_trial_file(project_dir: str, trial_id: str, name: str) -> Any:
    """The JSON content of a file in a trial's folder.

    Args:
        project_dir: The search's directory.
        trial_id: The trial's id.
        name: The file's name, e.g. `SECONDS_FILE` or `HISTORY_FILE`.

    Returns:
        The decoded JSON, or None if the file is missing or unreadable.
    """
    try:
        with open(os.path.join(project_dir, f"trial_{trial_id}", name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def trial_record(tuner: AdamTuner, trial: Any, space: AdamSearchSpace) -> TrialRecord:
    """A `TrialRecord` for a KerasTuner trial.

    Args:
        tuner: The search's tuner (it reads the trial's files).
        trial: The KerasTuner trial.
        space: The search's space.

    Returns:
        The record; a trial that did not complete has no score.
    """
    score = trial.score
    score = None if score is None or not math.isfinite(float(score)) else float(score)
    status = str(trial.status)
    history = tuner.trial_history(trial.trial_id) or {}
    objective = getattr(tuner.oracle.objective, "name", None)
    is_final = getattr(tuner.oracle, "is_final", None)
    return TrialRecord(
        trial_id=str(trial.trial_id),
        status=status,
        hyperparameters=space.values_from(trial.hyperparameters.values),
        score=score if status == "COMPLETED" else None,
        seconds=tuner.trial_seconds(trial.trial_id),
        reason=_reason(trial.message) if status != "COMPLETED" else None,
        fit_seconds=tuner.trial_seconds(trial.trial_id, key="fit_seconds"),
        settled=settled_score(history.get(objective)) if status == "COMPLETED" else None,
        epochs=len(history[objective]) if objective in history else None,
        final=True if is_final is None else bool(is_final(trial)),
    )


def trial_records(tuner: AdamTuner, space: AdamSearchSpace) -> tuple[TrialRecord, ...]:
    """A `TrialRecord` for every trial of the tuner's oracle, in trial order."""
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: _order(t.trial_id))
    return tuple(trial_record(tuner, trial, space) for trial in trials)


def _reason(message: str | None) -> str | None:
    """The last line of a failed trial's traceback, without FailedTrialError's class name."""
    if not message:
        return None
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return None
    return re.sub(r"^[\w.]*FailedTrialError: ", "", lines[-1].strip())


def _order(trial_id: str) -> tuple:
    return (0, int(trial_id)) if str(trial_id).isdigit() else (1, str(trial_id))
