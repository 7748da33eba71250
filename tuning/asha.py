"""Asynchronous successive halving (ASHA): most trials stop early, the best train on.

`AshaOracle` is the search algorithm of `tuner="asha"` (Li et al.,
"A System for Massively Parallel Hyperparameter Tuning", MLSys 2020),
with proposals from the Bayesian model of `tuning.oracles.BayesianOracle`:

- **Rungs.** Training is cut into rungs of epochs (`rung_epochs`): with
  `epochs=15` and `reduction_factor=3` the rungs end at epochs 5 and 15
  (the default `min_epochs`, `default_min_epochs`, is a third of the
  epochs); with `min_epochs=1` at 2, 5 and 15. Every new configuration
  trains to the first rung.
- **Promotion.** A trial that finished rung k goes on to rung k + 1 when
  its score at rung k (`rung_score`: the settled score of its first r_k
  epochs, the score the winner is chosen by) is among the best
  1/`reduction_factor` of every trial that finished rung k so far. A
  free worker first takes the best promotable trial of the highest rung,
  and only if there is none starts a new configuration: nobody waits for
  a rung to fill, so `tuning.distributed` workers never idle while
  configurations remain.
- **Continuation.** A promoted trial is the same trial, continued: the
  tuner (`tuning.tuners.AdamAsha`) loads the weights, Adam's moments and
  step counter it saved at the end of its rung, and trains the next
  rung's epochs. Its history is one history across its rungs, and its
  trial id stays the same.
- **Proposals.** New configurations come from Thompson sampling on a
  Gaussian process fitted to the scores at one rung: the highest rung that
  enough trials have finished (`model_rung`), as BOHB does (Falkner et
  al., 2018). Trials that failed by then count as the worst score.
- **The end.** `max_trials` counts configurations. Once all have started,
  workers keep taking promotions; a rung then promotes at least its best
  trial, so that at least one trial trains all `epochs`, and only trials
  that did (or that early stopping ended) can win (`is_final`,
  `tuning.records.best_trial`). A worker with nothing to take while
  others still train waits (the trial status "IDLE"); when nothing is left
  the search stops.

A search killed and resumed loses only the rung in flight: KerasTuner
sends the trials that were running back for a retry, and a retried rung
starts again from its trial's last checkpoint, its metrics from that rung
on dropped first.
"""

from __future__ import annotations

import math
from typing import Any

import keras_tuner
from keras_tuner.src.engine import trial as trial_module

from keras_adam import validation
from tuning.oracles import BayesianOracle
from tuning.records import settled_score

#: The trial values, beside Adam's, that tell a trial which epochs to train
#: (as KerasTuner's Hyperband names them).
EPOCHS_KEY = "tuner/epochs"
INITIAL_EPOCH_KEY = "tuner/initial_epoch"

#: Default `reduction_factor`: a third of each rung's trials goes on.
REDUCTION_FACTOR = 3


def default_min_epochs(epochs: int, reduction_factor: int = REDUCTION_FACTOR) -> int:
    """The first rung's least epochs when none is given: `epochs / reduction_factor`, rounded.

    So by default a search has two rungs (5 and 15 of 15 epochs). Rungs
    of fewer epochs rank Adam's η by how fast a trial starts, not where it
    ends: on the tuning guide's problems a first rung at 2 of 15 epochs
    promoted large-η trials that ended worse (docs/tuning.md measures it).
    """
    return max(1, round(epochs / reduction_factor))


def rung_epochs(
    epochs: int, min_epochs: int | None = None, reduction_factor: int = REDUCTION_FACTOR
) -> tuple[int, ...]:
    """The epochs at which the rungs end: `epochs / reduction_factor**k`, rounded, ≥ `min_epochs`.

    A rung is at least one epoch before rounding: with 15 epochs and a
    factor of 3 the rungs end at 2, 5 and 15 (15/27 ≈ 0.6 is no rung).

    Args:
        epochs: The last rung: a trial that is never stopped trains this many epochs.
        min_epochs: The least epochs of the first rung; at most `epochs`.
            None: `default_min_epochs`.
        reduction_factor: The ratio of consecutive rungs' epochs, and the
            inverse of the share of a rung's trials that goes on; at least 2.

    Returns:
        The rungs' epochs, increasing, the last being `epochs`.

    Raises:
        ValueError: naming the argument, for a value that is not an integer
            in its range, or a `min_epochs` above `epochs`.
    """
    validation.integer("epochs", epochs, 1)
    validation.integer("reduction_factor", reduction_factor, 2)
    if min_epochs is None:
        min_epochs = default_min_epochs(epochs, reduction_factor)
    validation.integer("min_epochs", min_epochs, 1)
    if min_epochs > epochs:
        raise ValueError(
            "Argument `min_epochs` must be at most `epochs` (the last rung). "
            f"Received: min_epochs={min_epochs!r}, epochs={epochs!r}"
        )
    rungs = set()
    ends = float(epochs)
    while ends >= 1 and round(ends) >= min_epochs:  # not 0.6 epochs rounded up to 1
        rungs.add(round(ends))
        ends /= reduction_factor
    return tuple(sorted(rungs))


