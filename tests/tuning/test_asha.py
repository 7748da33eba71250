"""ASHA without training: rungs, promotions, asynchronous workers, resume, the model's rung.

The oracle is driven by hand: each trial "trains" by reporting a known
learning curve, epoch by epoch, as `AdamAsha` does. Whether a promotion
was due is checked against those curves, independently of the oracle.
"""

import math

import keras_tuner
import numpy as np
import pytest

from tuning import asha, tuners
from tuning.records import settled_score
from tuning.space import AdamSearchSpace

OBJECTIVE = keras_tuner.Objective("val_loss", "min")


@pytest.mark.parametrize(
    ("epochs", "min_epochs", "factor", "rungs"),
    [
        (15, 1, 3, (2, 5, 15)),
        (9, 1, 3, (1, 3, 9)),
        (10, 1, 3, (1, 3, 10)),
        (15, 3, 3, (5, 15)),
        (16, 1, 2, (1, 2, 4, 8, 16)),
        (20, 2, 4, (5, 20)),
        (4, 4, 3, (4,)),
        (1, 1, 3, (1,)),
        # The default first rung: a third of the epochs.
        (15, None, 3, (5, 15)),
        (9, None, 3, (3, 9)),
        (27, None, 3, (9, 27)),
        (16, None, 2, (8, 16)),
        (3, None, 3, (1, 3)),
        (1, None, 3, (1,)),
    ],
)
def test_rungs_divide_the_epochs_by_the_reduction_factor(epochs, min_epochs, factor, rungs):
    assert asha.rung_epochs(epochs, min_epochs, factor) == rungs


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"reduction_factor": 1}, r"`reduction_factor` .*integer >= 2.*1"),
        ({"reduction_factor": 0}, r"`reduction_factor` .*integer >= 2.*0"),
        ({"reduction_factor": 2.5}, r"`reduction_factor` .*integer >= 2.*2\.5"),
        ({"reduction_factor": True}, r"`reduction_factor` .*True"),
        ({"min_epochs": 0}, r"`min_epochs` must be a positive integer.*0"),
        ({"min_epochs": 6}, r"`min_epochs` must be at most `epochs`.*min_epochs=6, epochs=5"),
        ({"epochs": 0}, r"`epochs` must be a positive integer.*0"),
    ],
)
def test_bad_rung_arguments_are_refused_by_name(arguments, message):
    options = {"epochs": 5, "min_epochs": 1, "reduction_factor": 3, **arguments}
    with pytest.raises(ValueError, match=message):
        asha.rung_epochs(**options)
    with pytest.raises(ValueError, match=message):
        tuners.make_oracle("asha", objective=OBJECTIVE, max_trials=9, seed=0, **options)


def test_asha_counts_configurations_so_it_needs_a_budget():
    with pytest.raises(ValueError, match=r"`max_trials` must be a positive integer.*None"):
        tuners.make_oracle("asha", objective=OBJECTIVE, max_trials=None, epochs=9, seed=0)


def unit(values):
    """The trial's point in the unit square of η in (1e-5, 1e-1) and 1 − β1 in (0.01, 0.5)."""
    return np.array(
        [
            math.log(values["learning_rate"] / 1e-5) / math.log(1e4),
            math.log(values["one_minus_beta_1"] / 0.01) / math.log(50),
        ]
    )


def curve(values, epoch):
    """A learning curve: from 2.3 down to a floor that is least (0.05) at (0.6, 0.5)."""
    u = unit(values)
    floor = 0.05 + float(np.sum((u - [0.6, 0.5]) ** 2))
    speed = 0.5 + u[0]  # larger η learns faster at first
    return floor + (2.3 - floor) * math.exp(-speed * (epoch + 1))


def oracle_for(tmp_path, *, max_trials=27, epochs=9, seed=0, min_epochs=1, **rungs):
    oracle = tuners.make_oracle(
        "asha",
        objective=OBJECTIVE,
        max_trials=max_trials,
        epochs=epochs,
        seed=seed,
        min_epochs=min_epochs,
        **rungs,
    )
    oracle._set_project_dir(str(tmp_path), "search")
    oracle.verbose = 0
    hp = keras_tuner.HyperParameters()
    AdamSearchSpace().for_budget(20).declare(hp)  # η and β1
    oracle.update_space(hp)
    return oracle


