"""Which trial wins a search: the one whose objective settled best, not its luckiest epoch."""

import math

import pytest

from tuning.records import TrialRecord, best_trial, settled_score


def record(trial_id, curve, status="COMPLETED", direction="min"):
    """A trial scored as KerasTuner scores it (best epoch), with its settled score."""
    pick = min if direction == "min" else max
    return TrialRecord(
        trial_id=trial_id,
        status=status,
        hyperparameters={"learning_rate": 1e-3 * (1 + int(trial_id))},
        score=pick(curve) if status == "COMPLETED" else None,
        seconds=1.0,
        settled=settled_score(curve) if status == "COMPLETED" else None,
    )


# A large η: validation loss jumps from epoch to epoch, one lucky epoch is the lowest of all.
NOISY = [0.9, 0.5, 0.6, 0.21, 0.6, 0.55, 0.7, 0.5, 0.65, 0.6]
# A moderate η: it settles lower and stays there.
STEADY = [0.9, 0.6, 0.45, 0.35, 0.3, 0.28, 0.27, 0.27, 0.26, 0.26]


def test_settled_score_is_the_mean_of_the_last_epochs():
    # Ten epochs: the last five count, the five before them do not.
    assert settled_score(STEADY) == pytest.approx((0.28 + 0.27 + 0.27 + 0.26 + 0.26) / 5)
    assert settled_score([9.0] * 5 + STEADY[-5:]) == settled_score(STEADY)
    assert settled_score([0.5, 0.3]) == pytest.approx(0.4)  # fewer epochs: all of them
    assert settled_score([]) is None and settled_score(None) is None
    assert settled_score([0.2, 0.3, 0.4, 0.5, 0.6, math.nan]) is None


def test_the_steadier_trial_wins_over_a_lucky_epoch():
    trials = [record("0", NOISY), record("1", STEADY)]
    assert trials[0].score < trials[1].score  # by best epoch the noisy one would win
    assert best_trial(trials, "min").trial_id == "1"


def test_a_maximized_objective_wins_by_its_highest_settled_value():
    accuracy_noisy = [1 - v for v in NOISY]
    accuracy_steady = [1 - v for v in STEADY]
    trials = [
        record("0", accuracy_noisy, direction="max"),
        record("1", accuracy_steady, direction="max"),
    ]
    assert best_trial(trials, "max").trial_id == "1"


def test_failed_trials_never_win_and_none_completed_gives_none():
    failed = record("0", NOISY, status="FAILED")
    assert best_trial([failed, record("1", STEADY)], "min").trial_id == "1"
    assert best_trial([failed], "min") is None
    assert best_trial([], "min") is None


def test_without_every_settled_score_the_best_epoch_decides_for_all():
    # A search saved before settled scores were recorded: its trials have none.
    old = TrialRecord("2", "COMPLETED", {"learning_rate": 1e-2}, 0.25, 1.0)
    trials = [record("0", NOISY), record("1", STEADY), old]
    assert best_trial(trials, "min").trial_id == "0"


def test_ties_go_to_the_earlier_trial():
    assert best_trial([record("0", STEADY), record("1", STEADY)], "min").trial_id == "0"