def observed_epochs(trial: Any, objective: str) -> list[float]:
    """The trial's objective at each epoch it reported, in epoch order (epochs 0, 1, ...).

    The values stop at the first epoch missing: epochs are reported in order.
    """
    if not trial.metrics.exists(objective):
        return []
    by_step = {int(o.step): float(o.mean()) for o in trial.metrics.get_history(objective)}
    values = []
    while len(values) in by_step:
        values.append(by_step[len(values)])
    return values


def rung_score(trial: Any, objective: str, epochs: int) -> float | None:
    """The trial's settled score over its first `epochs` epochs, or None if it has fewer.

    A rung's ranking uses the score the winner is chosen by
    (`records.settled_score`), at the rung's epochs.
    """
    values = observed_epochs(trial, objective)
    if len(values) < epochs:
        return None
    score = settled_score(values[:epochs])
    return float("nan") if score is None else score


class AshaOracle(BayesianOracle):
    """Asynchronous successive halving with Thompson-sampling proposals (see the module).

    Args:
        epochs: The epochs of the last rung (a trial never stopped trains this many).
        min_epochs: The least epochs of the first rung (`rung_epochs`);
            None: `default_min_epochs`.
        reduction_factor: Rung ratio and inverse promoted share (`rung_epochs`).
        **kwargs: `BayesianOracle` arguments; `max_trials` (required)
            counts configurations.

    Raises:
        ValueError: naming the argument, for an invalid rung argument or no `max_trials`.
    """

    def __init__(
        self,
        *,
        epochs: int,
        min_epochs: int | None = None,
        reduction_factor: int = REDUCTION_FACTOR,
        **kwargs: Any,
    ) -> None:
        """See the class docstring."""
        self.rungs = rung_epochs(epochs, min_epochs, reduction_factor)
        self.reduction_factor = reduction_factor
        validation.integer("max_trials", kwargs.get("max_trials"), 1)
        super().__init__(**kwargs)

    # -- where a trial stands ------------------------------------------------

    def target(self, trial: Any) -> int:
        """The epochs the trial trains to in its current (or last) rung."""
        return int(trial.hyperparameters.values.get(EPOCHS_KEY, self.rungs[0]))

    def is_final(self, trial: Any) -> bool:
        """Whether the trial's training is over: it trained all `epochs`, or stopped early.

        A completed trial stopped at a lower rung is not final: it may yet be
        promoted, and it cannot win (`tuning.records.best_trial`).
        """
        if trial.status != "COMPLETED":
            return False
        target = self.target(trial)
        if target >= self.rungs[-1]:
            return True
        return len(observed_epochs(trial, self.objective.name)) < target  # early stopping

    def _rung_members(self, k: int) -> list[tuple[Any, float | None]]:
        """Every trial that finished rung k, with its score there (None: failed in rung k)."""
        epochs = self.rungs[k]
        members = []
        for trial in self.trials.values():
            score = rung_score(trial, self.objective.name, epochs)
            if score is not None:
                members.append((trial, score))
            elif trial.status == "FAILED" and self.target(trial) == epochs:
                members.append((trial, None))
        return members

    def _ranked(self, members: list[tuple[Any, float | None]]) -> list[Any]:
        """The members' trials, best first; failed and non-finite scores last."""
        sign = -1.0 if self.objective.direction == "max" else 1.0

        def key(member: tuple[Any, float | None]) -> tuple:
            score = member[1]
            finite = score is not None and math.isfinite(score)
            return (0, sign * score) if finite else (1, 0.0)

        return [trial for trial, _ in sorted(members, key=key)]

    # -- promotion -----------------------------------------------------------

    def _promotion(self) -> tuple[Any, int] | None:
        """The best promotable trial of the highest rung, and its rung; or None.

        A trial is promotable from rung k when it completed rung k there and
        ranks in the best `n_k // reduction_factor` of the rung's `n_k`
        members (at least 1 once every configuration has started).
        """
        spent = self._configurations_spent()
        for k in range(len(self.rungs) - 2, -1, -1):
            members = self._rung_members(k)
            quota = len(members) // self.reduction_factor
            if spent:
                quota = max(quota, 1)
            for trial in self._ranked(members)[:quota]:
                # A completed member has the rung's epochs; one not yet promoted targets them.
                if trial.status == "COMPLETED" and self.target(trial) == self.rungs[k]:
                    return trial, k
        return None

    def _configurations_spent(self) -> bool:
        return len(self.trials) >= self.max_trials

    @keras_tuner.synchronized
    def create_trial(self, tuner_id: str) -> Any:
        """A promotion if one is due, else a new configuration; "IDLE" or "STOPPED" at the end."""
        if tuner_id in self.ongoing_trials:
            return self.ongoing_trials[tuner_id]
        if self._retry_queue:
            # The rung in flight starts again from its checkpoint: drop what it reported.
            retried = self.trials[self._retry_queue[-1]]
            start = int(retried.hyperparameters.values.get(INITIAL_EPOCH_KEY, 0))
            self._forget_from(retried, start)
            return super().create_trial(tuner_id)
        promotion = self._promotion()
        if promotion is not None:
            trial, k = promotion
            trial.hyperparameters.values[INITIAL_EPOCH_KEY] = self.rungs[k]
            trial.hyperparameters.values[EPOCHS_KEY] = self.rungs[k + 1]
            trial.status = trial_module.TrialStatus.RUNNING
            self.tuner_ids.add(tuner_id)
            self.ongoing_trials[tuner_id] = trial
            self._save_trial(trial)
            self.save()
            self._display.on_trial_begin(trial)
            return trial
        if self.ongoing_trials and self._configurations_spent():
            # What runs now may make a promotion due: ask again.
            self.tuner_ids.add(tuner_id)
            return trial_module.Trial(
                hyperparameters=self.hyperparameters.copy(),
                trial_id=f"{len(self.trials):0{len(str(self.max_trials))}d}",
                status=trial_module.TrialStatus.IDLE,
            )
        return super().create_trial(tuner_id)  # a new configuration, or STOPPED

    def _forget_from(self, trial: Any, epoch: int) -> None:
        """Drop the trial's metrics reported for epochs `epoch` on."""
        for name in list(trial.metrics.metrics):
            history = trial.metrics.metrics[name]
            for step in [s for s in history._observations if s >= epoch]:
                del history._observations[step]

    def populate_space(self, trial_id: str) -> dict:
        """A new configuration, to train to the first rung (see `BayesianOracle`)."""
        response = super().populate_space(trial_id)
        if response.get("values") is not None:
            response["values"][INITIAL_EPOCH_KEY] = 0
            response["values"][EPOCHS_KEY] = self.rungs[0]
        return response

    def _compute_values_hash(self, values: dict) -> str:
        """The hash of Adam's values alone: a promoted trial is the same configuration."""
        adam = {k: v for k, v in values.items() if not str(k).startswith("tuner/")}
        return super()._compute_values_hash(adam)

    # -- the model -----------------------------------------------------------

    def model_rung(self) -> int:
        """The rung the proposals' model is fitted to: the highest with enough members.

        Enough is `dimensions + 2` members (BOHB's rule), and at least 3;
        the first rung otherwise.
        """
        needed = max(len(self._nonfixed_space()) + 2, 3)
        for k in range(len(self.rungs) - 1, 0, -1):
            if sum(score is not None for _, score in self._rung_members(k)) >= needed:
                return k
        return 0

    def _observed(self) -> list[tuple[Any, float | None]]:
        """The trials that finished the model's rung with their scores there, and failures.

        A trial that failed in that rung or a lower one counts as failed
        (`_observations` gives it the worst score).
        """
        k = self.model_rung()
        observed = [(t, s) for t, s in self._rung_members(k) if s is not None]
        # A trial failed in rung k or below has fewer epochs: it is not among those.
        failed = [
            (t, None)
            for t in self.trials.values()
            if t.status == "FAILED" and self.target(t) <= self.rungs[k]
        ]
        return observed + failed


def describe(epochs: int, min_epochs: int | None, reduction_factor: int) -> str:
    """One phrase for the rungs, e.g. "rungs at 2, 5, 15 epochs, a third going on"."""
    rungs = ", ".join(str(r) for r in rung_epochs(epochs, min_epochs, reduction_factor))
    share = {2: "a half", 3: "a third", 4: "a quarter"}.get(reduction_factor)
    return f"rungs at {rungs} epochs, {share or f'1/{reduction_factor}'} going on"