def train(oracle, trial, *, stop_after=None, fail=False):
    """Report the trial's rung epoch by epoch, as `AdamAsha` does, then end it."""
    values = trial.hyperparameters.values
    start, end = values[asha.INITIAL_EPOCH_KEY], values[asha.EPOCHS_KEY]
    for epoch in range(start, end if stop_after is None else min(end, stop_after)):
        oracle.update_trial(trial.trial_id, {"val_loss": curve(values, epoch)}, step=epoch)
    trial.status = "FAILED" if fail else "COMPLETED"
    oracle.end_trial(trial)


def rung_scores(trials, epochs):
    """Each trial's settled score over its first `epochs` epochs, from the known curves."""
    return {
        t.trial_id: settled_score([curve(t.hyperparameters.values, e) for e in range(epochs)])
        for t in trials
    }


def test_promotions_go_to_a_rungs_best_third_and_continue_the_same_trial(tmp_path):
    oracle = oracle_for(tmp_path)
    assert oracle.rungs == (1, 3, 9)
    reached = {}  # trial id -> epochs it has reported
    promotions = 0
    while True:
        trial = oracle.create_trial("worker")
        if trial.status == "STOPPED":
            break
        values = trial.hyperparameters.values
        start, end = values[asha.INITIAL_EPOCH_KEY], values[asha.EPOCHS_KEY]
        if start == 0:
            assert trial.trial_id not in reached  # a new configuration
            assert end == 1
        else:
            promotions += 1
            # The same trial, at the next rung, where it stopped ...
            assert reached[trial.trial_id] == start
            assert end == oracle.rungs[oracle.rungs.index(start) + 1]
            # ... and due: in the best third of all that finished its rung
            # (at least the best, once every configuration has started).
            finished = [t for t in oracle.trials.values() if reached.get(t.trial_id, 0) >= start]
            scores = rung_scores(finished, start)
            rank = sorted(scores.values()).index(scores[trial.trial_id])
            quota = len(finished) // 3
            if len(oracle.trials) == 27:
                quota = max(quota, 1)
            assert rank < quota, (trial.trial_id, start, rank, len(finished))
        train(oracle, trial)
        reached[trial.trial_id] = end
    assert len(oracle.trials) == 27
    # The first configuration is default Adam.
    first = oracle.trials["00"].hyperparameters.values
    assert first["learning_rate"] == pytest.approx(1e-3)
    assert first["one_minus_beta_1"] == pytest.approx(0.1)
    # Synchronous successive halving would take 9 to 3 epochs and 3 to 9.
    at_least = {3: 9, 9: 3}
    for epochs, count in at_least.items():
        assert sum(r >= epochs for r in reached.values()) >= count
    assert promotions == sum(r >= 3 for r in reached.values()) + sum(
        r == 9 for r in reached.values()
    )
    # Every trial's curve is one history, epochs 0 .. reached - 1, and it is
    # final exactly when it trained all 9.
    for trial in oracle.trials.values():
        observations = trial.metrics.get_history("val_loss")
        assert [o.step for o in observations] == list(range(reached[trial.trial_id]))
        assert oracle.is_final(trial) == (reached[trial.trial_id] == 9)
    # The trial that trained all epochs and settled best is among the best configurations.
    finals = [t for t in oracle.trials.values() if reached[t.trial_id] == 9]
    final_scores = rung_scores(finals, 9)
    every = rung_scores(oracle.trials.values(), 9)
    winner = min(final_scores, key=final_scores.get)
    assert sorted(every.values()).index(every[winner]) < 5  # of 27


def test_workers_never_wait_while_configurations_remain(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=8)
    held = oracle.create_trial("slow")  # a worker that trains for a long time
    answers = []
    while len(oracle.trials) < 8:
        trial = oracle.create_trial("fast")
        answers.append(trial.status)
        train(oracle, trial)
    assert set(answers) == {"RUNNING"}
    # Every configuration started; what is left is promotions, then waiting
    # for the slow worker, whose trial may yet be due for promotion.
    statuses = []
    while True:
        trial = oracle.create_trial("fast")
        statuses.append(trial.status)
        if trial.status != "RUNNING":
            break
        train(oracle, trial)
    assert trial.status == "IDLE"
    assert oracle.create_trial("fast").status == "IDLE"  # asking again changes nothing
    train(oracle, held)
    while (trial := oracle.create_trial("fast")).status == "RUNNING":
        train(oracle, trial)
    assert trial.status == "STOPPED"
    assert oracle.create_trial("slow").status == "STOPPED"
    assert any(oracle.is_final(t) for t in oracle.trials.values())


def test_one_configuration_trains_all_epochs(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=1, epochs=9)
    while (trial := oracle.create_trial("worker")).status == "RUNNING":
        train(oracle, trial)
    (only,) = oracle.trials.values()
    assert oracle.is_final(only)
    assert len(only.metrics.get_history("val_loss")) == 9


def test_a_trial_stopped_early_is_final_and_never_promoted(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=6, epochs=9, min_epochs=3)
    assert oracle.rungs == (3, 9)
    stopped = oracle.create_trial("worker")  # default Adam: near the best, would go on
    train(oracle, stopped, stop_after=2)  # early stopping ended it after 2 of 3 epochs
    assert oracle.is_final(stopped)
    while (trial := oracle.create_trial("worker")).status == "RUNNING":
        assert trial.trial_id != stopped.trial_id
        train(oracle, trial)
    assert not any(
        oracle.is_final(t) is False and t.trial_id == "0" for t in oracle.trials.values()
    )


def test_failed_trials_rank_last_and_are_never_promoted(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=9, epochs=9)
    failed = set()
    while (trial := oracle.create_trial("worker")).status == "RUNNING":
        if trial.hyperparameters.values[asha.INITIAL_EPOCH_KEY] == 0 and len(failed) < 3:
            failed.add(trial.trial_id)
            train(oracle, trial, stop_after=0, fail=True)
            continue
        assert trial.trial_id not in failed
        train(oracle, trial)
    # A failed trial is a member of its rung, ranked last: 9 finished rung 1,
    # so at least 3 went on.
    reached = [len(asha.observed_epochs(t, "val_loss")) for t in oracle.trials.values()]
    assert sum(r >= 3 for r in reached) >= 3
    members = oracle._rung_members(0)
    assert len(members) == 9
    assert {t.trial_id for t in oracle._ranked(members)[-3:]} == failed


def test_the_model_fits_the_highest_rung_that_enough_trials_finished(tmp_path):
    oracle = oracle_for(tmp_path)
    while (trial := oracle.create_trial("worker")).status == "RUNNING":
        train(oracle, trial)
    finished = {
        epochs: [
            t for t in oracle.trials.values() if len(t.metrics.get_history("val_loss")) >= epochs
        ]
        for epochs in oracle.rungs
    }
    # Two searched dimensions: a rung needs 4 members to be modelled.
    expected = max(k for k, epochs in enumerate(oracle.rungs) if len(finished[epochs]) >= 4)
    assert oracle.model_rung() == expected > 0
    observed = oracle._observed()
    epochs = oracle.rungs[expected]
    scores = rung_scores(finished[epochs], epochs)
    assert {t.trial_id: s for t, s in observed} == pytest.approx(scores)


def test_a_resumed_search_retries_the_rung_in_flight_from_its_start(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=9, epochs=9)
    while True:
        trial = oracle.create_trial("worker")
        if trial.hyperparameters.values[asha.INITIAL_EPOCH_KEY] > 0:
            break
        train(oracle, trial)
    start = trial.hyperparameters.values[asha.INITIAL_EPOCH_KEY]
    end = trial.hyperparameters.values[asha.EPOCHS_KEY]
    values = trial.hyperparameters.values
    oracle.update_trial(trial.trial_id, {"val_loss": curve(values, start)}, step=start)
    before = {t.trial_id: t.status for t in oracle.trials.values()}
    # The process is killed here. A new one reloads the search.
    again = oracle_for(tmp_path, max_trials=9, epochs=9)
    again.reload()
    retried = again.create_trial("worker")
    assert retried.trial_id == trial.trial_id
    assert retried.hyperparameters.values[asha.INITIAL_EPOCH_KEY] == start
    assert retried.hyperparameters.values[asha.EPOCHS_KEY] == end
    # What the killed rung reported is gone; the rungs before it are kept.
    steps = [o.step for o in retried.metrics.get_history("val_loss")]
    assert steps == list(range(start))
    # Every other trial is as it was: nothing else is trained again.
    assert {t.trial_id: t.status for t in again.trials.values() if t is not retried} == {
        k: v for k, v in before.items() if k != trial.trial_id
    }
    train(again, retried)
    assert [o.step for o in retried.metrics.get_history("val_loss")] == list(range(end))


def test_a_promoted_trial_is_not_a_new_configuration_for_the_duplicate_check(tmp_path):
    oracle = oracle_for(tmp_path, max_trials=9, epochs=9)
    while (trial := oracle.create_trial("worker")).status == "RUNNING":
        train(oracle, trial)
    assert len(oracle._tried_so_far) == 9
    for trial in oracle.trials.values():
        adam = {k: v for k, v in trial.hyperparameters.values.items() if "/" not in k}
        assert oracle._duplicate({**adam, asha.EPOCHS_KEY: 1, asha.INITIAL_EPOCH_KEY: 0})
